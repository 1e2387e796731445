"""Orthogonal maps and initial matrices in ``keras.ops`` (any Keras backend), the same math as
:mod:`matrec.ops.orthogonal` and :data:`matrec.nn.mornn.MORNN_INITS`.

Every map reads the ``n(n-1)/2`` strictly-lower entries of an ``n x n`` matrix, in the row-major
order of ``numpy.tril_indices(n, -1)`` (the order ``torch.tril_indices`` uses), so a vector ``A``
means the same matrix here and in the PyTorch layer, and ``A = 0`` gives exactly the identity.
"""
from __future__ import annotations

import math

import numpy as np
from keras import ops

# "expm" is left out on purpose: keras.ops has no matrix exponential, and a truncated series would
# only be orthogonal to its truncation error, not to rounding.
KERAS_ORTHOGONAL_MAPS = ("cayley", "householder")
KERAS_MORNN_INITS = ("henaff", "cayley", "random", "identity")


def matmul2d(a, b):
    """``a @ b`` for 2-D ``a``, ``b`` in their dtype (keras's torch backend computes a float64
    ``ops.matmul`` in float32; its einsum keeps float64)."""
    return ops.einsum("ij,jk->ik", a, b)


def lower_numel(n: int) -> int:
    """Number of strictly-lower-triangular entries of an ``n x n`` matrix."""
    return n * (n - 1) // 2


def _lower_index(n: int) -> np.ndarray:
    """``[n, n]`` int32: 1 + the position in ``A`` of each strictly-lower entry, 0 elsewhere."""
    idx = np.zeros((n, n), dtype=np.int32)
    rows, cols = np.tril_indices(n, -1)
    idx[rows, cols] = np.arange(1, rows.size + 1, dtype=np.int32)
    return idx


def lower_to_square(A, n: int):
    """``A [n(n-1)/2]`` -> ``[n, n]`` with ``A`` in the strictly lower triangle, zeros elsewhere.

    A gather (not a scatter), so the backward is a cheap segment sum on every backend.
    """
    padded = ops.concatenate([ops.zeros((1,), dtype=A.dtype), A])  # [1 + n(n-1)/2]; slot 0 is the zero
    return ops.take(padded, _lower_index(n))                        # [n, n]


def cayley(L):
    """``(I - S)^-1 (I + S)`` with ``S = L - L^T`` (``L [n, n]`` strictly lower), formed as
    ``2 (I - S)^-1 - I`` (the same matrix, since ``(I - S)^-1 (I + S) = (I - S)^-1 (2I - (I - S))``):
    an inverse's backward is two matmuls where a solve's is another solve."""
    S = L - ops.transpose(L)
    eye = ops.eye(L.shape[-1], dtype=L.dtype)
    return 2.0 * ops.inv(eye - S) - eye


def householder(L):
    """``-(H_1 ... H_n)``, ``H_k = I - tau_k v_k v_k^T``, ``v_k`` the k-th column of ``V = I + L``,
    ``tau_k = 2 / |v_k|^2`` (as ``matrec.ops.orthogonal.householder``).

    The product is formed at once in compact WY form, ``H_1 ... H_n = I - V T^-1 V^T`` with
    ``T = triu(V^T V, 1) + diag(V^T V) / 2`` (Joffrain et al. 2006), one triangular solve instead
    of ``n`` dependent rank-1 updates.
    """
    n = L.shape[-1]
    eye = ops.eye(n, dtype=L.dtype)
    V = eye + L                                             # [n, n], unit lower triangular
    G = matmul2d(ops.transpose(V), V)                     # [n, n]
    T = ops.triu(G, 1) + eye * G / 2                        # [n, n] upper triangular
    return matmul2d(V, ops.solve_triangular(T, ops.transpose(V), lower=False)) - eye


_MAPS = {"cayley": cayley, "householder": householder}


def orthogonal_from(A, n: int, orthogonal_map: str):
    """The orthogonal ``[n, n]`` matrix ``f(A)`` for ``A [n(n-1)/2]``."""
    return _MAPS[orthogonal_map](lower_to_square(A, n))


def polar(W):
    """Nearest orthogonal matrix to ``W [n, n]`` (the polar factor ``U V^T``), in ``W``'s dtype."""
    U, _, Vh = ops.svd(W)
    return matmul2d(U, Vh)


def orthogonality_error_np(W) -> float:
    """``max |W^T W - I|`` of a matrix, in float64 numpy."""
    W = np.asarray(W, dtype=np.float64)
    return float(np.abs(W.T @ W - np.eye(W.shape[0])).max())


def project_orthogonal_np(W) -> np.ndarray:
    """Polar factor of ``W`` in float64 numpy."""
    U, _, Vh = np.linalg.svd(np.asarray(W, dtype=np.float64))
    return U @ Vh


def _rotation_blocks(angles: np.ndarray, n: int) -> np.ndarray:
    W = np.eye(n)
    c, s = np.cos(angles), np.sin(angles)
    i = np.arange(0, 2 * (n // 2), 2)
    W[i, i], W[i, i + 1], W[i + 1, i], W[i + 1, i + 1] = c, -s, s, c
    return W


def initial_matrix(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """The float64 ``[n, n]`` orthogonal start of ``W_hh`` for ``recurrent_init=name``.

    henaff: 2x2 rotations by angles ~ U[-pi, pi]; cayley: the Cayley map of 2x2 skew blocks
    ``tan(t/2)``, t ~ U[0, pi/2], which is the rotation by t; random: Haar (QR of a Gaussian, signs
    fixed); identity.
    """
    if name == "henaff":
        return _rotation_blocks(rng.uniform(-math.pi, math.pi, n // 2), n)
    if name == "cayley":
        return _rotation_blocks(rng.uniform(0.0, math.pi / 2, n // 2), n)
    if name == "random":
        Q, R = np.linalg.qr(rng.standard_normal((n, n)))
        return Q * np.sign(np.diagonal(R))[None, :]
    if name == "identity":
        return np.eye(n)
    raise ValueError(f"recurrent_init must be one of {KERAS_MORNN_INITS}, got {name!r}")
