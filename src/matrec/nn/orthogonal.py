"""The orthogonal parametrisation behind MORNN and MORNNCell: ``W = base @ f(A)``.

``A`` holds the ``H(H-1)/2`` strictly-lower entries of a skew matrix (the trainable parameter
``{name}_A``), ``f`` an orthogonal map from :mod:`matrec.ops.orthogonal`, and ``base`` an orthogonal
buffer (``{name}_base``). :class:`OrthogonalRecurrent` owns everything about such matrices and
nothing about recurrences: building them (float32/64 even under autocast), keeping the built matrix
while no gradient is needed, taking over in-place writes to what ``module.{name}`` handed out,
refolding ``f(A)`` into the base, freezing, dtype conversion and pickling. The layers
(:mod:`matrec.nn.mornn`) add parameters around it and run the recurrence.

Kept matrices and optimisers: autograd's version counters see every optimiser step except fused
kernels' (``torch.optim.Adam(fused=True)`` bumps none). :func:`track_optimizer_steps` is the
explicit opt-in that makes such steps visible too; the Trainer calls it for its optimiser. Nothing
is installed on import.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from ..checks import check_int, check_type
from ..ops.orthogonal import (ORTHOGONAL_MAPS, lower_numel, lower_to_square, orthogonal_from,
                              orthogonality_error, project_orthogonal)
from ..ops.precision import compute_dtype
from ..registry import Registry

__all__ = ["MORNN_INITS", "OrthogonalMatrixProperty", "OrthogonalRecurrent", "track_optimizer_steps"]

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


# -- optimiser steps (opt-in) ------------------------------------------------------------------

# Bumped by the hooks track_optimizer_steps installs; part of every kept matrix's key.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


def track_optimizer_steps(optimizer: torch.optim.Optimizer | None = None) -> RemovableHandle:
    """Opt in: after every step of ``optimizer`` (of every optimiser in the process when None),
    MORNN / MORNNCell rebuild their kept recurrent matrices at their next no-grad forward.

    Needed only for optimisers that change parameters without bumping autograd's version counters
    (fused kernels: ``torch.optim.Adam(fused=True)``) when no-grad forwards run between a backward
    and the next step; every other change is seen without it. The :class:`matrec.train.Trainer`
    calls it for its optimiser. Returns the hook's handle (``.remove()`` opts out again).
    """
    if optimizer is None:
        return register_optimizer_step_post_hook(_count_optimizer_step)
    check_type("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer", allow_none=True)
    return optimizer.register_step_post_hook(_count_optimizer_step)


# -- reading and writing the matrix ------------------------------------------------------------

class OrthogonalMatrixProperty:
    """A class attribute that reads as an orthogonal matrix of the module (``MORNNCell.weight_hh``).

    Reading gives the current orthogonal ``[H, H]`` matrix ``base @ f(A)`` (differentiable in ``A``
    when autograd needs it). Writing in place to what was read, e.g. ``nn.init.orthogonal_(m.weight_hh)``
    or ``m.weight_hh.data.copy_(W)``, sets the matrix to the polar factor of the written one (the
    nearest orthogonal matrix) at the module's next use: forward, a read, ``state_dict``, ``refold``.
    Assigning a new tensor is refused: it would not be a parameter of the module. Names that depend
    on the instance (MORNN's ``weight_hh_l{k}[_reverse]``) read the same way through
    :meth:`OrthogonalRecurrent.__getattr__`; no instance adds attributes to its class.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"The current orthogonal recurrent matrix {name} [H, H] (computed; see the class)."

    def __get__(self, module, owner=None):
        if module is None:
            return self
        return module._read_matrix(self.name)

    def __set__(self, module, value) -> None:
        raise AttributeError(_assignment_message(self.name))


def _assignment_message(name: str) -> str:
    return (f"{name} is computed as {name}_base @ f({name}_A) and cannot be assigned (the assigned tensor "
            f"would not be the module's parameter); write the matrix in place instead, it is projected "
            f"onto the orthogonal group: `with torch.no_grad(): module.{name}.copy_(W)`")


class _HandedOut:
    """A matrix that ``module.{name}`` handed out, watched for in-place writes.

    Held strongly until the module's next use (``m.weight_hh_l0.data.copy_(X)`` drops the tensor at
    once, and its write must not be lost with it), weakly after: a reader who still holds it may
    still write to it, one who dropped it cannot. Compared bit for bit to a copy, since writes
    through ``.data`` leave the version counter as it was.
    """

    __slots__ = ("strong", "ref", "version", "ptr", "snapshot")

    def __init__(self, W: Tensor) -> None:
        self.strong: Tensor | None = W
        self.ref = weakref.ref(W)
        self._remember(W)

    def _remember(self, W: Tensor) -> None:
        self.version, self.ptr, self.snapshot = W._version, W.data_ptr(), W.detach().clone()

    def take_write(self) -> Tensor | None:
        """The written values (a detached alias) if the tensor changed since last seen, else None;
        then lets go of the strong reference."""
        W = self.strong if self.strong is not None else self.ref()
        self.strong = None
        if W is None:
            return None
        if W._version == self.version and W.data_ptr() == self.ptr and _same_bits(W.detach(), self.snapshot):
            return None
        self._remember(W)
        return W.detach()

    def held(self) -> bool:
        """Whether anyone besides this record still references the tensor."""
        return self.strong is not None or self.ref() is not None


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (NaN equals NaN), so a write of non-finite values is reported once."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _reproject_if_needed(base: Tensor) -> None:
    # One that already is orthogonal (our own checkpoints) is kept bit for bit, so a resumed run is
    # exact: projection leaves a base within ~16 eps of orthogonal (measured up to n = 512), hence 32.
    if base.numel() and orthogonality_error(base) > 32 * torch.finfo(base.dtype).eps:
        base.copy_(project_orthogonal(base))


def _reproject_after_load(module: "OrthogonalRecurrent", incompatible_keys) -> None:
    # A loaded base may come from another precision or a hand-edited file: make it exactly orthogonal.
    with torch.no_grad():
        for name in module._orthogonal_names:
            _reproject_if_needed(module._base(name))
    module._matrix_cache.clear()


def _take_writes_before_save(module: "OrthogonalRecurrent", prefix, keep_vars) -> None:
    module._take_writes()


class OrthogonalRecurrent(nn.Module):
    """A module with orthogonal matrices ``name`` = ``name_base @ f(name_A)``, each read as
    ``module.name`` (see :class:`OrthogonalMatrixProperty`). Subclasses call
    :meth:`_init_orthogonal` first, then :meth:`_add_orthogonal` per matrix."""

    _orthogonal_names: list[str]

    def _init_orthogonal(self, orthogonal_map: str, init: str, refold_every: int) -> None:
        ORTHOGONAL_MAPS.get(orthogonal_map)  # ValueError naming orthogonal_map
        MORNN_INITS.get(init)                # ValueError naming init
        check_int("refold_every", refold_every, 0)   # 0: never
        self.orthogonal_map, self.init, self.refold_every = orthogonal_map, init, refold_every
        self._orthogonal_names = []
        self._forwards = 0
        self._reset_caches()
        self.register_load_state_dict_post_hook(_reproject_after_load)
        self.register_state_dict_pre_hook(_take_writes_before_save)

    def _reset_caches(self) -> None:
        # name -> (key, W): the matrix built while no gradient was needed, reused while key holds
        self._matrix_cache: dict[str, tuple[tuple, Tensor]] = {}
        # name -> the matrices weight_hh_l{k} handed out, watched for in-place writes
        self._handed_out: dict[str, list[_HandedOut]] = {}

    def _add_orthogonal(self, name: str, n: int, factory: dict) -> None:
        self.register_parameter(f"{name}_A", nn.Parameter(torch.zeros(lower_numel(n), **factory)))
        self.register_buffer(f"{name}_base", torch.eye(n, **factory))
        self._orthogonal_names.append(name)

    def _A(self, name: str) -> Tensor:
        return self._parameters[f"{name}_A"]

    def _base(self, name: str) -> Tensor:
        return self._buffers[f"{name}_base"]

    def orthogonal_parameters(self) -> dict[str, nn.Parameter]:
        """``{matrix name: its trainable A}`` (what an optimiser should step at the orthogonal rate)."""
        return {name: self._A(name) for name in self._orthogonal_names}

    # -- the matrices as attributes ---------------------------------------------------------------

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: a matrix whose name depends on the instance
        if name in self.__dict__.get("_orthogonal_names", ()):
            return self._read_matrix(name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get("_orthogonal_names", ()):
            raise AttributeError(_assignment_message(name))
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param) -> None:
        # `module.weight_hh_l0 = nn.Parameter(W)` lands here (nn.Module.__setattr__) for class properties
        if name in self.__dict__.get("_orthogonal_names", ()):
            raise AttributeError(_assignment_message(name))
        super().register_parameter(name, param)

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
        """``module.{name}`` as read: the current matrix, watched for in-place writes."""
        W = self.orthogonal_weight(name)
        if W.grad_fn is None:
            W = W.clone()  # never hand out the kept matrix itself
        self._handed_out.setdefault(name, []).append(_HandedOut(W))
        return W

    def _take_writes(self) -> None:
        """Take over every in-place write to a matrix handed out by ``module.{name}``."""
        for name, entries in list(self._handed_out.items()):
            written = None
            for entry in entries:
                W = entry.take_write()
                if W is not None:
                    written = W  # the last write wins, as it would on a plain parameter
            kept = [entry for entry in entries if entry.held()]
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

    def maybe_refold(self) -> None:
        """Count one training forward and refold every ``refold_every`` of them: what every driver
        of the layer's weights (its own forwards, the mixer's masked/packed path) calls first."""
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
