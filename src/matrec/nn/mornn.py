"""MORNN and MORNNCell: drop-ins for ``torch.nn.RNN`` / ``nn.RNNCell`` whose recurrent matrices stay
orthogonal.

Each recurrent matrix ``weight_hh_l{k}[_reverse]`` is ``base @ f(A)``, kept by the parametrisation
in :mod:`matrec.nn.orthogonal` (trainable ``..._A``, buffer ``..._base``, refolded every
``refold_every`` training forwards; built once for many forwards while no gradient is needed). It
reads as the current matrix, so code written against ``nn.RNN`` that inspects weights keeps
working; an in-place write to what it returns (``.copy_``, ``.data.copy_``, ``nn.init.*``, through
``all_weights``) is projected onto the orthogonal group and becomes the new base. This module holds
the layers: nn.RNN's constructor, checks and parameter naming, and the forward.

modrelu/identity run through :func:`matrec.ops.rnn_recurrence.recurrence` (no autograd loop over time);
so do tanh/relu on CPU where its compiled loop ("cpp") builds, and elsewhere they run in PyTorch's
fused RNN kernel (cuDNN on GPU) with the materialised weights.

The recipe that gives memory (copy task; see docs/mornn.md): ``nonlinearity="modrelu"``,
``init="henaff"``, RMSprop or Adam with :func:`mornn_param_groups` (orthogonal parameters at 1/10 of
the learning rate, :mod:`matrec.nn.mornn_training`), gradient clipping at 1.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..checks import check_type
from ..ops.rnn_recurrence import NONLINEARITIES, RECURRENCE_BACKENDS, recurrence
from ..ops.rnn_recurrence.cpp import cpp_available, cpp_layers_forward, cpp_supports
# the parametrisation and the training helpers, importable from here as before the split
from .mornn_training import mornn_param_groups, orthogonality_report
from .orthogonal import (MORNN_INITS, OrthogonalMatrixProperty, OrthogonalRecurrent, track_optimizer_steps,
                         _rotation_blocks, cayley_init, henaff_init, identity_init, random_init)  # noqa: F401

__all__ = ["MORNN", "MORNNCell", "MORNN_INITS", "OrthogonalMatrixProperty", "mornn_param_groups",
           "orthogonality_report", "track_optimizer_steps"]

# Nonlinearities with a fused PyTorch kernel; the others go through ops.rnn_recurrence.
_FUSED = {"tanh": (_VF.rnn_tanh, _VF.rnn_tanh_cell), "relu": (_VF.rnn_relu, _VF.rnn_relu_cell)}


class _Layer(NamedTuple):
    """Parameter names of one layer and direction, as nn.RNN names them (None: not present)."""

    weight_ih: str
    weight_hh: str            # the orthogonal matrix: stored as f"{weight_hh}_A" and f"{weight_hh}_base"
    bias_ih: str | None
    bias_hh: str | None
    modrelu_bias: str | None


class _RNNBase(OrthogonalRecurrent):
    """What MORNN and MORNNCell share beyond the parametrisation: nn.RNN's parameter naming per
    layer and direction (``_layers``), its initialisation, and the weights as its kernels take them."""

    _layers: list[_Layer]

    def reset_parameters(self) -> None:
        """nn.RNN's U(-1/sqrt(H), 1/sqrt(H)) for input weights and biases; ``init`` for W_hh;
        modReLU biases U(-0.01, 0.01) (near-identity activation at the start)."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        P = self._parameters
        for layer in self._layers:
            for name in (layer.weight_ih, layer.bias_ih, layer.bias_hh):
                if name is not None:
                    nn.init.uniform_(P[name], -stdv, stdv)
            if layer.modrelu_bias is not None:
                nn.init.uniform_(P[layer.modrelu_bias], -0.01, 0.01)
        self._reset_orthogonal()

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """As ``nn.RNN.all_weights``: per (layer, direction) ``[w_ih, w_hh, (b_ih, b_hh)]``, ``w_hh``
        the current orthogonal matrix (in-place writes to it are taken over, as for ``weight_hh_l{k}``)."""
        P = self._parameters
        return [[P[layer.weight_ih], self._read_matrix(layer.weight_hh)]
                + ([P[layer.bias_ih], P[layer.bias_hh]] if layer.bias_ih is not None else [])
                for layer in self._layers]

    def _weights(self) -> list[list[Tensor]]:
        """Per (layer, direction): [w_ih, W_hh, (b_ih, b_hh)], W_hh as the forward uses it."""
        P = self._parameters
        return [[P[layer.weight_ih], self.orthogonal_weight(layer.weight_hh)]
                + ([P[layer.bias_ih], P[layer.bias_hh]] if layer.bias_ih is not None else [])
                for layer in self._layers]

    def _modrelu_biases(self) -> list[Tensor | None]:
        P = self._parameters
        return [None if layer.modrelu_bias is None else P[layer.modrelu_bias] for layer in self._layers]


def _check_sizes(input_size, hidden_size, bias, batch_first=False):
    if not isinstance(bias, bool):
        raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
    # torch.nn.RNN's exact exceptions and wording, not check_int's: MORNN is a drop-in, and torch's
    # own module tests (tests/nn/test_mornn_module_db.py) pin these messages for both classes
    if not isinstance(input_size, int) or isinstance(input_size, bool):
        raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
    if input_size <= 0:
        raise ValueError("input_size must be greater than zero")
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool):
        raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
    if hidden_size <= 0:
        raise ValueError("hidden_size must be greater than zero")


class MORNN(_RNNBase):
    r"""Multi-layer Elman RNN ``h_t = phi(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` with every
    ``W_hh`` orthogonal. Same constructor, forward and parameter names as :class:`torch.nn.RNN`.

    Args (as ``nn.RNN``): input_size, hidden_size, num_layers=1, nonlinearity="tanh" (also
        "modrelu", "identity"), bias=True, batch_first=False, dropout=0.0, bidirectional=False,
        device, dtype. ``proj_size`` raises ValueError, as for ``nn.RNN``.
    Keyword-only:
        orthogonal_map: "cayley" (default: a linear solve, the cheapest to build and differentiate;
            docs/mornn.md compares them), "expm" or "householder" (``matrec.ORTHOGONAL_MAPS``). All are
            exact to rounding; the refolded base lets even Cayley reach every rotation.
        init: initial recurrent matrices, one of ``MORNN_INITS``: "henaff" (default), "cayley",
            "random", "identity".
        refold_every: fold ``A`` into the base every this many training forwards (0: never).
        recurrence_backend: ``matrec.ops.rnn_recurrence.RECURRENCE_BACKENDS`` ("auto", "torch", "loop",
            "cpp", "chunked", "triton"; "loop" is the autograd reference, "chunked" identity only).
            modrelu/identity always run through it; tanh/relu run on the compiled CPU loop ("cpp")
            when that is chosen ("auto" on CPU with float32/float64 inputs where it builds, or
            "cpp" itself), and in PyTorch's fused RNN kernel otherwise.

    Parameters: ``weight_ih_l{k}[_reverse]``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` exactly as nn.RNN;
    ``weight_hh_l{k}_A`` (``[H(H-1)/2]``) replaces the trainable ``weight_hh_l{k}``, which is a
    computed property (:class:`OrthogonalMatrixProperty`); buffers ``weight_hh_l{k}_base``
    (``[H, H]``); with modrelu, ``modrelu_bias_l{k}`` (``[H]``). The state dict is exact (A and
    base), so save/load round-trips bit for bit.

    Beyond nn.RNN: :meth:`refold`, :meth:`freeze` / :meth:`unfreeze` (keep the built matrices for
    inference), :meth:`from_rnn` / :meth:`to_rnn`, :meth:`orthogonal_weight`.

    Shapes (as nn.RNN): input ``[T, B, I]`` (``[B, T, I]`` batch_first), ``[T, I]`` unbatched, or a
    PackedSequence; hx ``[L * D, B, H]`` (``[L * D, H]`` unbatched). Returns ``(output, h_n)``:
    output ``[T, B, D * H]`` (same layout/type as the input), h_n ``[L * D, B, H]``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 orthogonal_map: str = "cayley", init: str = "henaff", refold_every: int = 100,
                 recurrence_backend: str = "auto", proj_size: int | None = None) -> None:
        super().__init__()
        if proj_size is not None:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if nonlinearity not in NONLINEARITIES:   # nn.RNN's wording (a drop-in), then the registry's
            names = [repr(n) for n in NONLINEARITIES.names()]
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from {', '.join(names[:-1])} or "
                             f"{names[-1]} (nonlinearity must be one of {NONLINEARITIES.names()})")
        if recurrence_backend != "auto":
            RECURRENCE_BACKENDS.get(recurrence_backend)
        self.recurrence_backend = recurrence_backend
        _check_sizes(input_size, hidden_size, bias, batch_first)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool):   # nn.RNN's wording, as above
            raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability "
                             "of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero "
                          f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=2)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.nonlinearity, self.bias, self.batch_first = nonlinearity, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        self.proj_size = 0
        self._init_orthogonal(orthogonal_map, init, refold_every)
        self._layers = []
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        for layer in range(num_layers):
            for direction in range(D):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                in_size = input_size if layer == 0 else hidden_size * D
                names = _Layer(f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}" if bias else None,
                               f"bias_hh{sfx}" if bias else None,
                               f"modrelu_bias{sfx}" if nonlinearity == "modrelu" else None)
                self.register_parameter(names.weight_ih,
                                        nn.Parameter(torch.empty(hidden_size, in_size, **factory)))
                self._add_orthogonal(names.weight_hh, hidden_size, factory)
                for b in (names.bias_ih, names.bias_hh, names.modrelu_bias):
                    if b is not None:
                        self.register_parameter(b, nn.Parameter(torch.empty(hidden_size, **factory)))
                self._layers.append(names)
        self.reset_parameters()

    def flatten_parameters(self) -> None:
        """No-op kept for nn.RNN compatibility (the recurrent weights are rebuilt, not flattened)."""

    @classmethod
    def from_rnn(cls, rnn: nn.RNN, **kwargs) -> "MORNN":
        """An MORNN with ``rnn``'s configuration and weights, each recurrent matrix replaced by its
        nearest orthogonal matrix (polar factor; ValueError for a singular or non-finite one, which has
        none). Extra keyword arguments go to the constructor."""
        if not isinstance(rnn, nn.RNN):
            raise TypeError(f"rnn must be a torch.nn.RNN, got {type(rnn).__name__}")
        w = rnn.weight_ih_l0
        m = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.nonlinearity, rnn.bias,
                rnn.batch_first, rnn.dropout, rnn.bidirectional, device=w.device, dtype=w.dtype, **kwargs)
        with torch.no_grad():
            for layer in m._layers:  # the names are nn.RNN's
                for name in (layer.weight_ih, layer.bias_ih, layer.bias_hh):
                    if name is not None:
                        m._parameters[name].copy_(getattr(rnn, name))
                m._set_matrix(layer.weight_hh, getattr(rnn, layer.weight_hh))
        return m.train(rnn.training)

    def to_rnn(self) -> nn.RNN:
        """An ``nn.RNN`` holding the current weights (tanh/relu only)."""
        if self.nonlinearity not in _FUSED:
            raise ValueError(f"to_rnn needs nonlinearity 'tanh' or 'relu', got {self.nonlinearity!r}")
        w = self.weight_ih_l0
        rnn = nn.RNN(self.input_size, self.hidden_size, self.num_layers, self.nonlinearity, self.bias,
                     self.batch_first, self.dropout, self.bidirectional, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for ours, theirs in zip(self._weights(), rnn.all_weights):
                for a, b in zip(ours, theirs):
                    b.copy_(a)
        return rnn.train(self.training)

    def _check_input(self, input: Tensor, batch_sizes) -> None:
        w = self._parameters[self._layers[0].weight_ih]
        if input.dtype != w.dtype and not (input.is_floating_point()
                                           and torch.is_autocast_enabled(input.device.type)):
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                             f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})")
        expected = 2 if batch_sizes is not None else 3
        if input.dim() != expected:
            raise RuntimeError(f"input must have {expected} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.size(-1)}")
        if batch_sizes is None and input.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    def forward(self, input, hx: Tensor | None = None):
        """See the class docstring for shapes."""
        check_type("hx", hx, Tensor, "a Tensor", allow_none=True)   # before any use of it
        D = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        is_batched = True
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_input(data, batch_sizes)
            max_batch = int(batch_sizes[0])
            ref = data
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got "
                                           f"{hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            self._check_input(input, None)
            max_batch = input.size(0 if self.batch_first else 1)
            ref = input
        hx = self._initial_state(hx, ref, (self.num_layers * D, max_batch, self.hidden_size))

        if self.training:
            self.maybe_refold()
        weights = self._weights()
        if not packed and self._inference_on_cpp(ref, hx, weights):
            x = input.transpose(0, 1) if self.batch_first else input
            out, h_n = cpp_layers_forward(x, hx, weights, self._modrelu_biases(), self.nonlinearity)
            output = out.transpose(0, 1) if self.batch_first else out
        elif self.nonlinearity in _FUSED and not self._tanh_relu_on_cpp(ref):
            run = _FUSED[self.nonlinearity][0]
            flat = [w for ws in weights for w in ws]
            if packed:
                hx_sorted = hx if sorted_indices is None else hx.index_select(1, sorted_indices)
                output, h_n = run(data, batch_sizes, hx_sorted, flat, self.bias, self.num_layers,
                                  self.dropout, self.training, self.bidirectional)
                if unsorted_indices is not None:
                    h_n = h_n.index_select(1, unsorted_indices)
            else:
                output, h_n = run(input, hx, flat, self.bias, self.num_layers, self.dropout,
                                  self.training, self.bidirectional, self.batch_first)
        else:
            if packed:
                x, lengths = pad_packed_sequence(input)  # [T, B, I] original batch order
            else:
                x, lengths = (input.transpose(0, 1) if self.batch_first else input), None
            out, h_n = rnn_layers(x, hx, weights, self._modrelu_biases(), self.nonlinearity,
                                  num_layers=self.num_layers, bidirectional=self.bidirectional,
                                  dropout=self.dropout if self.training else 0.0, lengths=lengths,
                                  backend=self.recurrence_backend)
            if packed:
                if sorted_indices is not None:
                    out, lengths = out.index_select(1, sorted_indices), lengths[sorted_indices]
                output = pack_padded_sequence(out, lengths, enforce_sorted=True).data
            else:
                output = out.transpose(0, 1) if self.batch_first else out
        if packed:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), h_n
        if not is_batched:
            output, h_n = output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return output, h_n

    @staticmethod
    def _initial_state(hx: Tensor | None, ref: Tensor, expected_hx: tuple[int, int, int]) -> Tensor:
        """``hx`` checked as nn.RNN checks it (its shape ``expected_hx``, ``ref``'s dtype), zeros if None."""
        if hx is None:
            return ref.new_zeros(expected_hx)
        if hx.shape != expected_hx:
            raise RuntimeError(f"Expected hidden size {expected_hx}, got {list(hx.shape)}")
        if hx.dtype != ref.dtype and not torch.is_autocast_enabled(ref.device.type):
            # nn.RNN refuses this inside its kernel; the modrelu/identity recurrence would cast silently
            raise RuntimeError(f"hx must have the input's dtype {ref.dtype}, got {hx.dtype}")
        return hx

    def _inference_on_cpp(self, ref: Tensor, hx: Tensor, weights: list[list[Tensor]]) -> bool:
        """Whether the whole forward can be one C++ call (:func:`cpp_layers_forward`): the compiled
        loop in use, one direction, no dropout to apply, and nothing that needs a gradient (decoding,
        evaluation). A step then costs a few small GEMMs instead of a dozen framework ops."""
        if self.bidirectional or (self.training and self.dropout > 0 and self.num_layers > 1):
            return False
        if not (cpp_supports(self.nonlinearity) and self._uses_cpp(ref) and cpp_available(ref.device)[0]):
            return False
        if torch.is_grad_enabled():
            tensors = [ref, hx, *(w for ws in weights for w in ws),
                       *(b for b in self._modrelu_biases() if b is not None)]
            if any(t.requires_grad for t in tensors):
                return False
        return hx.dtype == ref.dtype and all(w.dtype == ref.dtype for ws in weights for w in ws)

    def _uses_cpp(self, ref: Tensor) -> bool:
        """Whether this forward runs the compiled loop: "cpp" asked for, or "auto" on CPU in
        float32/float64 (not under autocast) where it builds."""
        if self.recurrence_backend == "cpp":
            return True
        return (self.recurrence_backend == "auto" and ref.device.type == "cpu"
                and ref.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and cpp_available(ref.device)[0])

    def _tanh_relu_on_cpp(self, ref: Tensor) -> bool:
        """Whether tanh/relu leave nn.RNN's kernel for the compiled loop: "cpp" asked for, or "auto"
        on CPU in float32/float64 (not under autocast) where the loop builds (it runs ~2x faster
        there, benchmarks/results/cpu_recurrence.md)."""
        return self._uses_cpp(ref)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        s += f", nonlinearity={self.nonlinearity!r}"
        for key, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, key) != default:
                s += f", {key}={getattr(self, key)}"
        return s + f", orthogonal_map={self.orthogonal_map!r}, init={self.init!r}"


def _reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence of ``x [T, B, F]`` within its length (padding stays in place)."""
    if lengths is None:
        return x.flip(0)
    t = torch.arange(x.shape[0], device=x.device).unsqueeze(1)  # [T, 1]
    L = lengths.to(x.device).unsqueeze(0)                    # [1, B]
    idx = torch.where(t < L, L - 1 - t, t)                   # [T, B]
    return x.gather(0, idx.unsqueeze(-1).expand_as(x))


def rnn_layers(x: Tensor, hx: Tensor, weights: list[list[Tensor]], modrelu_biases: list[Tensor | None],
               nonlinearity: str, *, num_layers: int, bidirectional: bool, dropout: float = 0.0,
               lengths: Tensor | None = None, backend: str = "auto",
               mask: Tensor | None = None, resets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Stacked (bi)directional RNN on padded time-major ``x [T, B, I]`` via :func:`recurrence`.

    ``weights[layer * D + d] = [w_ih, W_hh, (b_ih, b_hh)]``; ``hx [L * D, B, H]``; ``lengths [B]``
    (CPU int, original batch order) when sequences are padded; or ``mask [T, B]`` (bool, one
    direction only): padded steps keep the state (the mixer protocol); ``resets [T, B]``: packed
    documents, each starting from a zero state. Returns ``(output [T, B, D * H],
    h_n [L * D, B, H])`` with ``h_n`` taken at each sequence's last valid step.
    """
    D = 2 if bidirectional else 1
    B = x.shape[1]
    layer_in = x
    h_n = []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, W = weights[k][0], weights[k][1]
            b = weights[k][2] + weights[k][3] if len(weights[k]) == 4 else None
            xp = F.linear(layer_in, w_ih, b)                 # [T, B, H]
            if d == 1:
                xp = _reverse_padded(xp, lengths)
            h = recurrence(xp, W, hx[k], modrelu_biases[k], nonlinearity, backend=backend, mask=mask,
                           resets=resets)  # [T, B, H]
            last = h[-1] if lengths is None else h[lengths.to(h.device) - 1, torch.arange(B, device=h.device)]
            h_n.append(last)
            outs.append(_reverse_padded(h, lengths) if d == 1 else h)
        layer_in = torch.cat(outs, dim=-1) if D == 2 else outs[0]  # [T, B, D * H]
        if dropout > 0 and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, torch.stack(h_n)


class MORNNCell(_RNNBase):
    """One step ``h' = phi(W_ih x + b_ih + W_hh h + b_hh)`` with ``W_hh`` orthogonal; mirrors
    :class:`torch.nn.RNNCell`: same constructor (checked as loosely: ``bias`` is taken for its truth
    value, ``hidden_size=0`` gives ``[B, 0]`` outputs, an unknown ``nonlinearity`` raises at forward)
    and forward (input ``[B, I]`` or ``[I]``, hx ``[B, H]`` or ``[H]`` -> ``h'``), with its errors.

    Keyword-only extras and parameter naming as :class:`MORNN` (``weight_hh`` reads as the matrix,
    ``weight_hh_A`` / ``weight_hh_base`` store it, ``modrelu_bias`` for modrelu). ``refold_every``
    counts calls, i.e. time steps when the cell is driven in a loop. A refold in mid-sequence keeps
    the outputs (to rounding), but the gradient then sums terms taken before and after it, w.r.t.
    two parametrisations of ``W`` (they agree only to first order in ``A``'s size): for the exact
    gradient, pass ``refold_every=0`` and call :meth:`refold` between optimiser steps.
    """

    weight_hh = OrthogonalMatrixProperty("weight_hh")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, orthogonal_map: str = "cayley", init: str = "henaff",
                 refold_every: int = 100) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.bias, self.nonlinearity = input_size, hidden_size, bias, nonlinearity
        self._init_orthogonal(orthogonal_map, init, refold_every)
        self._layers = []
        factory = {"device": device, "dtype": dtype}
        # weight_ih first: bad sizes then fail in torch.empty exactly as they do in nn.RNNCell
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **factory))
        self._add_orthogonal("weight_hh", hidden_size, factory)
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if nonlinearity == "modrelu":
            self.modrelu_bias = nn.Parameter(torch.empty(hidden_size, **factory))
        self._layers.append(_Layer("weight_ih", "weight_hh", "bias_ih" if bias else None,
                                   "bias_hh" if bias else None,
                                   "modrelu_bias" if nonlinearity == "modrelu" else None))
        self.reset_parameters()

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        """``input [B, I]`` or ``[I]``, ``hx [B, H]`` or ``[H]`` (zeros when None) -> ``h' [B, H]`` / ``[H]``."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
        if hx is not None and not isinstance(hx, Tensor):
            raise TypeError(f"hx must be a Tensor or None, got {type(hx).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = input.new_zeros(input.size(0), self.hidden_size)
        elif not batched:
            hx = hx.unsqueeze(0)
        self._check_step(input, hx)
        if self.training:
            self.maybe_refold()
        P = self._parameters
        W = self.orthogonal_weight("weight_hh")
        if self.nonlinearity in _FUSED:
            h = _FUSED[self.nonlinearity][1](input, hx, P["weight_ih"], W, P["bias_ih"], P["bias_hh"])
        else:
            z = F.linear(input, P["weight_ih"], P["bias_ih"]) + F.linear(hx, W.to(hx.dtype), P["bias_hh"])
            h = NONLINEARITIES.get(self.nonlinearity).forward(z, P.get("modrelu_bias"))
        return h if batched else h.squeeze(0)

    def _check_step(self, input: Tensor, hx: Tensor) -> None:
        """nn.RNNCell's checks (its kernel's, for sizes), in its order and with its messages and types."""
        if self.nonlinearity not in NONLINEARITIES:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity} (nonlinearity must be one of "
                               f"{NONLINEARITIES.names()})")
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        if input.size(0) != hx.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden0 batch size {hx.size(0)}")
        if hx.size(1) != self.hidden_size:
            raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {hx.size(1)}, expected {self.hidden_size}")
        if hx.dim() != 2:
            raise RuntimeError(f"For unbatched 1-D input, hx should also be 1-D but got {hx.dim() - 1}-D tensor")
        w = self._parameters["weight_ih"]
        if torch.is_autocast_enabled(input.device.type) and input.is_floating_point():
            return
        if input.dtype != w.dtype:
            raise RuntimeError(f"MORNNCell input dtype ({input.dtype}) does not match weight dtype "
                               f"({w.dtype}): convert the input, input.to({w.dtype}), or the module, "
                               f"module.to({input.dtype})")
        if hx.dtype != input.dtype:
            raise RuntimeError(f"MORNNCell hx dtype ({hx.dtype}) does not match input dtype "
                               f"({input.dtype}): hx.to({input.dtype})")

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        return s + (f", nonlinearity={self.nonlinearity!r}, orthogonal_map={self.orthogonal_map!r}, "
                    f"init={self.init!r}")
