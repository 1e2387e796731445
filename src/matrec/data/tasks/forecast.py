"""A synthetic long-memory forecasting stream, for truncated back-propagation over 100k+ steps."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TASKS, Task, check_int, check_number
from .stream import StreamMixin


def echo_series(steps: int, periods: tuple[int, ...], lag: int, echo: float, noise_share: float,
                seed: int) -> np.ndarray:
    """``x_t = sqrt(1 - w) s_t + sqrt(w) e_t`` (float32 ``[steps]``, variance about 1).

    ``s_t``: a sum of sines with the given periods and random phases (variance 1), predictable
    from the recent past. ``e_t = echo * e_{t-lag} + sqrt(1 - echo^2) * noise_t`` (variance 1): its
    predictable part lies ``lag`` steps back, beyond a chunk when ``lag > seq_len``.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)
    phases = rng.uniform(0, 2 * math.pi, len(periods))
    sines = sum(np.sin(2 * math.pi * t / p + f) for p, f in zip(periods, phases)) * math.sqrt(2 / len(periods))
    noise = rng.standard_normal(steps)
    e = np.empty(steps)
    e[:lag] = noise[:lag]                                       # start in the stationary law
    # Each block of `lag` steps depends only on the previous block: a loop over blocks, not steps.
    for start in range(lag, steps, lag):
        stop = min(start + lag, steps)
        e[start:stop] = echo * e[start - lag:stop - lag] + math.sqrt(1 - echo ** 2) * noise[start:stop]
    return (math.sqrt(1 - noise_share) * sines + math.sqrt(noise_share) * e).astype(np.float32)


@TASKS.register("forecast")
class Forecast(StreamMixin, Task):
    """Predict the next value of one long synthetic series (``length`` training steps, default
    2^20; val: the next ``length // 8`` steps), read as ``batch_size`` streams of ``seq_len``-step
    chunks that continue across batches (``stream = True``; position in ``state_dict()``).

    The series mixes slow sines (``periods``; predictable from the recent past) with an echo that
    repeats itself ``lag`` steps later (``echo`` = correlation, ``noise_share`` = its share of the
    variance): predicting it needs state carried across chunks when ``lag > seq_len``.
    Features ``[B, seq_len, 1]``, targets ``[B, seq_len]`` (the next values); loss MSE on every
    step. ``baseline`` = the series' variance (predicting its mean); ``floor`` = the MSE of the
    ideal predictor with unlimited memory, ``noise_share * (1 - echo^2)``. Metric ``r2`` =
    1 - loss / baseline.
    """

    name = "forecast"
    input_size = 1
    output_size = 1

    def __init__(self, seq_len: int = 128, length: int = 1 << 20, lag: int = 1000, echo: float = 0.9,
                 noise_share: float = 0.5, periods: tuple[int, ...] = (50, 400, 3000), seed: int = 0) -> None:
        self.seq_len = check_int("seq_len", seq_len)
        check_int("lag", lag)
        check_int("seed", seed, 0)
        if check_int("length", length, 2) < 4 * lag:
            raise ValueError(f"length must be >= 4 * lag ({4 * lag}) so the echo recurs, got {length}")
        if not 0 <= check_number("echo", echo) < 1:
            raise ValueError(f"echo must be in [0, 1), got {echo!r}")
        if not 0 <= check_number("noise_share", noise_share) <= 1:
            raise ValueError(f"noise_share must be in [0, 1], got {noise_share!r}")
        periods = tuple(periods)
        if not periods or any(isinstance(p, bool) or not isinstance(p, int) or p < 2 for p in periods):
            raise ValueError(f"periods must be a non-empty list of ints >= 2, got {periods!r}")
        series = echo_series(length + length // 8, periods, lag, echo, noise_share, seed)
        self.series = {"train": series[:length], "val": series[length:]}
        self.baseline = float(self.series["train"].astype(np.float64).var())
        self.floor = noise_share * (1 - echo ** 2)

    def _series(self, split: str) -> np.ndarray:
        return self.series[split]

    def _pair(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        chunk = torch.from_numpy(chunk)                                           # [B, T + 1]
        return chunk[:, :-1].unsqueeze(-1), chunk[:, 1:]                          # [B, T, 1], [B, T]

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output[..., 0].float(), target)

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        loss = float(self.loss(output, target))
        return {"loss": loss, "r2": 1.0 - loss / self.baseline}
