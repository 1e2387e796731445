"""MORNN: a drop-in ``torch.nn.RNN`` whose recurrent matrices stay orthogonal.

Each recurrent matrix is ``W = B @ f(A)``: ``A`` holds the ``H(H-1)/2`` strictly-lower entries of a
skew matrix (the trainable parameter ``weight_hh_l{k}[_reverse]_A``), ``f`` an orthogonal map from
:mod:`matrec.ops.orthogonal`, and ``B`` an orthogonal base (the buffer ``..._base``). Every
``refold_every`` training forwards the base absorbs ``f(A)`` (``B <- polar(B f(A))``, ``A <- 0``):
``A`` stays small, where the maps are most accurate, and the polar step (float64) removes the
rounding a long product of bases would accumulate ("dynamic trivialisation").

``weight_hh_l{k}`` is a property per layer (:class:`OrthogonalMatrixProperty`) that reads as the
current matrix, so code written against ``nn.RNN`` that inspects weights keeps working; an in-place
write to what it returns (``.copy_``, ``.data.copy_``, ``nn.init.*``, through ``all_weights``) is
taken over: the written matrix is projected onto the orthogonal group and becomes the new base.

``W`` is built in float32 (float64 for float64 modules) even under autocast. While no gradient has
to reach ``A`` (``torch.no_grad``, inference mode, or :meth:`freeze`), the built matrix is kept and
reused until ``A`` or the base changes: autograd's version counters, the storage, an optimiser step
anywhere and a state-dict load all invalidate it (a write through ``.data`` to ``A`` or the base is
the one change they cannot see; docs/mornn.md, "Inference").

modrelu/identity run through :func:`matrec.ops.recurrence.recurrence` (no autograd loop over time);
so do tanh/relu on CPU where its compiled loop ("cpp") builds, and elsewhere they run in PyTorch's
fused RNN kernel (cuDNN on GPU) with the materialised weights.

The recipe that gives memory (copy task; see docs/mornn.md): ``nonlinearity="modrelu"``,
``init="henaff"``, RMSprop or Adam with :func:`mornn_param_groups` (orthogonal parameters at 1/10 of
the learning rate), gradient clipping at 1.
"""
from __future__ import annotations

import math
import numbers
import warnings
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..checks import check_int, check_positive, check_type
from ..ops.orthogonal import (ORTHOGONAL_MAPS, lower_numel, lower_to_square, orthogonal_from,
                              orthogonality_error, project_orthogonal)
from ..ops.precision import compute_dtype
from ..ops.rnn_recurrence import NONLINEARITIES, RECURRENCE_BACKENDS, recurrence
from ..ops.rnn_recurrence.cpp import cpp_available, cpp_layers_forward, cpp_supports
from ..registry import Registry

__all__ = ["MORNN", "MORNNCell", "MORNN_INITS", "OrthogonalMatrixProperty", "mornn_param_groups",
           "orthogonality_report"]

# Nonlinearities with a fused PyTorch kernel; the others go through ops.recurrence.
_FUSED = {"tanh": (_VF.rnn_tanh, _VF.rnn_tanh_cell), "relu": (_VF.rnn_relu, _VF.rnn_relu_cell)}

MORNN_INITS: Registry = Registry("MORNN initialisation", argument="init")

# Optimisers step anywhere in the process -> cached matrices are rebuilt. Version counters alone
# miss fused optimiser kernels (torch.optim.Adam(fused=True) does not bump them).
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


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


class _Layer(NamedTuple):
    """Parameter names of one layer and direction, as nn.RNN names them (None: not present)."""

    weight_ih: str
    weight_hh: str            # the orthogonal matrix: stored as f"{weight_hh}_A" and f"{weight_hh}_base"
    bias_ih: str | None
    bias_hh: str | None
    modrelu_bias: str | None


class OrthogonalMatrixProperty:
    """The class attribute behind ``weight_hh_l{k}[_reverse]`` (MORNN) and ``weight_hh`` (MORNNCell).

    Reading gives the current orthogonal ``[H, H]`` matrix ``base @ f(A)`` (differentiable in ``A``
    when autograd needs it). Writing in place to what was read, e.g. ``nn.init.orthogonal_(m.weight_hh_l0)``
    or ``m.weight_hh_l0.data.copy_(W)``, sets the matrix to the polar factor of the written one (the
    nearest orthogonal matrix) at the module's next use: forward, a read, ``state_dict``, ``refold``.
    Assigning a new tensor is refused: it would not be a parameter of the module.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"The current orthogonal recurrent matrix {name} [H, H] (computed; see the class)."

    def __get__(self, module, owner=None):
        if module is None:
            return self
        if self.name not in module.__dict__.get("_orthogonal_names", ()):
            raise AttributeError(f"'{type(module).__name__}' object has no attribute '{self.name}'")
        return module._read_matrix(self.name)

    def __set__(self, module, value) -> None:
        raise AttributeError(_assignment_message(self.name))


def _assignment_message(name: str) -> str:
    return (f"{name} is computed as {name}_base @ f({name}_A) and cannot be assigned (the assigned tensor "
            f"would not be the module's parameter); write the matrix in place instead, it is projected "
            f"onto the orthogonal group: `with torch.no_grad(): module.{name}.copy_(W)`")


class _OrthogonalRecurrent(nn.Module):
    """Shared machinery: orthogonal weights ``name`` = ``name_base @ f(name_A)``, read as ``name``."""

    _orthogonal_names: list[str]
    _layers: list[_Layer]

    def _init_orthogonal(self, orthogonal_map: str, init: str, refold_every: int) -> None:
        ORTHOGONAL_MAPS.get(orthogonal_map)  # ValueError naming orthogonal_map
        MORNN_INITS.get(init)                # ValueError naming init
        check_int("refold_every", refold_every, 0)   # 0: never
        self.orthogonal_map, self.init, self.refold_every = orthogonal_map, init, refold_every
        self._orthogonal_names = []
        self._layers = []
        self._forwards = 0
        self._reset_caches()
        self.register_load_state_dict_post_hook(_reproject_after_load)
        self.register_state_dict_pre_hook(_take_writes_before_save)

    def _reset_caches(self) -> None:
        # name -> (key, W): the matrix built while no gradient was needed, reused while key holds
        self._matrix_cache: dict[str, tuple[tuple, Tensor]] = {}
        # name -> [(a tensor handed out by weight_hh_l{k}, its version, data_ptr, a copy)]
        self._handed_out: dict[str, list[tuple]] = {}

    def _add_orthogonal(self, name: str, n: int, factory: dict) -> None:
        self.register_parameter(f"{name}_A", nn.Parameter(torch.zeros(lower_numel(n), **factory)))
        self.register_buffer(f"{name}_base", torch.eye(n, **factory))
        self._orthogonal_names.append(name)

    def _A(self, name: str) -> Tensor:
        return self._parameters[f"{name}_A"]

    def _base(self, name: str) -> Tensor:
        return self._buffers[f"{name}_base"]

    def register_parameter(self, name: str, param) -> None:
        # `module.weight_hh_l0 = nn.Parameter(W)` lands here (nn.Module.__setattr__), not in the property
        if name in self.__dict__.get("_orthogonal_names", ()):
            raise AttributeError(_assignment_message(name))
        super().register_parameter(name, param)

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

    @torch.no_grad()
    def _reset_orthogonal(self) -> None:
        make = MORNN_INITS.get(self.init)
        for name in self._orthogonal_names:
            base = self._base(name)
            base.copy_(make(base.shape[0], dtype=torch.float64, device=base.device))
            self._A(name).zero_()

    # -- building the matrix ------------------------------------------------------------------

    def _build(self, A: Tensor, base: Tensor) -> Tensor:
        n = base.shape[0]
        cdt = compute_dtype(A.dtype)
        # In float32/64 whatever autocast says: bf16 would break orthogonality.
        with torch.autocast(A.device.type, enabled=False):
            # a copy of the base, so a refold (in place) while this graph is alive cannot invalidate it
            W = base.to(cdt, copy=True) @ orthogonal_from(lower_to_square(A.to(cdt), n), self.orthogonal_map)
        # A half-precision module gets a rounded W (its kernels need one dtype); under autocast the
        # parameters stay float32 and so does W.
        return W.to(A.dtype)

    def orthogonal_weight(self, name: str) -> Tensor:
        """The current orthogonal ``[H, H]`` matrix ``base @ f(A)``: differentiable in ``A`` when
        autograd needs it, else the kept matrix while ``A`` and the base are unchanged."""
        A, base = self._parameters[f"{name}_A"], self._buffers[f"{name}_base"]
        if torch.compiler.is_compiling():
            return self._build(A, base)
        if self._handed_out:
            self._take_writes()
        if A.requires_grad and torch.is_grad_enabled():
            # A training forward: parameters may have been changed behind the version counters
            # (`p.data -= lr * p.grad` loops), so nothing built before it is reused after it.
            if self._matrix_cache:
                self._matrix_cache.clear()
            return self._build(A, base)
        key = (A._version, base._version, A.data_ptr(), base.data_ptr(), A.dtype, base.dtype, A.device,
               _optimizer_steps[0])
        kept = self._matrix_cache.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even inside inference_mode
            W = self._build(A, base)
        self._matrix_cache[name] = (key, W)
        return W

    # -- the matrix as users read and write it -------------------------------------------------

    def _read_matrix(self, name: str) -> Tensor:
        """``weight_hh_l{k}`` as read: the current matrix, watched for in-place writes."""
        W = self.orthogonal_weight(name)
        if W.grad_fn is None:
            W = W.clone()  # never hand out the kept matrix itself
        # Kept until the module's next use after the reader drops W, since `m.weight_hh_l0.data.copy_(X)`
        # (or `.data = X`) drops it at once and its write must not be lost with it; with a copy to
        # compare to, since writes through `.data` leave the version counter as it was.
        self._handed_out.setdefault(name, []).append((W, W._version, W.data_ptr(), W.detach().clone()))
        return W

    def _take_writes(self) -> None:
        """Take over every in-place write to a matrix handed out by ``weight_hh_l{k}``."""
        for name, entries in list(self._handed_out.items()):
            written, kept = None, []
            for entry in entries:
                held = _held_elsewhere(entry)
                W, version, ptr, snapshot = entry
                if W._version != version or W.data_ptr() != ptr or not _same_bits(W.detach(), snapshot):
                    written = W
                    version, ptr, snapshot = W._version, W.data_ptr(), W.detach().clone()
                if held:
                    kept.append((W, version, ptr, snapshot))
            if kept:
                self._handed_out[name] = kept
            else:
                del self._handed_out[name]
            if written is not None:
                self._set_matrix(name, written, written_in_place=True)

    @torch.no_grad()
    def _set_matrix(self, name: str, W: Tensor, written_in_place: bool = False) -> None:
        """Make ``name`` the nearest orthogonal matrix to ``W`` (polar factor, float64): base <- it, A <- 0."""
        base = self._base(name)
        what = f"the matrix written in place to {name}" if written_in_place else f"the matrix given for {name}"
        outcome = f"; the write is discarded and {name} keeps its value" if written_in_place else ""
        if W.shape != base.shape:
            raise ValueError(f"{what} must be [H, H] = {list(base.shape)}, got {list(W.shape)}{outcome}")
        W64 = W.detach().to(device=base.device, dtype=torch.float64)
        if not torch.isfinite(W64).all():
            raise ValueError(f"{what} holds non-finite values{outcome}")
        if W64.numel():
            s = torch.linalg.svdvals(W64)  # [H], descending
            if s[-1] <= s[0] * W64.shape[0] * torch.finfo(torch.float64).eps:
                raise ValueError(f"{what} is singular (rank {int((s > s[0] * 1e-12).sum())} < "
                                 f"{W64.shape[0]}), so it has no nearest orthogonal matrix{outcome}")
        base.copy_(project_orthogonal(W64))
        self._A(name).zero_()

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

    # -- training-time maintenance --------------------------------------------------------------

    @torch.no_grad()
    def refold(self) -> None:
        """Fold ``f(A)`` into the base and zero ``A``; re-project the base (polar, float64)."""
        self._take_writes()
        for name in self._orthogonal_names:
            A, base = self._A(name), self._base(name)
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
        if self.training and self.refold_every and torch.is_grad_enabled() and self._trains_matrices():
            self._forwards += 1
            if self._forwards % self.refold_every == 0:
                self.refold()

    def _trains_matrices(self) -> bool:
        return any(self._parameters[f"{name}_A"].requires_grad for name in self._orthogonal_names)

    def freeze(self):
        """Stop training the recurrent matrices (``*_A`` stop requiring grad): every forward then
        reuses the built matrices until a parameter changes, as under ``torch.no_grad``. Drops the
        matrices kept so far (a write through ``.data`` to ``*_A`` is seen from here). Returns self."""
        for name in self._orthogonal_names:
            self._A(name).requires_grad_(False)
        self._matrix_cache.clear()
        return self

    def unfreeze(self):
        """Undo :meth:`freeze`: the recurrent matrices train again. Returns self."""
        for name in self._orthogonal_names:
            self._A(name).requires_grad_(True)
        self._matrix_cache.clear()
        return self

    # The refold counter travels in the state dict (as a tensor, so safetensors can hold it): a
    # resumed run then refolds at the same steps as an uninterrupted one.
    def get_extra_state(self) -> Tensor:
        return torch.tensor(self._forwards, dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        self._forwards = int(state)

    def _apply(self, fn, recurse=True):
        self._take_writes()
        dtypes = {name: self._base(name).dtype for name in self._orthogonal_names}
        super()._apply(fn, recurse)
        self._matrix_cache.clear()
        with torch.no_grad():
            for name in self._orthogonal_names:
                base = self._base(name)
                # A base orthogonal to float32 rounding is not to float64's: `.double()` re-projects
                # it, so the float64 bound holds from the first forward on (to_empty keeps the dtype).
                if base.dtype != dtypes[name] and base.device.type != "meta":
                    _reproject_if_needed(base)
        return self

    def __getstate__(self):
        state = super().__getstate__()
        del state["_matrix_cache"], state["_handed_out"]  # rebuilt on use
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._reset_caches()
        self._declare_matrices()

    def _declare_matrices(self) -> None:
        """Install the class's :class:`OrthogonalMatrixProperty` for each matrix name it lacks."""


def _references(entry: tuple) -> int:
    return sys.getrefcount(entry[0])


# what _references counts for an object that only its entry holds (how many references the call
# itself adds is the interpreter's business, so it is measured)
_REFS_OF_AN_UNHELD_ENTRY = _references((object(),))


def _held_elsewhere(entry: tuple) -> bool:
    """Whether anything besides ``entry`` references ``entry[0]`` (a reader who may still write to it)."""
    return _references(entry) > _REFS_OF_AN_UNHELD_ENTRY


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (NaN equals NaN), so a write of non-finite values is reported once."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _reproject_if_needed(base: Tensor) -> None:
    # One that already is orthogonal (our own checkpoints) is kept bit for bit, so a resumed run is
    # exact: projection leaves a base within ~16 eps of orthogonal (measured up to n = 512), hence 32.
    if base.numel() and orthogonality_error(base) > 32 * torch.finfo(base.dtype).eps:
        base.copy_(project_orthogonal(base))


def _reproject_after_load(module: _OrthogonalRecurrent, incompatible_keys) -> None:
    # A loaded base may come from another precision or a hand-edited file: make it exactly orthogonal.
    with torch.no_grad():
        for name in module._orthogonal_names:
            _reproject_if_needed(module._base(name))
    module._matrix_cache.clear()


def _take_writes_before_save(module: _OrthogonalRecurrent, prefix, keep_vars) -> None:
    module._take_writes()


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


class MORNN(_OrthogonalRecurrent):
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
        recurrence_backend: ``matrec.ops.recurrence.RECURRENCE_BACKENDS`` ("auto", "torch", "loop",
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
        self._declare_matrices()
        self.reset_parameters()

    def _declare_matrices(self) -> None:
        # On MORNN itself (subclasses inherit it); which names exist depends on num_layers/bidirectional.
        for name in self._orthogonal_names:
            if not isinstance(MORNN.__dict__.get(name), OrthogonalMatrixProperty):
                setattr(MORNN, name, OrthogonalMatrixProperty(name))

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
        expected_hx = (self.num_layers * D, max_batch, self.hidden_size)
        if hx is None:
            hx = ref.new_zeros(expected_hx)
        elif hx.shape != expected_hx:
            raise RuntimeError(f"Expected hidden size {expected_hx}, got {list(hx.shape)}")
        elif hx.dtype != ref.dtype and not torch.is_autocast_enabled(ref.device.type):
            # nn.RNN refuses this inside its kernel; the modrelu/identity recurrence would cast silently
            raise RuntimeError(f"hx must have the input's dtype {ref.dtype}, got {hx.dtype}")

        if self.training:
            self._maybe_refold()
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


class MORNNCell(_OrthogonalRecurrent):
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
            self._maybe_refold()
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
    lr = check_positive("lr", lr)   # NaN and inf refused too: they would train nothing, silently
    orth_lr = check_positive("orthogonal_lr", lr * check_positive("orthogonal_scale", orthogonal_scale)
                             if orthogonal_lr is None else orthogonal_lr)
    orth_ids = {id(m._A(n)) for m in model.modules()
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
        # an orthogonal matrix's gradient is reported under the matrix's name, not its parameter's
        matrix_of = {id(m._A(name)): name for name in m._orthogonal_names}
        for name in m._orthogonal_names:
            report[f"{prefix}{name}/orth_error"] = float(orthogonality_error(m.orthogonal_weight(name).double()))
        for pname, p in m.named_parameters(recurse=False):
            if p.grad is not None:
                report[f"{prefix}{matrix_of.get(id(p), pname)}/grad_norm"] = float(p.grad.norm())
    return report
