"""Deprecated import path: the layer moved to :mod:`matrec.nn.positional`."""
import warnings

from ..nn.positional import POSITIONS, NoPosition, Rotary, XPos  # noqa: F401

warnings.warn("matrec.models.positional moved to matrec.nn.positional", DeprecationWarning, stacklevel=2)
