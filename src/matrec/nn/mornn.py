"""MORNN: a drop-in ``torch.nn.RNN`` whose recurrent matrices stay orthogonal (SPEC section 2).

Each recurrent matrix is ``W = B @ f(A)``: ``A`` holds the ``H(H-1)/2`` strictly-lower entries of a
skew matrix (the trainable parameter ``weight_hh_l{k}[_reverse]_A``), ``f`` an orthogonal map from
:mod:`matrec.ops.orthogonal`, and ``B`` an orthogonal base (the buffer ``..._base``). Every
``refold_every`` training forwards the base absorbs ``f(A)`` (``B <- polar(B f(A))``, ``A <- 0``):
``A`` stays small, where the maps are most accurate, and the polar step (float64) removes the
rounding a long product of bases would accumulate ("dynamic trivialisation"). ``W`` is built once per
forward, in float32 (float64 for float64 modules) even under autocast, and ``weight_hh_l{k}`` reads as
that matrix, so code written against ``nn.RNN`` that inspects weights keeps working.

tanh/relu then run in PyTorch's fused RNN kernel (cuDNN on GPU) with the materialised weights;
modrelu/identity run through :func:`matrec.ops.recurrence.recurrence` (no autograd loop over time).

The recipe that gives memory (copy task; see docs/mornn.md): ``nonlinearity="modrelu"``,
``init="henaff"``, RMSprop or Adam with :func:`mornn_param_groups` (orthogonal parameters at 1/10 of
the learning rate), gradient clipping at 1.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..ops.orthogonal import (ORTHOGONAL_MAPS, lower_numel, lower_to_square, orthogonal_from,
                              orthogonality_error, project_orthogonal)
from ..ops.recurrence import NONLINEARITIES, RECURRENCE_BACKENDS, recurrence
from ..registry import Registry

__all__ = ["MORNN", "MORNNCell", "MORNN_INITS", "mornn_param_groups", "orthogonality_report"]

# Nonlinearities with a fused PyTorch kernel; the others go through ops.recurrence.
_FUSED = {"tanh": (_VF.rnn_tanh, _VF.rnn_tanh_cell), "relu": (_VF.rnn_relu, _VF.rnn_relu_cell)}

MORNN_INITS: Registry = Registry("MORNN initialisation", argument="init")


def _rotation_blocks(angles: Tensor, n: int) -> Tensor:
    """Block-diagonal ``[n, n]`` with 2x2 rotations by ``angles [n // 2]`` (a 1 last when n is odd)."""
    W = torch.eye(n, dtype=angles.dtype, device=angles.device)
    c, s = angles.cos(), angles.sin()
    i = torch.arange(0, 2 * (n // 2), 2, device=angles.device)
    W[i, i], W[i, i + 1], W[i + 1, i], W[i + 1, i + 1] = c, -s, s, c
    return W


@MORNN_INITS.register("henaff")
def henaff_init(n: int, dtype=torch.float64, device=None) -> Tensor:
    """Henaff et al. 2016: 2x2 rotation blocks with angles uniform in [-pi, pi]."""
    return _rotation_blocks(torch.empty(n // 2, dtype=dtype, device=device).uniform_(-math.pi, math.pi), n)


@MORNN_INITS.register("cayley")
def cayley_init(n: int, dtype=torch.float64, device=None) -> Tensor:
    """scoRNN's Cayley init: ``cayley(A)``, A 2x2 skew blocks with entries ``tan(t/2)``, t ~ U[0, pi/2]
    (the Cayley map of such a block is a rotation by t: near-identity, slowly mixing dynamics)."""
    t = torch.empty(n // 2, dtype=dtype, device=device).uniform_(0, math.pi / 2)
    A = torch.zeros(n, n, dtype=dtype, device=device)
    i = torch.arange(0, 2 * (n // 2), 2, device=device)
    A[i + 1, i] = torch.tan(t / 2)  # strictly lower entry; the map skews it
    return orthogonal_from(A, "cayley")


@MORNN_INITS.register("random")
def random_init(n: int, dtype=torch.float64, device=None) -> Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, dtype=dtype, device=device))
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


@MORNN_INITS.register("identity")
def identity_init(n: int, dtype=torch.float64, device=None) -> Tensor:
    """The identity: every state is kept as is until training moves W."""
    return torch.eye(n, dtype=dtype, device=device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _OrthogonalRecurrent(nn.Module):
    """Shared machinery: orthogonal weights ``name`` = ``name_base @ f(name_A)``, read as ``name``."""

    _orthogonal_names: list[str]

    def _init_orthogonal(self, orthogonal_map: str, init: str, refold_every: int) -> None:
        ORTHOGONAL_MAPS.get(orthogonal_map)  # ValueError naming orthogonal_map
        MORNN_INITS.get(init)                # ValueError naming init
        if not isinstance(refold_every, int) or isinstance(refold_every, bool) or refold_every < 0:
            raise ValueError(f"refold_every must be an int >= 0 (0: never), got {refold_every!r}")
        self.orthogonal_map, self.init, self.refold_every = orthogonal_map, init, refold_every
        self._orthogonal_names = []
        self._forwards = 0
        self.register_load_state_dict_post_hook(_reproject_after_load)

    def _add_orthogonal(self, name: str, n: int, factory: dict) -> None:
        self.register_parameter(f"{name}_A", nn.Parameter(torch.zeros(lower_numel(n), **factory)))
        self.register_buffer(f"{name}_base", torch.eye(n, **factory))
        self._orthogonal_names.append(name)

    @torch.no_grad()
    def _reset_orthogonal(self) -> None:
        make = MORNN_INITS.get(self.init)
        for name in self._orthogonal_names:
            base = getattr(self, f"{name}_base")
            base.copy_(make(base.shape[0], dtype=torch.float64, device=base.device))
            getattr(self, f"{name}_A").zero_()

    def orthogonal_weight(self, name: str) -> Tensor:
        """The current orthogonal ``[H, H]`` matrix ``base @ f(A)`` (differentiable in A)."""
        A = self._parameters[f"{name}_A"]
        base = self._buffers[f"{name}_base"]
        n = base.shape[0]
        cdt = _compute_dtype(A.dtype)
        # Built once per forward, in float32/64 whatever autocast says: bf16 would break orthogonality.
        with torch.autocast(A.device.type, enabled=False):
            # a copy of the base, so a refold (in place) while this graph is alive cannot invalidate it
            W = base.to(cdt, copy=True) @ orthogonal_from(lower_to_square(A.to(cdt), n),
                                                          self.orthogonal_map)
        # A half-precision module gets a rounded W (its kernels need one dtype); under autocast the
        # parameters stay float32 and so does W.
        return W.to(A.dtype)

    @torch.no_grad()
    def refold(self) -> None:
        """Fold ``f(A)`` into the base and zero ``A``; re-project the base (polar, float64)."""
        for name in self._orthogonal_names:
            A = self._parameters[f"{name}_A"]
            base = self._buffers[f"{name}_base"]
            W = base.double() @ orthogonal_from(lower_to_square(A.double(), base.shape[0]),
                                                self.orthogonal_map)
            if not torch.isfinite(W).all():
                # else the SVD below fails with a message that names neither the cause nor the tensor
                raise RuntimeError(f"cannot refold {name}: {name}_A holds non-finite values (a diverged "
                                   f"optimiser step?); the base is left unchanged")
            base.copy_(project_orthogonal(W))
            A.zero_()

    def _maybe_refold(self) -> None:
        # Inside torch.compile a Python counter would recompile every call; compiled training loops
        # call refold() themselves (orthogonality does not depend on it, only A's size does).
        if torch.compiler.is_compiling():
            return
        if self.training and self.refold_every and torch.is_grad_enabled():
            self._forwards += 1
            if self._forwards % self.refold_every == 0:
                self.refold()

    # The refold counter travels in the state dict (as a tensor, so safetensors can hold it): a
    # resumed run then refolds at the same steps as an uninterrupted one.
    def get_extra_state(self) -> Tensor:
        return torch.tensor(self._forwards, dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        self._forwards = int(state)

    def __getattr__(self, name: str):
        # weight_hh_l0 & co. are not stored; they read as the current orthogonal matrix.
        if name in self.__dict__.get("_orthogonal_names", ()):
            return self.orthogonal_weight(name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        # Assigning would store a plain attribute that shadows the computed matrix, and the forward
        # would then run with a matrix that need not be orthogonal.
        if name in self.__dict__.get("_orthogonal_names", ()):
            raise AttributeError(f"{name} is computed as {name}_base @ f({name}_A) and cannot be assigned; "
                                 f"to set it to an orthogonal W: {name}_base.copy_(W), {name}_A.zero_() "
                                 f"(under torch.no_grad), or build the module with MORNN.from_rnn")
        super().__setattr__(name, value)


def _reproject_after_load(module: _OrthogonalRecurrent, incompatible_keys) -> None:
    # A loaded base may come from another precision or a hand-edited file: make it exactly orthogonal.
    # One that already is (our own checkpoints) is kept bit for bit, so a resumed run is exact:
    # projection leaves a base within ~16 eps of orthogonal (measured up to n = 512), hence 32 eps.
    with torch.no_grad():
        for name in module._orthogonal_names:
            base = module._buffers[f"{name}_base"]
            if orthogonality_error(base) > 32 * torch.finfo(base.dtype).eps:
                base.copy_(project_orthogonal(base))


def _check_sizes(input_size, hidden_size, bias, batch_first=False):
    if not isinstance(bias, bool):
        raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
    if not isinstance(input_size, int) or isinstance(input_size, bool):
        raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
    if input_size <= 0:
        raise ValueError("input_size must be greater than zero")
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool):
        raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
    if hidden_size <= 0:
        raise ValueError("hidden_size must be greater than zero")


class MORNN(_OrthogonalRecurrent):
    r"""Multi-layer Elman RNN ``h_t = phi(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` with every
    ``W_hh`` orthogonal. Same constructor, forward and parameter names as :class:`torch.nn.RNN`.

    Args (as ``nn.RNN``): input_size, hidden_size, num_layers=1, nonlinearity="tanh" (also
        "modrelu", "identity"), bias=True, batch_first=False, dropout=0.0, bidirectional=False,
        device, dtype.
    Keyword-only:
        orthogonal_map: "cayley" (default: a linear solve; forward+backward 7x cheaper than "expm"
            at H = 256 and 11x at H = 512 on one CPU thread, docs/mornn.md), "expm" or "householder" (``matrec.ORTHOGONAL_MAPS``). All are exact
            to rounding; the refolded base lets even Cayley reach every rotation.
        init: initial recurrent matrices, one of ``MORNN_INITS``: "henaff" (default), "cayley",
            "random", "identity".
        refold_every: fold ``A`` into the base every this many training forwards (0: never).
        recurrence_backend: for modrelu/identity, ``matrec.ops.recurrence.RECURRENCE_BACKENDS``
            ("auto", "torch", "loop", "chunked", "triton"; "loop" is the autograd reference,
            "chunked" identity only); tanh/relu always use PyTorch's fused kernel.

    Parameters: ``weight_ih_l{k}[_reverse]``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` exactly as nn.RNN;
    ``weight_hh_l{k}_A`` (``[H(H-1)/2]``) replaces the trainable ``weight_hh_l{k}``, which is read-only
    and computed; buffers ``weight_hh_l{k}_base`` (``[H, H]``); with modrelu, ``modrelu_bias_l{k}``
    (``[H]``). The state dict is exact (A and base), so save/load round-trips bit for bit.

    Shapes (as nn.RNN): input ``[T, B, I]`` (``[B, T, I]`` batch_first), ``[T, I]`` unbatched, or a
    PackedSequence; hx ``[L * D, B, H]`` (``[L * D, H]`` unbatched). Returns ``(output, h_n)``:
    output ``[T, B, D * H]`` (same layout/type as the input), h_n ``[L * D, B, H]``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 orthogonal_map: str = "cayley", init: str = "henaff", refold_every: int = 100,
                 recurrence_backend: str = "auto") -> None:
        super().__init__()
        NONLINEARITIES.get(nonlinearity)  # ValueError naming nonlinearity
        if recurrence_backend != "auto":
            RECURRENCE_BACKENDS.get(recurrence_backend)
        self.recurrence_backend = recurrence_backend
        _check_sizes(input_size, hidden_size, bias, batch_first)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool):
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
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        self._layer_names: list[tuple[str, ...]] = []  # per (layer, direction): the weights, in _VF order
        for layer in range(num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                in_size = input_size if layer == 0 else hidden_size * D
                self.register_parameter(f"weight_ih{sfx}", nn.Parameter(torch.empty(hidden_size, in_size, **factory)))
                self._add_orthogonal(f"weight_hh{sfx}", hidden_size, factory)
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
                if bias:
                    for b in ("bias_ih", "bias_hh"):
                        self.register_parameter(f"{b}{sfx}", nn.Parameter(torch.empty(hidden_size, **factory)))
                    names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
                if nonlinearity == "modrelu":
                    self.register_parameter(f"modrelu_bias{sfx}", nn.Parameter(torch.empty(hidden_size, **factory)))
                self._layer_names.append(tuple(names))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.RNN's U(-1/sqrt(H), 1/sqrt(H)) for input weights and biases; ``init`` for W_hh;
        modReLU biases U(-0.01, 0.01) (near-identity activation at the start)."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("modrelu_bias"):
                nn.init.uniform_(p, -0.01, 0.01)
            elif not name.endswith("_A"):
                nn.init.uniform_(p, -stdv, stdv)
        self._reset_orthogonal()

    def flatten_parameters(self) -> None:
        """No-op kept for nn.RNN compatibility (the recurrent weights are rebuilt every forward)."""

    @classmethod
    def from_rnn(cls, rnn: nn.RNN, **kwargs) -> "MORNN":
        """An MORNN with ``rnn``'s configuration and weights, each recurrent matrix replaced by its
        nearest orthogonal matrix (polar factor). Extra keyword arguments go to the constructor."""
        if not isinstance(rnn, nn.RNN):
            raise TypeError(f"rnn must be a torch.nn.RNN, got {type(rnn).__name__}")
        w = rnn.weight_ih_l0
        m = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.nonlinearity, rnn.bias,
                rnn.batch_first, rnn.dropout, rnn.bidirectional, device=w.device, dtype=w.dtype, **kwargs)
        with torch.no_grad():
            for name, p in rnn.named_parameters():
                if name.startswith("weight_hh"):
                    m._buffers[f"{name}_base"].copy_(project_orthogonal(p))
                    m._parameters[f"{name}_A"].zero_()
                else:
                    m._parameters[name].copy_(p)
        return m.train(rnn.training)

    def to_rnn(self) -> nn.RNN:
        """An ``nn.RNN`` holding the current weights (tanh/relu only)."""
        if self.nonlinearity not in _FUSED:
            raise ValueError(f"to_rnn needs nonlinearity 'tanh' or 'relu', got {self.nonlinearity!r}")
        w = self.weight_ih_l0
        rnn = nn.RNN(self.input_size, self.hidden_size, self.num_layers, self.nonlinearity, self.bias,
                     self.batch_first, self.dropout, self.bidirectional, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for name, p in rnn.named_parameters():
                p.copy_(getattr(self, name))
        return rnn.train(self.training)

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """As ``nn.RNN.all_weights``: per (layer, direction) ``[w_ih, w_hh, (b_ih, b_hh)]``, ``w_hh``
        the current orthogonal matrix."""
        return self._weights()

    def _weights(self) -> list[list[Tensor]]:
        """Per (layer, direction): [w_ih, W_hh, (b_ih, b_hh)] with W_hh materialised once."""
        return [[getattr(self, n) for n in names] for names in self._layer_names]

    def _modrelu_biases(self) -> list[Tensor | None]:
        if self.nonlinearity != "modrelu":
            return [None] * len(self._layer_names)
        return [self._parameters["modrelu_bias" + names[0][len("weight_ih"):]] for names in self._layer_names]

    def _check_input(self, input: Tensor, batch_sizes) -> None:
        w = self.weight_ih_l0
        if not input.is_floating_point():
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}); "
                             f"MORNN needs floating inputs: input.to({w.dtype})")
        if input.dtype != w.dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                             f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})")
        expected = 2 if batch_sizes is not None else 3
        if input.dim() != expected:
            raise RuntimeError(f"input must have {expected} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.size(-1)}")

    def forward(self, input, hx: Tensor | None = None):
        """See the class docstring for shapes."""
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
        expected_hx = (self.num_layers * D, max_batch, self.hidden_size)
        if hx is None:
            hx = ref.new_zeros(expected_hx)
        elif tuple(hx.shape) != expected_hx:
            raise RuntimeError(f"Expected hidden size {expected_hx}, got {list(hx.shape)}")
        elif hx.dtype != ref.dtype and not torch.is_autocast_enabled(ref.device.type):
            # nn.RNN refuses this inside its kernel; the modrelu/identity recurrence would cast silently
            raise RuntimeError(f"hx must have the input's dtype {ref.dtype}, got {hx.dtype}")

        self._maybe_refold()
        weights = self._weights()
        if self.nonlinearity in _FUSED:
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
    T, B = x.shape[:2]
    t = torch.arange(T, device=x.device).unsqueeze(1)       # [T, 1]
    L = lengths.to(x.device).unsqueeze(0)                    # [1, B]
    idx = torch.where(t < L, L - 1 - t, t)                   # [T, B]
    return x.gather(0, idx.unsqueeze(-1).expand_as(x))


def rnn_layers(x: Tensor, hx: Tensor, weights: list[list[Tensor]], modrelu_biases: list[Tensor | None],
               nonlinearity: str, *, num_layers: int, bidirectional: bool, dropout: float = 0.0,
               lengths: Tensor | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Stacked (bi)directional RNN on padded time-major ``x [T, B, I]`` via :func:`recurrence`.

    ``weights[layer * D + d] = [w_ih, W_hh, (b_ih, b_hh)]``; ``hx [L * D, B, H]``; ``lengths [B]``
    (CPU int, original batch order) when sequences are padded. Returns ``(output [T, B, D * H],
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
            h = recurrence(xp, W, hx[k], modrelu_biases[k], nonlinearity, backend=backend)  # [T, B, H]
            last = h[-1] if lengths is None else h[lengths.to(h.device) - 1, torch.arange(B, device=h.device)]
            h_n.append(last)
            outs.append(_reverse_padded(h, lengths) if d == 1 else h)
        layer_in = torch.cat(outs, dim=-1) if D == 2 else outs[0]  # [T, B, D * H]
        if dropout > 0 and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, torch.stack(h_n)


class MORNNCell(_OrthogonalRecurrent):
    """One step ``h' = phi(W_ih x + b_ih + W_hh h + b_hh)`` with ``W_hh`` orthogonal; mirrors
    :class:`torch.nn.RNNCell` (input ``[B, I]`` or ``[I]``, hx ``[B, H]`` or ``[H]`` -> ``h'``).

    Keyword-only extras and parameter naming as :class:`MORNN` (``weight_hh`` reads as the matrix,
    ``weight_hh_A`` / ``weight_hh_base`` store it, ``modrelu_bias`` for modrelu). ``refold_every``
    counts calls, i.e. time steps when the cell is driven in a loop. A refold in mid-sequence keeps
    the outputs (to rounding), but the gradient then sums terms taken before and after it, w.r.t.
    two parametrisations of ``W`` (they agree only to first order in ``A``'s size): for the exact
    gradient, pass ``refold_every=0`` and call :meth:`refold` between optimiser steps.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, orthogonal_map: str = "cayley", init: str = "henaff",
                 refold_every: int = 100) -> None:
        super().__init__()
        NONLINEARITIES.get(nonlinearity)
        _check_sizes(input_size, hidden_size, bias)
        self.input_size, self.hidden_size, self.bias, self.nonlinearity = input_size, hidden_size, bias, nonlinearity
        self._init_orthogonal(orthogonal_map, init, refold_every)
        factory = {"device": device, "dtype": dtype}
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
        self.reset_parameters()

    reset_parameters = MORNN.reset_parameters

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        if not input.is_floating_point():
            raise ValueError(f"MORNNCell input must be floating point, got {input.dtype}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(-1)} expected {self.input_size}")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        hx = input.new_zeros(input.size(0), self.hidden_size) if hx is None else (hx if batched else hx.unsqueeze(0))
        if hx.shape != (input.size(0), self.hidden_size):
            raise RuntimeError(f"Expected hidden size {(input.size(0), self.hidden_size)}, got {list(hx.shape)}")
        self._maybe_refold()
        W = self.weight_hh
        if self.nonlinearity in _FUSED:
            h = _FUSED[self.nonlinearity][1](input, hx, self.weight_ih, W, self.bias_ih, self.bias_hh)
        else:
            z = F.linear(input, self.weight_ih, self.bias_ih) + F.linear(hx, W.to(hx.dtype), self.bias_hh)
            phi = NONLINEARITIES.get(self.nonlinearity)
            h = phi.forward(z, getattr(self, "modrelu_bias", None))
        return h if batched else h.squeeze(0)


# ---------------------------------------------------------------------------------------------
# Training helpers: work on any model that contains MORNN / MORNNCell modules.
# ---------------------------------------------------------------------------------------------

def mornn_param_groups(model: nn.Module, lr: float, *, orthogonal_lr: float | None = None,
                       orthogonal_scale: float = 0.1, **group_kwargs) -> list[dict]:
    """Optimiser param groups: every orthogonal parameter (``*_A``) at ``orthogonal_lr`` (default
    ``orthogonal_scale * lr``, 1/10 as in the orthogonal-RNN literature) with no weight decay, all
    other trainable parameters at ``lr`` with ``group_kwargs`` (e.g. weight_decay). Empty groups are
    left out. Each group has a ``"name"`` ("orthogonal" / "other") for logging.

    Example::

        opt = torch.optim.RMSprop(mornn_param_groups(model, 1e-3))
    """
    if not isinstance(lr, numbers.Real) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    orth_lr = lr * orthogonal_scale if orthogonal_lr is None else orthogonal_lr
    if not isinstance(orth_lr, numbers.Real) or orth_lr <= 0:
        raise ValueError(f"orthogonal_lr must be a positive number, got {orth_lr!r}")
    orth_ids = {id(m._parameters[f"{n}_A"]) for m in model.modules()
                if isinstance(m, _OrthogonalRecurrent) for n in m._orthogonal_names}
    orth, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (orth if id(p) in orth_ids else other).append(p)
    groups = []
    if other:
        groups.append({"params": other, "lr": lr, "name": "other", **group_kwargs})
    if orth:
        groups.append({"params": orth, "lr": orth_lr, "name": "orthogonal", "weight_decay": 0.0})
    return groups


@torch.no_grad()
def orthogonality_report(model: nn.Module) -> dict[str, float]:
    """Flat ``{key: float}`` for training logs, per MORNN layer and direction of ``model``:
    ``"{module}.{weight_hh_lK}/orth_error"`` (max ``|W^T W - I|``), ``.../grad_norm`` (of its ``A``)
    and ``"{module}.{param}/grad_norm"`` for its other parameters (where a gradient exists)."""
    report: dict[str, float] = {}
    for mname, m in model.named_modules():
        if not isinstance(m, _OrthogonalRecurrent):
            continue
        prefix = f"{mname}." if mname else ""
        for name in m._orthogonal_names:
            report[f"{prefix}{name}/orth_error"] = float(orthogonality_error(m.orthogonal_weight(name).double()))
        for pname, p in m.named_parameters(recurse=False):
            if p.grad is not None:
                key = pname[:-2] if pname.endswith("_A") else pname
                report[f"{prefix}{key}/grad_norm"] = float(p.grad.norm())
    return report
