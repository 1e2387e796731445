"""Deprecated import path: the layer moved to :mod:`matrec.nn.attention`."""
import warnings

from ..nn.attention import CausalSelfAttention, MRURotaryAttention, rotate_chunks  # noqa: F401

warnings.warn("matrec.models.attention moved to matrec.nn.attention", DeprecationWarning, stacklevel=2)
