"""The model registry and the one function that builds a model by name."""
from __future__ import annotations

from torch import nn

from ..registry import Registry

MODELS: Registry = Registry("model", argument="model")


def build_model(name: str, *, vocab_size: int | None = None, input_size: int | None = None,
                output_size: int, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    Exactly one of ``vocab_size`` (inputs are token ids ``[B, T]``) and ``input_size`` (inputs are
    features ``[B, T, input_size]``) must be given. The model maps them to ``[B, T, output_size]``;
    ``forward(x, state=None)`` returns ``(out, new_state)``.
    """
    if (vocab_size is None) == (input_size is None):
        raise ValueError(
            f"exactly one of vocab_size and input_size must be given, got vocab_size={vocab_size}, "
            f"input_size={input_size}"
        )
    for arg, value in (("vocab_size", vocab_size), ("input_size", input_size), ("output_size", output_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    factory = MODELS.get(name)
    return factory(vocab_size=vocab_size, input_size=input_size, output_size=output_size, **kwargs)
