"""The model registry and the one function that builds a model by name."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_int
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
    for arg, value in (("vocab_size", vocab_size), ("input_size", input_size)):
        check_int(arg, value, allow_none=True)
    check_int("output_size", output_size)
    factory = MODELS.get(name)
    return factory(vocab_size=vocab_size, input_size=input_size, output_size=output_size, **kwargs)


def architecture(name: str, **kwargs) -> tuple[str, dict]:
    """What ``build_model(name, **kwargs)`` builds, written out: ``("sequence", SequenceModel's
    arguments)`` (defaults filled in: ``pattern``, ``d_model``, ...) or ``("recurrent", the recurrent
    model's)`` (``hidden_size``, ``num_layers``, ``embed_dim`` and the options given for the cell),
    sizes of inputs and outputs aside. It is what the factory itself builds from (its
    ``architecture`` attribute), so the zoo's rules and presets live in one place; Hugging Face
    configs (:mod:`matrec.hf`) are derived from it. A ValueError for models that have none
    (``seasonal_naive``, ``linear_ar``)."""
    factory = MODELS.get(name)
    spec = getattr(factory, "architecture", None)
    if spec is None:
        raise ValueError(f"model {name!r} has no written-out architecture (only sequence and recurrent "
                         f"models do)")
    return spec(**kwargs)


def model_kind(name: str) -> str | None:
    """``"sequence"``, ``"recurrent"`` or None (a model without :func:`architecture`)."""
    return getattr(MODELS.get(name), "kind", None)


def embed_tokens(embedding: nn.Embedding, x: Tensor) -> Tensor:
    """``embedding(x)`` for a model's token input ``x [B, T]``, with its errors stated in the
    model's terms (torch says "index out of range in self" for an id outside the vocabulary)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor of token ids [B, T], got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"x must be integer token ids [B, T], got {x.dtype}")
    try:
        return embedding(x)
    except IndexError:   # on CPU; CUDA reports a device-side assertion instead
        raise IndexError(f"x holds token ids outside [0, {embedding.num_embeddings}) (the model's "
                         f"vocab_size): from {int(x.min())} to {int(x.max())}") from None
