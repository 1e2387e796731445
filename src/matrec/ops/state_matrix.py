"""Input-state constructions of the MRU (docs/design.md §3): raw elements ``x [..., n]`` -> ``M [..., d, d]``.

Every construction gives exactly the identity at ``x = 0`` (so a zero-initialised input projection
starts the MRU as the identity recurrence). The orthogonal ones reuse :mod:`matrec.ops.orthogonal`.

| name        | n (elements) | guarantee                               |
|-------------|--------------|-----------------------------------------|
| identity    | d^2          | none                                    |
| scaled      | d^2          | abs(det) = 1                            |
| cayley      | d(d-1)/2     | orthogonal                              |
| expm        | d(d-1)/2     | orthogonal, det 1                       |
| householder | d(d-1)/2     | orthogonal                              |
| cayley_qr   | d^2          | det 1 (rotation times unit-det shear)   |
| ldu         | d^2          | det 1 (default)                         |
| ldu_ns      | d^2          | det 1 up to rounding, closer to orthogonal |

Extend with ``STATE_MATRICES.register("mine", StateMatrix(build=fn, numel=lambda d: ..., export=fn))``
where ``fn(x [..., n], d) -> [..., d, d]``; ``export`` is the construction's export-safe form (what
``matrec.export`` runs, inside :func:`matrec.ops.backends.export_safe`), None when it has none. Every
construction here is its own export-safe form: the linear-algebra primitives they use (``solve``,
``slogdet``, ``matrix_exp``, ``householder_product``) switch to the elementwise ones of
:mod:`.export_linalg` inside ``export_safe()``.

``STATE_NORMALIZATIONS`` holds the normalisations the MRU can apply (``MRU(normalize=...)``), each a
per-token step after the construction and, optionally, the read-out of the state's direction:
``"spectral"`` divides every ``M_t`` by its largest singular value, so every running product has
spectral norm at most 1 (docs/mru.md, "A running product that stays finite"); ``"direction"`` does the
same and reads out ``H_t`` rescaled to the identity's norm, so a carried state cannot fade either
(docs/mru.md, "Reading out the state's direction").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..checks import check_int
from ..registry import Registry
from . import export_linalg
from .backends import NoExportForm, exporting
from .orthogonal import cayley, lower_numel, lower_to_square, orthogonal_from

__all__ = ["STATE_MATRICES", "STATE_NORMALIZATIONS", "StateMatrix", "StateNormalization", "spectral_normalize",
           "state_matrix", "state_matrix_numel"]


@dataclass(frozen=True)
class StateMatrix:
    """A construction: ``build(x [..., numel(d)], d) -> [..., d, d]``, identity at ``x = 0``;
    ``export``: the same map made of export-safe ops (None: the construction cannot be exported)."""

    build: Callable[[Tensor, int], Tensor]
    numel: Callable[[int], int]
    guarantee: str = "none"
    #: every ``M_t`` orthogonal, so every running product too: no growth at any length
    norm_preserving: bool = False
    export: Callable[[Tensor, int], Tensor] | None = None
    #: the smallest order ``d`` at which ``M_t`` depends on its input: a 1 x 1 matrix with
    #: ``|det| = 1`` or orthogonal is +-1 whatever the input (no gradient), so those need ``d >= 2``
    min_order: int = 1


STATE_MATRICES: Registry = Registry("state matrix construction", argument="state_matrix")


def _square(d: int) -> int:
    return d * d


def _eye(x: Tensor, d: int) -> Tensor:
    return torch.eye(d, dtype=x.dtype, device=x.device)


def _block(x: Tensor, d: int) -> Tensor:
    return x.reshape(*x.shape[:-1], d, d)  # [..., d, d]


def _logabsdet(A: Tensor) -> Tensor:
    if exporting():  # slogdet does not export
        return export_linalg.logabsdet(A)
    return torch.linalg.slogdet(A).logabsdet  # [...]; -inf when A is singular (not masked)


def _unit_det(A: Tensor, logabsdet: Callable[[Tensor], Tensor] = _logabsdet) -> Tensor:
    """``A / |det A|^(1/d)``: same matrix up to a positive scale, with ``|det| = 1``."""
    d = A.shape[-1]
    return A * torch.exp(-logabsdet(A) / d)[..., None, None]


def _identity(x: Tensor, d: int) -> Tensor:
    return _block(x, d) + _eye(x, d)


# The constructions built on a linear-algebra primitive take it as an argument (tests pass the
# export-safe ones directly); left default, it switches inside export_safe() by itself.
def _scaled(x: Tensor, d: int, logabsdet: Callable[[Tensor], Tensor] = _logabsdet) -> Tensor:
    return _unit_det(_block(x, d) + _eye(x, d), logabsdet)


def _orthogonal(name: str) -> Callable[[Tensor, int], Tensor]:
    def build(x: Tensor, d: int) -> Tensor:
        return orthogonal_from(lower_to_square(x, d), name)

    build.__name__ = f"_{name}"
    return build


def _unit_diag(X: Tensor) -> Tensor:
    """``exp(diag(X) - mean(diag(X)))`` as ``[..., d]``: positive, product exactly 1 in exact math."""
    diag = X.diagonal(dim1=-2, dim2=-1)
    return torch.exp(diag - diag.mean(dim=-1, keepdim=True))


def _cayley_qr(x: Tensor, d: int, cayley: Callable[[Tensor], Tensor] = cayley) -> Tensor:
    """Cayley rotation of the strict-lower block times ``R`` (strict-upper block, diag ``exp(x - mean)``)."""
    X = _block(x, d)
    Q = cayley(X)  # reads the strictly lower triangle only
    R = X.triu(1) + torch.diag_embed(_unit_diag(X))
    return Q @ R


def _ldu(x: Tensor, d: int) -> Tensor:
    """``(L + D^1/2)(U + D^1/2)``: triangular factors with positive diagonals whose product is 1."""
    X = _block(x, d)
    half = torch.diag_embed(_unit_diag(X).sqrt())  # D^1/2
    return (X.tril(-1) + half) @ (X.triu(1) + half)


def _ldu_ns(x: Tensor, d: int, logabsdet: Callable[[Tensor], Tensor] = _logabsdet) -> Tensor:
    """ldu, then one damped Newton-Schulz step toward orthogonality, rescaled to ``|det| = 1``.

    The step is ``A (I + a/2 (I - A^T A))`` with ``a = 1 / max(1, ||A^T A - I||_F)``: plain
    Newton-Schulz near orthogonal matrices, damped far from them so the factor's eigenvalues stay in
    ``[1/2, 3/2]`` (never singular). At ``A = I`` the correction is exactly zero.
    """
    A = _ldu(x, d)
    E = _eye(A, d) - A.mT @ A  # [..., d, d], symmetric
    # sqrt of a clamped square (not a norm) so the gradient is finite at E = 0
    damp = torch.rsqrt((E * E).sum(dim=(-2, -1)).clamp(min=1.0))[..., None, None]
    return _unit_det(A + 0.5 * damp * (A @ E), logabsdet)


def _construction(build, numel, guarantee, norm_preserving=False, min_order=2) -> StateMatrix:
    # its own export-safe form: its primitives switch inside export_safe(). min_order 2 by default:
    # every construction here but identity constrains |det| or orthogonality (see StateMatrix)
    return StateMatrix(build, numel, guarantee, norm_preserving, export=build, min_order=min_order)


STATE_MATRICES.register("identity", _construction(_identity, _square, "none", min_order=1))
STATE_MATRICES.register("scaled", _construction(_scaled, _square, "|det| = 1"))
STATE_MATRICES.register("cayley", _construction(_orthogonal("cayley"), lower_numel, "orthogonal", True))
STATE_MATRICES.register("expm", _construction(_orthogonal("expm"), lower_numel, "orthogonal, det 1", True))
STATE_MATRICES.register("householder", _construction(_orthogonal("householder"), lower_numel, "orthogonal", True))
STATE_MATRICES.register("cayley_qr", _construction(_cayley_qr, _square, "det 1"))
STATE_MATRICES.register("ldu", _construction(_ldu, _square, "det 1"))
STATE_MATRICES.register("ldu_ns", _construction(_ldu_ns, _square, "det 1, near orthogonal"))


def spectral_normalize(M: Tensor) -> Tensor:
    """``M / sigma_max(M)`` for every matrix of ``M [..., d, d]``: spectral norm 1, same direction.

    A per-token scalar, so a running product of normalised matrices is still a plain matrix product
    (every scan backend computes it exactly) and, the spectral norm being submultiplicative, has
    norm at most 1 at any length. Orthogonal matrices and the identity have ``sigma_max = 1``: they
    are left as they are (up to rounding). ``sigma_max`` comes from the largest eigenvalue of the
    symmetric ``M^T M`` (``eigvalsh``: the gradient of an
    eigenvalue stays finite where it is repeated, as at the identity). A zero matrix gives inf/NaN,
    not a silent fix.
    """
    top = torch.linalg.eigvalsh(M.mT @ M)[..., -1]  # [...], sigma_max^2
    return M * torch.rsqrt(top)[..., None, None]


@dataclass(frozen=True)
class StateNormalization:
    """One entry of ``STATE_NORMALIZATIONS``: ``per_token(M [..., d, d])`` applied to every input
    matrix, and whether the scan's ``H_t`` are read out as directions
    (:func:`matrec.ops.mru_scan.direction_scan`) rather than as they are."""

    per_token: Callable[[Tensor], Tensor]
    direction: bool = False

    def __call__(self, M: Tensor) -> Tensor:
        return self.per_token(M)


STATE_NORMALIZATIONS: Registry[StateNormalization] = Registry("state matrix normalisation", argument="normalize")
STATE_NORMALIZATIONS.register("spectral", StateNormalization(spectral_normalize))
# spectral per token keeps every block's product inside float32; the direction removes the fading
STATE_NORMALIZATIONS.register("direction", StateNormalization(spectral_normalize, direction=True))


def normalize_states(name: str, M: Tensor) -> Tensor:
    """``STATE_NORMALIZATIONS[name](M)``; none has an export-safe form (sigma_max needs an
    eigen-solver, and ONNX has no such operator), so inside ``export_safe()`` a NoExportForm."""
    normalize = STATE_NORMALIZATIONS.get(name)
    if exporting():
        raise NoExportForm(f"normalize={name!r} has no export form (its per-token sigma_max needs an "
                           f"eigen-solver)")
    return normalize(M)


def _check_order(d) -> None:
    check_int("d", d)


def state_matrix_numel(name: str, d: int) -> int:
    """How many raw elements construction ``name`` needs for order ``d`` (the last dim of ``x``)."""
    _check_order(d)
    return STATE_MATRICES.get(name).numel(d)


def state_matrix(name: str, x: Tensor, d: int) -> Tensor:
    """Build input state matrices from raw elements.

    Args:
        name: a construction in :data:`STATE_MATRICES` (see the module table).
        x: ``[..., n]`` raw elements, ``n = state_matrix_numel(name, d)``; floating point.
        d: matrix order.
    Returns:
        ``[..., d, d]`` in the dtype of ``x``; exactly the identity where ``x`` is zero.
    """
    _check_order(d)
    spec = STATE_MATRICES.get(name)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating-point dtype, got {x.dtype}")
    n = spec.numel(d)
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(
            f"x must have shape [..., {n}] for state_matrix={name!r} and d={d}, got {tuple(x.shape)}"
        )
    build = spec.build
    if exporting():
        if spec.export is None:
            raise NoExportForm(f"state_matrix={name!r} has no export form (register it with "
                               f"StateMatrix(..., export=fn), fn made of export-safe ops)")
        build = spec.export
    try:
        return build(x, d)
    except torch.linalg.LinAlgError:
        # the Cayley solve of (I - A): never singular in exact arithmetic, only when x is so large
        # that I vanishes beside A in floating point; say so in terms of the caller's argument
        raise ValueError(
            f"x is too large for state_matrix={name!r} in {x.dtype} (max |x| = "
            f"{float(x.detach().abs().max()):.3g}): the linear solve inside the construction is "
            f"numerically singular; scale x down"
        ) from None
