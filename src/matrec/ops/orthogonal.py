"""Maps from unconstrained parameters to orthogonal matrices, shared by MORNN and the MRU.

Every map takes a square tensor ``X`` of shape ``[..., n, n]`` and reads only its strictly lower
triangle (``n(n-1)/2`` free numbers), so a zero parameter always gives exactly the identity. This is
the one place these maps live: the MRU's ``cayley``/``expm``/``householder`` input states and MORNN's
recurrent matrix both come from here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..registry import Registry
from . import export_linalg
from .backends import exporting

ORTHOGONAL_MAPS: Registry = Registry("orthogonal map", argument="orthogonal_map")
# Each map takes its linear-algebra primitive as an argument. Left None it is torch.linalg's, or,
# inside matrec.ops.backends.export_safe(), the export-safe one of export_linalg.py: so every map
# (and every construction built on one) is its own export-safe form.


def _primitive(name: str) -> Callable:
    if exporting():
        return getattr(export_linalg, name)
    return {"solve": torch.linalg.solve, "matrix_exp": torch.linalg.matrix_exp,
            "householder_product": torch.linalg.householder_product}[name]


def lower_numel(n: int) -> int:
    """Number of strictly-lower-triangular entries of an ``n x n`` matrix."""
    return n * (n - 1) // 2


def lower_to_square(x: Tensor, n: int) -> Tensor:
    """Scatter ``x [..., n(n-1)/2]`` into the strictly lower triangle of zeros ``[..., n, n]``."""
    if x.shape[-1] != lower_numel(n):
        raise ValueError(
            f"expected the last dimension to hold n(n-1)/2 = {lower_numel(n)} entries for n = {n}, "
            f"got {x.shape[-1]}"
        )
    if exporting():  # tril_indices and index assignment do not export
        return export_linalg.lower_to_square(x, n)
    rows, cols = torch.tril_indices(n, n, offset=-1, device=x.device)
    out = x.new_zeros(*x.shape[:-1], n, n)
    out[..., rows, cols] = x
    return out


def skew(X: Tensor) -> Tensor:
    """The skew-symmetric matrix ``L - L^T`` built from the strictly lower triangle ``L`` of ``X``."""
    L = X.tril(-1)
    return L - L.transpose(-1, -2)


def _eye_like(X: Tensor) -> Tensor:
    return torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand_as(X)


@ORTHOGONAL_MAPS.register("expm")
def expm(X: Tensor, matrix_exp: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``exp(A)`` with ``A = skew(X)``: a rotation (det 1)."""
    return (matrix_exp or _primitive("matrix_exp"))(skew(X))


@ORTHOGONAL_MAPS.register("cayley")
def cayley(X: Tensor, solve: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """``(I - A)^-1 (I + A)`` with ``A = skew(X)``; ``I - A`` is invertible for every skew ``A``."""
    A = skew(X)
    eye = _eye_like(A)
    return (solve or _primitive("solve"))(eye - A, eye + A)


@ORTHOGONAL_MAPS.register("householder")
def householder(X: Tensor, householder_product: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Product of ``n`` reflections ``I - tau v v^T``, ``v_k`` the k-th column of ``I + tril(X, -1)``.

    ``tau_k = 2 / ||v_k||^2`` makes each factor an exact reflection. At ``X = 0`` every ``v_k = e_k``
    and the product is ``-I``, so the result is negated (itself a product of reflections) to make a
    zero parameter give the identity, as every map here must.
    """
    V = X.tril(-1) + _eye_like(X)
    tau = 2.0 / (V * V).sum(dim=-2)  # [..., n]: squared norm of each column
    return -(householder_product or _primitive("householder_product"))(V, tau)


def orthogonal_from(X: Tensor, orthogonal_map: str = "expm") -> Tensor:
    """Apply the registered ``orthogonal_map`` to the strictly lower triangle of ``X [..., n, n]``."""
    return ORTHOGONAL_MAPS.get(orthogonal_map)(X)


def project_orthogonal(W: Tensor) -> Tensor:
    """Nearest orthogonal matrix to ``W [..., n, n]`` in Frobenius norm (the polar factor ``U V^T``).

    Computed in float64, since this is what removes accumulated rounding from MORNN's base.
    """
    U, _, Vh = torch.linalg.svd(W.double())
    return (U @ Vh).to(W.dtype)


def orthogonality_error(W: Tensor) -> Tensor:
    """``max |W^T W - I|`` over the last two dims (a tensor of the leading shape)."""
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return (W.transpose(-1, -2) @ W - eye).abs().amax(dim=(-1, -2))
