"""The single-layer RNN recurrence ``h_t = phi(xproj_t + h_{t-1} @ W^T)`` with fused backward.

``dispatch`` holds the entry point :func:`recurrence` and its backend registry; ``triton`` the persistent kernels
(optional dependency, imported on first use).
"""
from .dispatch import (NONLINEARITIES, RECURRENCE_BACKENDS, Phi, modrelu, parameter_grads,
                         recurrence, recurrence_reference, register_recurrence_autograd)

__all__ = ["recurrence", "recurrence_reference", "RECURRENCE_BACKENDS", "NONLINEARITIES", "Phi",
           "modrelu", "parameter_grads", "register_recurrence_autograd"]
