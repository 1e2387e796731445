"""Causal linear attention as an export-only form: the recurrent definition (:mod:`.naive`) run by
:func:`matrec.ops.time_scan.time_scan`, so it exports with a dynamic length, with a padding mask.
Inference only; what ``matrec.export`` puts in an exported graph."""
from __future__ import annotations

from torch import Tensor

from ..time_scan import keep_where, time_scan


def linear_attention_scan(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float,
                          mask: Tensor | None = None, unrolled: bool = False):
    """Features ``q, k`` and values ``v [B, H, T, D]``, state ``S [B, H, D, D]``, ``z [B, H, D]``,
    ``mask [B, T]`` (bool, optional: unset steps leave the state unchanged). Returns ``(y [B, H, T, D], S, z)``."""
    xs = tuple(t.permute(2, 0, 1, 3) for t in (q, k, v))  # [T, B, H, D] each

    def step(carry, x):
        S, z = carry
        q_t, k_t, v_t, m = x
        S_new = S + k_t[..., :, None] * v_t[..., None, :]  # [B, H, D, D]
        z_new = z + k_t
        if m is not None:
            S_new, z_new = keep_where(m, S_new, S), keep_where(m, z_new, z)
        num = (q_t[..., :, None] * S_new).sum(-2)  # [B, H, D]
        den = (q_t * z_new).sum(-1, keepdim=True)  # [B, H, 1]
        return (S_new, z_new), num / (den + eps)

    if mask is None:
        (S, z), y = time_scan(lambda c, x: step(c, (*x, None)), (S, z), xs, unrolled=unrolled)
    else:
        (S, z), y = time_scan(step, (S, z), (*xs, mask.t()), unrolled=unrolled)
    return y.permute(1, 2, 0, 3), S, z
