"""The single-layer RNN recurrence ``h_t = phi(xproj_t + h_{t-1} @ W^T)`` with fused backward.

``naive`` is the definition (the reference), ``nonlinearities`` the one table of phi every backend
uses, ``fused`` the "torch" backend (one op, backward as the reverse recurrence), ``chunked`` the
parallel form of the linear (identity) recurrence, ``triton`` and ``triton_split`` the persistent
kernels (row and column-split; optional dependency, imported on first use), and ``dispatch`` the entry
point :func:`recurrence` with its backend registry.
"""
from .dispatch import RECURRENCE_BACKENDS, RecurrenceBackend, recurrence
from .fused import parameter_grads, register_recurrence_autograd
from .naive import recurrence_reference
from .nonlinearities import NONLINEARITIES, Phi, modrelu

__all__ = ["recurrence", "recurrence_reference", "RECURRENCE_BACKENDS", "RecurrenceBackend",
           "NONLINEARITIES", "Phi", "modrelu", "parameter_grads", "register_recurrence_autograd"]
