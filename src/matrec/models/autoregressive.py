"""A linear autoregression on the recent window, as a registered model: the baseline a
practitioner fits first. Like :mod:`.seasonal`, it goes through the trainer and the experiment
report beside the trained sequence models; its carried state is the last ``window`` inputs, so
chunk boundaries do not shorten its window, but it sees nothing older than ``window`` steps.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_int
from .registry import MODELS


class LinearAR(nn.Module):
    """``y_t = sum_k weight[f, k] * x_{t - window + 1 + k}[f] + bias[f]``: the forecast of each
    feature's next value from its own last ``window`` values (per feature, as the seasonal-naive).

    Weights start at 0 (the forecast is ``bias``, the mean once trained); training fits them by
    least squares through the task's MSE. Before ``window`` steps of history the missing past
    reads as 0. Shapes: ``x [B, T, F]``, state (the last ``window`` inputs) ``[B, window, F]``,
    output ``[B, T, F]``.
    """

    def __init__(self, *, input_size: int, output_size: int, window: int) -> None:
        super().__init__()
        check_int("input_size", input_size)
        check_int("window", window)
        if output_size != input_size:
            raise ValueError(f"output_size must equal input_size ({input_size}) for linear_ar (it "
                             f"forecasts each feature from its own past), got {output_size}")
        self.window, self.input_size = window, input_size
        self.weight = nn.Parameter(torch.zeros(input_size, window))
        self.bias = nn.Parameter(torch.zeros(input_size))

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must be features [B, T, {self.input_size}], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, T, F = x.shape
        W = self.window
        if state is None:
            state = x.new_zeros(B, W, F)
        elif state.shape != (B, W, F):
            raise ValueError(f"state must be the last window inputs [{B}, {W}, {F}], got {tuple(state.shape)}")
        history = torch.cat([state.to(x.dtype), x], dim=1)          # [B, W + T, F]
        windows = history[:, 1:].unfold(1, W, 1)                     # [B, T, F, W]: x_{t-W+1} .. x_t
        out = (windows * self.weight.to(x.dtype)).sum(-1) + self.bias.to(x.dtype)
        return out, history[:, -W:]


def linear_ar(*, vocab_size=None, input_size=None, output_size, window: int):
    """The ``build_model`` factory of :class:`LinearAR` (features only)."""
    if vocab_size is not None:
        raise ValueError(f"linear_ar forecasts feature inputs (input_size), not token ids (vocab_size={vocab_size})")
    return LinearAR(input_size=input_size, output_size=output_size, window=window)


MODELS.register("linear_ar", linear_ar)
