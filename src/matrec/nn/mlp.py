"""The position-wise feed-forward layer of a Transformer block."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int
from .init import init_linear
from .protocol import StateSpec


class MLP(nn.Module):
    """Position-wise feed-forward ``E -> expansion*E -> E`` with GELU; stateless (state stays None).

    Follows the mixer convention (``forward(x, state) -> (y, None)``), so a layer pattern can hold
    MLP sublayers (``["mru", "mlp"] * 6``) and MLP-only models (``["mlp"] * 4``).

    Shapes: ``x [B, T, E] -> y [B, T, E]``.
    """

    def __init__(self, d_model: int, *, n_heads: int | None = None, dropout: float = 0.0,
                 expansion: int = 4, bias: bool = True) -> None:
        super().__init__()
        check_int("d_model", d_model)
        check_int("expansion", expansion)
        self.fc = nn.Linear(d_model, expansion * d_model, bias=bias)
        self.residual_proj = nn.Linear(expansion * d_model, d_model, bias=bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.fc, std)
        init_linear(self.residual_proj, residual_std)

    def state_spec(self) -> list[StateSpec]:
        """No state."""
        return []

    def forward(self, x: Tensor, state=None, *, mask: Tensor | None = None,
                starts: Tensor | None = None) -> tuple[Tensor, None]:
        return self.residual_proj(F.gelu(self.fc(x))), None
