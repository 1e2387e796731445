"""Classic recurrent sequence models: input encoder -> stacked RNN -> linear read-out.

This is the setup of the long-memory literature (no norms, no MLPs), used for the torch baselines
and for MORNN.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..checks import check_int
from ..nn.gate_init import gated
from ..nn.mornn import MORNN
from ..nn.rnn_mixer import run_recurrent
from .generate import Generates
from .registry import MODELS, embed_tokens


class RecurrentModel(Generates, nn.Module):
    """Encoder (embedding or linear) -> ``rnn`` (batch_first) -> linear head.

    Args:
        rnn: a module with ``nn.RNN``'s calling convention, built with ``batch_first=True``.
        vocab_size / input_size: exactly one; token ids ``[B, T]`` or features ``[B, T, input_size]``.
        output_size: width of the output ``[B, T, output_size]``.
    """

    def __init__(self, rnn: nn.Module, *, hidden_size: int, output_size: int,
                 vocab_size: int | None = None, input_size: int | None = None,
                 embed_dim: int | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size  # None: a features model (generation needs token ids)
        if vocab_size is not None:
            self.encoder: nn.Module = nn.Embedding(
                vocab_size, rnn.input_size if embed_dim is None else embed_dim)
        else:
            self.encoder = nn.Identity()
        self.rnn = rnn
        num_directions = 2 if getattr(rnn, "bidirectional", False) else 1
        self.head = nn.Linear(hidden_size * num_directions, output_size)

    def forward(self, x: Tensor, state=None, *, mask: Tensor | None = None, starts: Tensor | None = None):
        """``mask [B, T]`` (bool) marks padding, whose steps keep the state (Elman RNNs only);
        ``starts [B, T]`` packed documents, each from a zero state
        (:func:`matrec.nn.rnn_mixer.run_recurrent`)."""
        inputs = embed_tokens(self.encoder, x) if self.vocab_size is not None else self.encoder(x)
        h, new_state = run_recurrent(self.rnn, inputs, state, mask=mask, starts=starts)  # [B, T, H * dirs]
        return self.head(h), new_state


def _encoder_width(vocab_size, input_size, embed_dim):
    if vocab_size is None:
        return input_size
    if embed_dim is None:
        return 32
    return check_int("embed_dim", embed_dim, allow_none=True)   # an explicit 0 must not fall back to the default


def recurrent_factory(rnn_cls: Callable[..., nn.Module], default_hidden: int = 128, **rnn_defaults):
    """A ``build_model`` factory for an ``nn.RNN``-like class."""

    def architecture(*, hidden_size=default_hidden, num_layers=1, embed_dim=None, **rnn_kwargs):
        """``("recurrent", arguments)``: the sizes and the options given for the cell (its recipe's
        defaults, such as MORNN's, are applied when building)."""
        return "recurrent", dict(hidden_size=hidden_size, num_layers=num_layers, embed_dim=embed_dim,
                                 **rnn_kwargs)

    def build(*, vocab_size=None, input_size=None, output_size, **kwargs):
        rnn_kwargs = architecture(**kwargs)[1]
        hidden_size, num_layers = rnn_kwargs.pop("hidden_size"), rnn_kwargs.pop("num_layers")
        width = _encoder_width(vocab_size, input_size, rnn_kwargs.pop("embed_dim"))
        check_int("hidden_size", hidden_size)
        check_int("num_layers", num_layers)
        # nn.RNN tests `if bidirectional`, so "no" would build a bidirectional network
        for arg in ("bidirectional", "bias", "batch_first"):
            if arg in rnn_kwargs and not isinstance(rnn_kwargs[arg], bool):
                raise TypeError(f"{arg} must be a bool, got {rnn_kwargs[arg]!r}")
        rnn = rnn_cls(width, hidden_size, num_layers=num_layers, batch_first=True,
                      **{**rnn_defaults, **rnn_kwargs})
        return RecurrentModel(rnn, hidden_size=hidden_size, output_size=output_size,
                              vocab_size=vocab_size, input_size=input_size, embed_dim=width)

    build.architecture, build.kind = architecture, "recurrent"
    return build


MODELS.register("rnn", recurrent_factory(nn.RNN))
# init="chrono" (with t_max) or "forget_bias_1" set the gate biases (nn/gate_init.py)
MODELS.register("lstm", recurrent_factory(gated(nn.LSTM)))
MODELS.register("gru", recurrent_factory(gated(nn.GRU)))


# the long-memory recipe (docs/mornn.md): modReLU and Henaff init (override by keyword)
MORNN_RECIPE = {"nonlinearity": "modrelu", "init": "henaff"}
mornn = MORNN  # the name the mixer and model factories build
MODELS.register("mornn", recurrent_factory(MORNN, **MORNN_RECIPE))
