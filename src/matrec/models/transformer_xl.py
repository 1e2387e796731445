"""Deprecated import path: the layer moved to :mod:`matrec.nn.transformer_xl`."""
import warnings

from ..nn.transformer_xl import TransformerXLAttention, sinusoid  # noqa: F401

warnings.warn("matrec.models.transformer_xl moved to matrec.nn.transformer_xl", DeprecationWarning, stacklevel=2)
