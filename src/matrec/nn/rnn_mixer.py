"""An ``nn.RNN``-like module (``nn.RNN``, :class:`~matrec.MORNN`, ``nn.LSTM`` ...) as a mixer.

Unmasked, the RNN runs as itself (its own fused kernels). With a padding ``mask`` (the mixer
protocol, :mod:`matrec.nn.protocol`), or inside :func:`matrec.ops.backends.export_safe`, an Elman
RNN (one with ``nonlinearity`` and ``all_weights``: ``nn.RNN``, MORNN) runs through MORNN's layer
driver and :func:`matrec.ops.rnn_recurrence.recurrence`, whose backends keep the state on padded
steps; gated RNNs have no such path and say so. Packed documents (``starts``) without a mask run
every RNN: an Elman RNN through the same driver, a gated one (LSTM, GRU) as itself over the
stretches between the steps where some row starts a document (:func:`run_restarting`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.backends import exporting
from ..ops.rnn_recurrence import RECURRENCE_BACKENDS
from .mornn import rnn_layers
from .orthogonal import OrthogonalRecurrent
from .protocol import NoExportForm, StateSpec, check_mask


def _is_elman(rnn: nn.Module) -> bool:
    return hasattr(rnn, "nonlinearity") and hasattr(rnn, "all_weights")


def _elman(rnn: nn.Module) -> None:
    """NoExportForm unless ``rnn`` is a one-direction Elman RNN with ``all_weights``."""
    if not _is_elman(rnn):
        raise NoExportForm(f"{type(rnn).__name__} takes no mask (nor starts) and has no export form: matrec's "
                           f"recurrence op runs Elman RNNs (nn.RNN, MORNN) only")
    if getattr(rnn, "bidirectional", False):
        raise NoExportForm("a bidirectional RNN takes no mask and cannot stream (it reads the future)")


def run_rnn(rnn: nn.Module, x: Tensor, hx: Tensor | None, mask: Tensor | None,
            starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``rnn`` (batch_first, one direction) on ``x [B, T, I]`` from ``hx [L, B, H]`` (zeros if None)
    with ``mask [B, T]`` (None: every step valid) and ``starts [B, T]`` (packed documents, each
    from a zero state) -> ``(out [B, T, H], h_n [L, B, H])``."""
    _elman(rnn)
    check_mask(mask, x)
    check_mask(starts, x, "starts")
    B = x.shape[0]
    L, H = rnn.num_layers, rnn.hidden_size
    if hx is None:
        hx = x.new_zeros(L, B, H)
    biases = [getattr(rnn, f"modrelu_bias_l{k}", None) for k in range(L)]
    # the layer's backend; with a mask, only one that takes masks, else "auto" (the reference
    # loop). Restarts alone every backend takes (between restarts it runs as usual).
    backend = getattr(rnn, "recurrence_backend", "auto")
    if mask is not None and backend != "auto" and not RECURRENCE_BACKENDS.get(backend).masks:
        backend = "auto"
    if rnn.training and isinstance(rnn, OrthogonalRecurrent):
        rnn.maybe_refold()
    out, h_n = rnn_layers(x.transpose(0, 1), hx, rnn.all_weights, biases, rnn.nonlinearity.lower(),
                          num_layers=L, bidirectional=False,
                          dropout=rnn.dropout if rnn.training else 0.0,
                          backend=backend,
                          mask=None if mask is None else mask.t(),
                          resets=None if starts is None else starts.t())
    return out.transpose(0, 1), h_n


def run_restarting(rnn: nn.Module, x: Tensor, hx, starts: Tensor | None):
    """``rnn`` (batch_first, one direction; any ``nn.RNN``-like module, an LSTM's ``(h, c)`` state
    included) on ``x [B, T, I]`` from ``hx`` with packed documents ``starts [B, T]``: the RNN runs
    as itself over each stretch between the steps where some row starts a document, and a row's
    state is zeroed at its starts. Exact, and one call of the RNN's own kernel when no row starts
    inside this call. -> ``(out [B, T, H], state)``."""
    check_mask(starts, x, "starts")
    if getattr(rnn, "bidirectional", False):
        raise ValueError("a bidirectional RNN cannot take starts (it reads the future)")
    cuts = set() if starts is None else set(starts.any(0).nonzero().flatten().tolist())
    bounds = sorted(cuts | {0, x.shape[1]})
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        if a in cuts and hx is not None:
            keep = starts[None, :, a, None]  # [1, B, 1]: True where the row restarts
            hx = tuple(h.masked_fill(keep, 0.0) for h in hx) if isinstance(hx, tuple) else hx.masked_fill(keep, 0.0)
        y, hx = rnn(x[:, a:b], hx)  # [B, b - a, H]
        pieces.append(y)
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)), hx


def run_recurrent(rnn: nn.Module, x: Tensor, hx=None, *, mask: Tensor | None = None,
                  starts: Tensor | None = None):
    """``rnn`` under the mixer protocol: as itself when nothing asks otherwise; packed documents
    through :func:`run_restarting` for a gated RNN, or for any RNN when no row starts after the
    call's first step (one call of the RNN: a MORNN then refolds as often as without starts), the
    rest through :func:`run_rnn`."""
    if mask is None and not exporting():
        if starts is None:
            return rnn(x, hx)
        if not _is_elman(rnn) or not bool(starts[:, 1:].any()):
            return run_restarting(rnn, x, hx, starts)
    return run_rnn(rnn, x, hx, mask, starts)


class InferenceRNN(nn.Module):
    """An Elman RNN's current weights as constants (a MORNN's orthogonal matrices built once): the
    ``nn.RNN``-like module :meth:`RNNMixer.for_inference` runs in exported graphs, without the
    training-time parametrisation (a MORNN's ``*_A`` and bases)."""

    batch_first, bidirectional, dropout = True, False, 0.0

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        _elman(rnn)
        self.input_size, self.hidden_size, self.num_layers = rnn.input_size, rnn.hidden_size, rnn.num_layers
        self.nonlinearity = rnn.nonlinearity.lower()
        with torch.no_grad():
            weights = [[w.detach().clone() for w in ws] for ws in rnn.all_weights]
        self._counts = [len(ws) for ws in weights]
        for k, ws in enumerate(weights):
            for j, w in enumerate(ws):
                self.register_buffer(f"w_{k}_{j}", w)
            bias = getattr(rnn, f"modrelu_bias_l{k}", None)
            self.register_buffer(f"modrelu_bias_l{k}", None if bias is None else bias.detach().clone())

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [[getattr(self, f"w_{k}_{j}") for j in range(n)] for k, n in enumerate(self._counts)]

    def forward(self, x: Tensor, hx: Tensor | None = None):
        return run_rnn(self, x, hx, None)


class RNNMixer(nn.Module):
    """An ``nn.RNN``-like module (batch_first, hidden size = input size) as a mixer.

    State is the RNN's own: ``h [layers, B, E]`` (``(h, c)`` for an LSTM). The RNN keeps its own
    initialisation.
    """

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        if not getattr(rnn, "batch_first", False):
            raise ValueError("rnn must be built with batch_first=True")
        self.rnn = rnn

    def init_weights(self, std: float, residual_std: float) -> None:
        """Nothing: an RNN's initialisation is part of its recipe (MORNN's Henaff init, say)."""

    def state_spec(self) -> list[StateSpec]:
        """``h [layers, B, H]`` (an LSTM adds its cell ``c``), zeros at the start."""
        shape = (self.rnn.num_layers * (2 if getattr(self.rnn, "bidirectional", False) else 1), "B",
                 self.rnn.hidden_size)
        cells = [StateSpec("c", shape)] if isinstance(self.rnn, nn.LSTM) else []
        return [StateSpec("h", shape)] + cells

    def for_inference(self) -> "RNNMixer":
        """This mixer over :class:`InferenceRNN` (the weights as constants); itself for an RNN that
        has no masked path (its forward then says why)."""
        try:
            return RNNMixer(InferenceRNN(self.rnn))
        except NoExportForm:
            return self

    def forward(self, x: Tensor, state=None, *, mask: Tensor | None = None, starts: Tensor | None = None):
        return run_recurrent(self.rnn, x, state, mask=mask, starts=starts)
