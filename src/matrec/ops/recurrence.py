"""Deprecated import path: the recurrence moved to :mod:`matrec.ops.rnn_recurrence`."""
from .rnn_recurrence import (NONLINEARITIES, RECURRENCE_BACKENDS, Phi, modrelu,  # noqa: F401
                             parameter_grads, recurrence, recurrence_reference,
                             register_recurrence_autograd)
