"""Sequence mixers: the layers a :class:`~matrec.models.SequenceModel` stacks, registered by name.

One calling convention for all of them, the mixer protocol (:mod:`matrec.nn.protocol`)::

    y, new_state = mixer(x, state=None, *, mask=None)     # x, y: [B, T, E]; mask [B, T] bool

``state`` is whatever the mixer needs to continue the sequence: a recurrent state, a KV cache,
segment memory, or None for stateless layers; ``mixer.state_spec()`` describes it. Calling on a
sequence in chunks and passing the state along equals one call on the whole sequence. Every mixer is
causal.

Mixers are built by name as ``MIXERS.get(name)(d_model, n_heads=..., dropout=..., **options)``. The
layers themselves live in :mod:`matrec.nn`; this file only names them. Every mixer defines
``init_weights(std, residual_std)`` (:mod:`matrec.nn.init`), which the sequence model calls for
GPT-2-style initialisation; layers with their own initialisation (the MRU, the RNNs) implement it
for their residual-stream projection only, or as a no-op.
"""
from __future__ import annotations

from torch import nn

from ..nn.attention import CausalSelfAttention, MRURotaryAttention
from ..nn.linear_attention import LinearAttention
from ..nn.lru import LRUMixer
from ..nn.mamba import MambaMixer
from ..nn.gate_init import gated
from ..nn.mlp import MLP
from ..nn.mru import MRU
from ..nn.rnn_mixer import RNNMixer
from ..nn.transformer_xl import TransformerXLAttention
from ..registry import Registry

__all__ = ["MIXERS", "RNNMixer", "mru_mixer"]
from .recurrent import MORNN_RECIPE, mornn

MIXERS: Registry = Registry("mixer", argument="mixer")


def mru_mixer(d_model: int, *, n_heads: int = 1, dropout: float = 0.0, **options) -> MRU:
    """:class:`matrec.MRU` (it already follows the mixer convention). ``options`` go to the MRU:
    ``state_size``, ``state_matrix`` (construction, default "ldu"), ``backend``.

    The MRU's own output dropout stays off: the residual wrapper applies ``dropout`` to every mixer.
    """
    return MRU(d_model, num_heads=n_heads, **options)


def _rnn_mixer(rnn_cls, **defaults):
    def build(d_model: int, *, n_heads: int | None = None, dropout: float = 0.0, **options):
        return RNNMixer(rnn_cls(d_model, d_model, batch_first=True, **{**defaults, **options}))

    build.__doc__ = f"{getattr(rnn_cls, '__name__', rnn_cls)} with hidden size = width, as a mixer."
    return build


MIXERS.register("mlp", MLP)
MIXERS.register("mru", mru_mixer)
MIXERS.register("rnn", _rnn_mixer(nn.RNN))
MIXERS.register("lstm", _rnn_mixer(gated(nn.LSTM)))
MIXERS.register("gru", _rnn_mixer(gated(nn.GRU)))
MIXERS.register("mornn", _rnn_mixer(mornn, **MORNN_RECIPE))
MIXERS.register("attn", CausalSelfAttention)
MIXERS.register("mru_rotary", MRURotaryAttention)
MIXERS.register("linear_attn", LinearAttention)
MIXERS.register("txl", TransformerXLAttention)
MIXERS.register("lru", LRUMixer)
MIXERS.register("mamba", MambaMixer)  # needs the mamba extra (mambapy), imported when built
