"""Export-safe linear algebra: the primitives of the MRU's constructions and the orthogonal maps,
made of elementwise ops, matmuls, static indexing and loops unrolled over the (small, static) order.

``torch.export`` -> ONNX / ExecuTorch has no translation for ``linalg.solve``, ``slogdet``,
``matrix_exp`` or ``householder_product``. The constructions of :mod:`.state_matrix` and the maps of
:mod:`.orthogonal` take their primitive as an argument, so each registered construction carries its
export-safe form (``StateMatrix.export``) as the same function with a primitive from here; the forms
agree with the references up to float rounding. Inference only (what ``matrec.export`` puts in a
graph); training uses the references, whose gradients come from torch.linalg.

| primitive            | form here                                                          |
|----------------------|--------------------------------------------------------------------|
| solve, log abs det   | Gauss-Jordan elimination with partial pivoting done by masks       |
| matrix_exp           | scaling and squaring: Taylor degree 12 at 1-norm <= 1, up to 20 masked squarings |
| householder_product  | the reflections applied one by one                                 |
| scatter into tril    | static slices and concatenation                                    |
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["solve", "logabsdet", "matrix_exp", "householder_product", "lower_to_square", "EXPM_MAX_SQUARINGS"]

# matrix_exp: Taylor degree 12 on a matrix of 1-norm <= 1 leaves a remainder below e/13! ~ 4e-10,
# far under float32 rounding; the 1-norm is brought there by 2^-s with s computed per matrix, and s
# masked squarings undo it. A loop's count must be static to export, so the form always runs
# EXPM_MAX_SQUARINGS steps and squares only while a step's index is below s: accurate for 1-norms up
# to 2^20 (beyond, s is clamped and the Taylor series is evaluated too far out). The reference
# (torch.linalg.matrix_exp) also scales and squares, so both lose accuracy alike as the norm grows.
_EXPM_DEGREE = 12
EXPM_MAX_SQUARINGS = 20


def _eliminate(M: Tensor, B: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """Gauss-Jordan on ``[M | B]`` (``M [..., d, d]``, ``B [..., d, m]``): ``(M^-1 B, pivots [..., d])``.

    Partial pivoting as LAPACK's getrf does it (the first row of largest magnitude at or below the
    diagonal), chosen by argmax and swapped with ``where`` masks (exact), since the matrices met
    here need it: ``I - A`` with ``A`` skew is never singular, but without pivoting its multipliers
    are the entries of ``A`` (its first pivot is 1), unbounded; the ``scaled`` and ``ldu_ns``
    matrices are general (a zero leading entry is possible)."""
    d = M.shape[-1]
    aug = M if B is None else torch.cat((M, B), dim=-1)  # [..., d, d + m]
    rows = torch.arange(d, device=M.device)
    pivots = []
    for k in range(d):
        col = aug[..., :, k].abs().masked_fill(rows < k, -1.0)  # [..., d]; rows above k are done
        is_p = (rows == col.argmax(dim=-1, keepdim=True))[..., :, None]  # [..., d, 1]
        row_p = torch.where(is_p, aug, 0.0).sum(dim=-2, keepdim=True)  # [..., 1, d + m], exact
        row_k = aug[..., k:k + 1, :]
        is_k = (rows == k)[:, None]  # [d, 1]
        aug = torch.where(is_k, row_p, torch.where(is_p, row_k, aug))
        pivot = aug[..., k:k + 1, k:k + 1]  # [..., 1, 1]
        row = aug[..., k:k + 1, :] / pivot
        aug = torch.where(is_k, row, aug - aug[..., :, k:k + 1] * row)
        pivots.append(pivot[..., 0, 0])
    return (None if B is None else aug[..., d:]), torch.stack(pivots, dim=-1)


def solve(M: Tensor, B: Tensor) -> Tensor:
    """``M^-1 B`` for ``M [..., d, d]``, ``B [..., d, m]`` (as ``torch.linalg.solve``)."""
    return _eliminate(M, B)[0]


def logabsdet(M: Tensor) -> Tensor:
    """``log |det M|`` ``[...]`` (as ``torch.linalg.slogdet(M).logabsdet``; ``-inf`` if singular)."""
    pivots = _eliminate(M, None)[1]  # [..., d]
    # after an exact zero pivot the later ones are 0/0 = nan; slogdet says -inf
    singular = (pivots == 0).any(dim=-1)
    return torch.where(singular, float("-inf"), pivots.abs().log().sum(dim=-1))


def matrix_exp(A: Tensor) -> Tensor:
    """``exp(A)`` for ``A [..., d, d]`` by scaling and squaring (see ``EXPM_MAX_SQUARINGS``)."""
    norm = A.abs().sum(dim=-2).amax(dim=-1)  # [...], the 1-norm
    # norm 0 gives log2 = -inf, clamped to 0 squarings: exactly the identity at A = 0
    s = torch.ceil(torch.log2(norm)).clamp(0, EXPM_MAX_SQUARINGS)  # [...]
    A = A * torch.pow(2.0, -s)[..., None, None]
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    E = eye
    for j in range(_EXPM_DEGREE, 0, -1):  # Horner: I + A (I + A/2 (I + ... A/12))
        E = eye + (A @ E) / j
    for i in range(EXPM_MAX_SQUARINGS):
        E = torch.where((s > i)[..., None, None], E @ E, E)
    return E


def householder_product(V: Tensor, tau: Tensor) -> Tensor:
    """``H_1 ... H_d``, ``H_k = I - tau_k v_k v_k^T``, ``v_k`` the k-th column of ``V [..., d, d]``
    read as LAPACK's orgqr does (strictly lower part, unit diagonal). As
    ``torch.linalg.householder_product`` for square ``V``."""
    d = V.shape[-1]
    V = V.tril(-1) + torch.eye(d, dtype=V.dtype, device=V.device)
    Q = torch.eye(d, dtype=V.dtype, device=V.device).expand_as(V)
    for k in range(d):
        v = V[..., :, k:k + 1]  # [..., d, 1]
        Q = Q - (tau[..., k, None, None] * (Q @ v)) @ v.mT
    return Q


def lower_to_square(x: Tensor, d: int) -> Tensor:
    """:func:`matrec.ops.orthogonal.lower_to_square` without index assignment or ``tril_indices``
    (not core ATen, so ExecuTorch refuses it): row ``r`` is the next ``r`` entries, then zeros."""
    zeros = x.new_zeros(*x.shape[:-1], d)
    rows, start = [], 0
    for r in range(d):  # tril_indices order: row by row, columns ascending
        rows.append(torch.cat((x[..., start:start + r], zeros[..., r:]), dim=-1))
        start += r
    return torch.stack(rows, dim=-2)  # [..., d, d]
