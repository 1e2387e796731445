"""Deprecated import path: the layer moved to :mod:`matrec.nn.linear_attention`."""
import warnings

from ..nn.linear_attention import LinearAttention  # noqa: F401

warnings.warn("matrec.models.linear_attention moved to matrec.nn.linear_attention", DeprecationWarning, stacklevel=2)
