"""A sequence model assembled from a layer pattern: the LMs and the sequence baselines.

    tokens [B, T] -> embedding  (features [B, T, F] -> linear)
    -> for name in pattern:  h = h + dropout(mixer_name(LayerNorm(h)))     (pre-LN residual)
    -> LayerNorm -> head -> [B, T, output_size]

Every pattern entry is one residual sublayer named in ``MIXERS``: ``["mru", "mlp"] * 6`` is six
(MRU + MLP) blocks, ``["attn", "mlp", "mru", "mlp"]`` a hybrid, ``["mlp"] * 4`` an MLP-only model.
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

from torch import Tensor, nn

from ..checks import check_int
from ..nn.protocol import takes_starts
from .generate import Generates
from .mixers import MIXERS
from .registry import embed_tokens


def sequence_defaults() -> dict:
    """SequenceModel's architecture arguments (all but the input/output sizes) and their defaults
    (``pattern``: None, it has none): read from its signature, the one place they are defined."""
    skip = {"self", "output_size", "vocab_size", "input_size"}
    return {n: (None if p.default is inspect.Parameter.empty else p.default)
            for n, p in inspect.signature(SequenceModel.__init__).parameters.items() if n not in skip}


class Residual(nn.Module):
    """``x + dropout(mixer(LayerNorm(x)))``, passing the mixer's state through."""

    def __init__(self, mixer: nn.Module, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, state=None, *, mask: Tensor | None = None, starts: Tensor | None = None):
        # only the keywords given: a mixer outside the protocol still runs without them
        kwargs = {k: v for k, v in (("mask", mask), ("starts", starts)) if v is not None}
        if starts is not None and not takes_starts(self.mixer):
            raise ValueError(f"starts (packed documents) is not supported by mixer {type(self.mixer).__name__}: "
                             f"its forward takes no starts= (see matrec.nn.protocol)")
        y, new_state = self.mixer(self.norm(x), state, **kwargs)
        return x + self.dropout(y), new_state


class SequenceModel(Generates, nn.Module):
    """Pre-LN residual stack of mixers; a causal LM (token ids) or a per-step model (features).

    Args:
        pattern: mixer names, one per residual sublayer (see ``MIXERS.names()``).
        vocab_size / input_size: exactly one; token ids ``[B, T]`` or features ``[B, T, input_size]``.
        output_size: width of ``out [B, T, output_size]``.
        d_model: width ``E``.
        n_heads: heads of every mixer that has heads.
        dropout: residual and embedding dropout (and attention dropout).
        tie_embeddings: share the head's weight with the embedding when ``output_size == vocab_size``.
        mixer_options: per mixer name, keyword options for its constructor,
            e.g. ``{"mru": {"state_matrix": "cayley"}, "attn": {"pos": "xpos"}}``.
        context_length: the training length this model was configured for (informational: no
            mixer here has a hard limit).

    ``forward(x, state=None, *, mask=None) -> (out, new_state)``; ``state`` is a list with one entry
    per sublayer (None for stateless ones); ``mask [B, T]`` (bool) marks padding, which every mixer
    skips, and ``starts [B, T]`` (bool) the first token of each document packed into a row, where
    every mixer restarts its state (the mixer protocol, :mod:`matrec.nn.protocol`). Weights follow
    GPT-2: N(0, 0.02), residual projections
    N(0, 0.02 / sqrt(len(pattern))), through every mixer's ``init_weights`` (:mod:`matrec.models.mixers`).
    """

    def __init__(self, pattern: Sequence[str], *, output_size: int, vocab_size: int | None = None,
                 input_size: int | None = None, d_model: int = 128, n_heads: int = 4,
                 dropout: float = 0.0, tie_embeddings: bool = True,
                 mixer_options: dict[str, dict] | None = None, context_length: int | None = None) -> None:
        super().__init__()
        if isinstance(pattern, str) or not pattern or not all(isinstance(p, str) for p in pattern):
            raise ValueError(f"pattern must be a non-empty list of mixer names, got {pattern!r}")
        for name in pattern:
            MIXERS.get(name)  # unknown names fail here, listing the valid ones
        if (vocab_size is None) == (input_size is None):
            raise ValueError(f"exactly one of vocab_size and input_size must be given, got "
                             f"vocab_size={vocab_size}, input_size={input_size}")
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        mixer_options = dict(mixer_options or {})
        unknown = sorted(set(mixer_options) - set(pattern))
        if unknown:
            raise ValueError(f"mixer_options names mixers not in the pattern {list(pattern)}: {unknown}")
        self.pattern = list(pattern)
        self.vocab_size, self.input_size, self.output_size = vocab_size, input_size, output_size
        self.d_model, self.context_length = d_model, context_length
        self.encoder = (nn.Embedding(vocab_size, d_model) if vocab_size is not None
                        else nn.Linear(input_size, d_model))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            Residual(MIXERS.get(name)(d_model, n_heads=n_heads, dropout=dropout,
                                      **mixer_options.get(name, {})), d_model, dropout)
            for name in self.pattern
        )
        self.norm = nn.LayerNorm(d_model)
        tied = tie_embeddings and vocab_size is not None and output_size == vocab_size
        self.head = nn.Linear(d_model, output_size, bias=not tied)
        self._init_weights(std=0.02, residual_std=0.02 / math.sqrt(len(self.pattern)))
        if tied:
            self.head.weight = self.encoder.weight

    def _init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.encoder.weight, std=std)
        if getattr(self.encoder, "bias", None) is not None:
            nn.init.zeros_(self.encoder.bias)
        nn.init.normal_(self.head.weight, std=std)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        for name, layer in zip(self.pattern, self.layers):
            init = getattr(layer.mixer, "init_weights", None)
            if not callable(init):  # the mixer contract (models/mixers.py), stated instead of an AttributeError
                raise TypeError(f"mixer {name!r} ({type(layer.mixer).__name__}) must define "
                                f"init_weights(std, residual_std); see docs/architecture.md")
            init(std, residual_std)

    def forward(self, x: Tensor, state: list | None = None, *, mask: Tensor | None = None,
                starts: Tensor | None = None) -> tuple[Tensor, list]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if self.vocab_size is not None:
            if x.dim() != 2 or x.is_floating_point():
                raise ValueError(f"x must be token ids [B, T] (integer), got {tuple(x.shape)} {x.dtype}")
        elif x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must be features [B, T, {self.input_size}], got {tuple(x.shape)}")
        if state is None:
            state = [None] * len(self.layers)
        elif len(state) != len(self.layers):
            raise ValueError(f"state must be a list of {len(self.layers)} per-layer states, "
                             f"got {len(state)}")
        h = self.dropout(embed_tokens(self.encoder, x) if self.vocab_size is not None
                         else self.encoder(x))  # [B, T, E]
        new_state = []
        for layer, s in zip(self.layers, state):
            h, s = layer(h, s, mask=mask, starts=starts)
            new_state.append(s)
        return self.head(self.norm(h)), new_state


def num_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
