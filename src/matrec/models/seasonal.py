"""The seasonal-naive forecaster: the value one period ago, as a registered model.

It is a model (not a separate evaluation routine) so that it goes through exactly the path the
trained models go through — the stream task's chunks, the state carried from chunk to chunk, the
trainer's evaluation, the run directory and the experiment report — and so can sit in an experiment
grid beside them. Its carried state is the last ``period`` inputs, which is what lets it look back
across chunk boundaries to lags far longer than one chunk.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_int
from .registry import MODELS


class SeasonalNaive(nn.Module):
    """``y_t = gain * x_{t + 1 - period} + bias``: the forecast of ``x_{t+1}`` is the value
    ``period`` steps before it (per feature).

    ``gain`` (init 1) and ``bias`` (init 0), one per feature, are its only parameters: at their
    initial values this is the textbook seasonal-naive forecast; ``fit=True`` lets training fit
    them (least squares on the lagged value, what a practitioner would do), ``fit=False`` keeps them
    fixed. Before ``period`` steps of history the missing past reads as 0 (the mean of a
    standardised series).

    Args:
        input_size: features per step ``F`` (token inputs have no lag to repeat: features only).
        output_size: must equal ``input_size``.
        period: the lag in steps, >= 1 (1: the last value, "persistence").
        fit: whether ``gain`` and ``bias`` are trained.

    Shapes: ``x [B, T, F]``, state (the last ``period`` inputs) ``[B, period, F]``, output
    ``[B, T, F]``.
    """

    def __init__(self, *, input_size: int, output_size: int, period: int, fit: bool = True) -> None:
        super().__init__()
        check_int("input_size", input_size)
        check_int("period", period)
        if output_size != input_size:
            raise ValueError(f"output_size must equal input_size ({input_size}) for seasonal_naive "
                             f"(it forecasts each feature from its own past), got {output_size}")
        if not isinstance(fit, bool):
            raise TypeError(f"fit must be a bool, got {fit!r}")
        self.period, self.input_size = period, input_size
        self.gain = nn.Parameter(torch.ones(input_size), requires_grad=fit)
        self.bias = nn.Parameter(torch.zeros(input_size), requires_grad=fit)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must be features [B, T, {self.input_size}], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, T, F = x.shape
        if state is None:
            state = x.new_zeros(B, self.period, F)
        elif state.shape != (B, self.period, F):
            raise ValueError(f"state must be the last period inputs [{B}, {self.period}, {F}], got "
                             f"{tuple(state.shape)}")
        history = torch.cat([state.to(x.dtype), x], dim=1)     # [B, period + T, F]; row j: x_{t0 - period + j}
        lagged = history[:, 1:T + 1]                            # [B, T, F]: x_{t + 1 - period}
        return lagged * self.gain + self.bias, history[:, -self.period:]


def seasonal_naive(*, vocab_size=None, input_size=None, output_size, period: int, fit: bool = True):
    """The ``build_model`` factory of :class:`SeasonalNaive` (features only)."""
    if vocab_size is not None:
        raise ValueError("seasonal_naive forecasts feature inputs (input_size), not token ids "
                         f"(vocab_size={vocab_size})")
    return SeasonalNaive(input_size=input_size, output_size=output_size, period=period, fit=fit)


MODELS.register("seasonal_naive", seasonal_naive)
