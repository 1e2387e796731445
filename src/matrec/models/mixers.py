"""Sequence mixers: the layers a :class:`~matrec.models.SequenceModel` stacks.

One calling convention for all of them::

    y, new_state = mixer(x, state=None)     # x, y: [B, T, E]

``state`` is whatever the mixer needs to continue the sequence: a recurrent state, a KV cache,
segment memory, or None for stateless layers. Calling on a sequence in chunks and passing the state
along equals one call on the whole sequence. Every mixer is causal.

Mixers are built by name as ``MIXERS.get(name)(d_model, n_heads=..., dropout=..., **options)``.
Mixers written here may define ``init_weights(std, residual_std)``; the sequence model calls it for
GPT-2-style initialisation. Wrapped modules (the MRU, torch RNNs, MORNN) keep their own init,
except that an ``out_proj`` linear layer (the MRU's output projection) gets the residual init.

This file holds the MLP, the MRU and the RNN mixers; attention-like mixers live in
``attention.py``, ``linear_attention.py`` and ``transformer_xl.py``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .recurrent import MORNN_RECIPE, mornn

MIXERS: Registry = Registry("mixer", argument="mixer")


def init_linear(module: nn.Linear, std: float) -> None:
    """GPT-2 init of one linear layer: weights N(0, std), bias zero."""
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


@MIXERS.register("mlp")
class MLP(nn.Module):
    """Position-wise feed-forward ``E -> expansion*E -> E`` with GELU; stateless (state stays None).

    Registered as a mixer so a layer pattern can hold MLP sublayers (``["mru", "mlp"] * 6``) and
    MLP-only models (``["mlp"] * 4``) with the same residual wrapper.
    """

    def __init__(self, d_model: int, *, n_heads: int | None = None, dropout: float = 0.0,
                 expansion: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, expansion * d_model, bias=bias)
        self.residual_proj = nn.Linear(expansion * d_model, d_model, bias=bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.fc, std)
        init_linear(self.residual_proj, residual_std)

    def forward(self, x: Tensor, state=None) -> tuple[Tensor, None]:
        return self.residual_proj(F.gelu(self.fc(x))), None


@MIXERS.register("mru")
def mru_mixer(d_model: int, *, n_heads: int = 1, dropout: float = 0.0, **options) -> nn.Module:
    """:class:`matrec.MRU` (it already follows the mixer convention). ``options`` go to the MRU:
    ``state_size``, ``state_matrix`` (construction, default "ldu"), ``backend``.

    The MRU's own output dropout stays off: the residual wrapper applies ``dropout`` to every mixer.
    """
    import matrec  # the MRU lives in matrec.nn; imported here so models load without it

    return matrec.MRU(d_model, num_heads=n_heads, **options)


class RNNMixer(nn.Module):
    """An ``nn.RNN``-like module (batch_first, hidden size = input size) as a mixer.

    State is the RNN's own: ``h [layers, B, E]`` (``(h, c)`` for an LSTM).
    """

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        if not getattr(rnn, "batch_first", False):
            raise ValueError("rnn must be built with batch_first=True")
        self.rnn = rnn

    def forward(self, x: Tensor, state=None):
        return self.rnn(x, state)


def _rnn_mixer(rnn_cls, **defaults):
    def build(d_model: int, *, n_heads: int | None = None, dropout: float = 0.0, **options):
        return RNNMixer(rnn_cls(d_model, d_model, batch_first=True, **{**defaults, **options}))

    build.__doc__ = f"{getattr(rnn_cls, '__name__', rnn_cls)} with hidden size = width, as a mixer."
    return build


MIXERS.register("rnn", _rnn_mixer(nn.RNN))
MIXERS.register("lstm", _rnn_mixer(nn.LSTM))
MIXERS.register("gru", _rnn_mixer(nn.GRU))
MIXERS.register("mornn", _rnn_mixer(mornn, **MORNN_RECIPE))
