"""The MRU scan as an export-only form: the definition (:mod:`.naive`, ``H_t = H_{t-1} M_t``) run
by :func:`matrec.ops.time_scan.time_scan`, so it exports with a dynamic length, with a padding mask.
Inference only; what ``matrec.export`` puts in an exported graph."""
from __future__ import annotations

from torch import Tensor

from ..time_scan import keep_where, time_scan


def mru_scan_form(states: Tensor, initial_state: Tensor, mask: Tensor | None = None,
                  unrolled: bool = False) -> tuple[Tensor, Tensor]:
    """``states [B, h, T, d, d]``, ``initial_state [B, h, d, d]``, ``mask [B, T]`` (bool, optional:
    unset steps leave ``H`` unchanged). Returns ``(H [B, h, T, d, d], H_T [B, h, d, d])``."""
    M = states.permute(2, 0, 1, 3, 4)  # [T, B, h, d, d]

    def step(H, x):
        M_t, m = x
        new = H @ M_t
        H = new if m is None else keep_where(m, new, H)
        return H, H

    if mask is None:
        H_T, H = time_scan(lambda H, M_t: step(H, (M_t, None)), initial_state, M, unrolled=unrolled)
    else:
        H_T, H = time_scan(step, initial_state, (M, mask.t()), unrolled=unrolled)
    return H.permute(1, 2, 0, 3, 4), H_T
