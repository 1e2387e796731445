"""Causal linear attention (Katharopoulos et al. 2020) as a recurrence over a ``[D, D]`` state.

``naive`` is the definition, step by step (the reference, and what single-token generation runs);
``chunked`` the training form; ``scan`` the definition's step in PyTorch's scan op (the export-safe
form). All take features ``q, k [B, H, T, D]`` (the feature map already applied), values
``v [B, H, T, D]``, the state ``S [B, H, D, D]``, ``z [B, H, D]`` and return ``(y [B, H, T, D], S, z)``.
"""
from __future__ import annotations

import torch

from ..backends import BackendRegistry
from .chunked import chunked_form
from .naive import recurrent_form, scan_form


def _auto_rule(device: torch.device, *, T: int) -> str:
    # one step (generation) is the recurrence itself; anything longer is cheaper in chunks
    return "recurrent" if T == 1 else "chunked"


LINEAR_ATTENTION_FORMS: BackendRegistry = BackendRegistry("linear attention form", argument="form",
                                                          auto=_auto_rule, export_safe="scan")
LINEAR_ATTENTION_FORMS.register("recurrent", recurrent_form)
LINEAR_ATTENTION_FORMS.register("chunked", chunked_form)
# the definition's step in PyTorch's scan op (a dynamic length under torch.export): the export path
LINEAR_ATTENTION_FORMS.register("scan", scan_form)

__all__ = ["LINEAR_ATTENTION_FORMS", "recurrent_form", "chunked_form", "scan_form"]
