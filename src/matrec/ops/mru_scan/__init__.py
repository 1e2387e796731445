"""The MRU scan ``H_t = H_{t-1} @ M_t``: every prefix product of a sequence of square matrices.

``naive`` is the definition (the reference every backend is tested against), ``patterns`` the
parallel scan patterns, ``scan`` the entry
point :func:`mru_scan` with its backends (the parallel patterns and the shared autograd), ``triton``
the fused kernel (optional dependency, imported on first use), ``direction`` the same scan read out
as directions (every ``H_t`` rescaled; the MRU's ``normalize="direction"``).
"""
from .direction import DIRECTION_BLOCK, direction_scan, naive_direction_scan
from .scan import SCAN_BACKENDS, ScanBackend, auto_backend, mru_scan, naive_mru_scan

__all__ = ["mru_scan", "naive_mru_scan", "SCAN_BACKENDS", "ScanBackend", "auto_backend",
           "direction_scan", "naive_direction_scan", "DIRECTION_BLOCK"]
