"""GPT-2-style initialisation, the hook every layer of a residual stack implements.

A layer used inside :class:`matrec.models.SequenceModel` defines ``init_weights(std, residual_std)``:
its input-side projections get N(0, std), the projection that writes into the residual stream gets
N(0, residual_std) (``std / sqrt(depth)``), so the residual stream's variance does not grow with depth.
"""
from __future__ import annotations

from torch import nn


def init_linear(module: nn.Linear, std: float) -> None:
    """GPT-2 init of one linear layer: weights N(0, std), bias zero."""
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
