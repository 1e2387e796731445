"""Deprecated import path: the Triton recurrence moved to :mod:`matrec.ops.rnn_recurrence.triton`."""
import warnings

from .rnn_recurrence.triton import MAX_HIDDEN, compile_report, config_for, triton_recurrence  # noqa: F401

warnings.warn("matrec.ops.triton_recurrence moved to matrec.ops.rnn_recurrence.triton", DeprecationWarning,
              stacklevel=2)
