"""The compute-dtype rule, in one place.

Long products and running sums (the MRU scan, the RNN recurrence, linear attention's state, rotation
angles) are carried in at least float32: float64 stays float64, float32 stays float32, and
bfloat16/float16 inputs are computed in float32 and rounded once on the way out. Half precision
would lose the state after a few hundred steps.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for inputs of ``dtype``: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)
