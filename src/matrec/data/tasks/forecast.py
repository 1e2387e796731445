"""A long forecasting stream for truncated back-propagation over 100k+ steps: a synthetic series
with long-memory structure, or the user's own series from a CSV or .npy file."""
from __future__ import annotations

import csv
import math
from pathlib import Path

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


class SeriesMixin:
    """One scalar series per split (``self.series[split]``) forecast one step ahead: features the
    values, targets the next ones, loss MSE. Shared by every forecasting task."""

    def _series(self, split: str) -> np.ndarray:
        return self.series[split]

    def _pair(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        chunk = torch.from_numpy(chunk)                                           # [B, T + 1]
        return chunk[:, :-1].unsqueeze(-1), chunk[:, 1:]                          # [B, T, 1], [B, T]

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output[..., 0].float(), target)

    def token_losses(self, output: Tensor, target: Tensor) -> Tensor:
        return (output[..., 0].float() - target) ** 2                              # [B, T]


@TASKS.register("forecast")
class Forecast(SeriesMixin, StreamMixin, Task):
    """Predict the next value of one long synthetic series (``length`` training steps, default
    2^20; val: the next ``length // 8`` steps), read as ``batch_size`` streams of ``seq_len``-step
    chunks that continue across batches (``stream = True``; position in ``state_dict()``).

    The series mixes slow sines (``periods``; predictable from the recent past) with an echo that
    repeats itself ``lag`` steps later (``echo`` = correlation, ``noise_share`` = its share of the
    variance): predicting it needs state carried across chunks when ``lag > seq_len``.

    ``path`` reads the series from a file instead (``length``, ``lag``, ``echo``, ``noise_share``,
    ``periods`` and ``seed`` then play no part): a ``.npy`` array (1-D, or 2-D ``[steps, columns]``)
    or a ``.csv`` file (comma-separated, an optional header row), ``column`` naming the column by
    header name or 0-based index (needed when there are several). Its first 8/9 train, the last 1/9
    validates; the series is standardised with the training part's mean and std (kept in
    ``mean``/``std``), so ``baseline`` is 1 and losses read as on the synthetic series.
    Features ``[B, seq_len, 1]``, targets ``[B, seq_len]`` (the next values); loss MSE on every
    step. ``baseline`` = the series' variance (predicting its mean); ``floor`` = the MSE of the
    ideal predictor with unlimited memory, ``noise_share * (1 - echo^2)``. Metric ``r2`` =
    1 - loss / baseline.
    """

    name = "forecast"
    input_size = 1
    output_size = 1

    def __init__(self, seq_len: int = 128, length: int = 1 << 20, lag: int = 1000, echo: float = 0.9,
                 noise_share: float = 0.5, periods: tuple[int, ...] = (50, 400, 3000), seed: int = 0,
                 path: str | None = None, column: str | None = None) -> None:
        self.seq_len = check_int("seq_len", seq_len)
        if path is not None:
            series = read_series(path, column)
            cut = len(series) * 8 // 9
            self.mean, self.std = float(series[:cut].mean()), float(series[:cut].std())
            if not self.std > 0:
                raise ValueError(f"path {str(path)!r}: the series is constant over its training part "
                                 f"(first {cut} values); there is nothing to forecast")
            series = ((series - self.mean) / self.std).astype(np.float32)
            self.series = {"train": series[:cut], "val": series[cut:]}
            self.baseline = 1.0
            self.floor = None
            return
        check_int("lag", lag)
        check_int("seed", seed, 0)
        if check_int("length", length, 2) < 4 * lag:
            raise ValueError(f"length must be >= 4 * lag ({4 * lag}) so the echo recurs, got {length}")
        if not 0 <= check_number("echo", echo) < 1:
            raise ValueError(f"echo must be in [0, 1), got {echo!r}")
        if not 0 <= check_number("noise_share", noise_share) <= 1:
            raise ValueError(f"noise_share must be in [0, 1], got {noise_share!r}")
        periods = tuple(periods)
        if not periods:
            raise ValueError("periods must be a non-empty list of ints >= 2, got ()")
        periods = tuple(check_int(f"periods[{i}]", p, 2) for i, p in enumerate(periods))
        series = echo_series(length + length // 8, periods, lag, echo, noise_share, seed)
        self.series = {"train": series[:length], "val": series[length:]}
        self.baseline = float(self.series["train"].astype(np.float64).var())
        self.floor = noise_share * (1 - echo ** 2)

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        loss = float(self.loss(output, target))
        return {"loss": loss, "r2": 1.0 - loss / self.baseline}


def read_series(path, column=None) -> np.ndarray:
    """One column of a ``.npy`` or ``.csv`` file as float64 ``[steps]``; errors name the file, the
    column and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file (forecast reads a .csv or .npy series)")
    if isinstance(column, bool) or not (column is None or isinstance(column, (str, int))):
        raise TypeError(f"column must be a column name or a 0-based index, got {column!r}")
    if path.suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"path {str(path)!r} is not a numeric .npy array: {e}") from None
        if data.ndim == 2 and data.shape[1] == 1 and column is None:
            column = 0
        if data.ndim == 2:
            if column is None or not str(column).isdigit() or int(column) >= data.shape[1]:
                raise ValueError(f"column must be an index below {data.shape[1]} for the 2-D array in "
                                 f"{str(path)!r}, got {column!r}")
            data = data[:, int(column)]
        elif data.ndim != 1:
            raise ValueError(f"path {str(path)!r} holds a {data.ndim}-D array; expected 1-D or 2-D [steps, columns]")
        values = data
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
        if not rows:
            raise ValueError(f"path {str(path)!r} is an empty CSV file")
        header = None
        try:
            [float(x) for x in rows[0]]
        except ValueError:
            header, rows = [h.strip() for h in rows[0]], rows[1:]
        width = len(header) if header else len(rows[0])
        if column is None:
            if width != 1:
                raise ValueError(f"column is needed: {str(path)!r} has {width} columns"
                                 + (f" ({header})" if header else ""))
            index = 0
        elif header and str(column) in header:
            index = header.index(str(column))
        elif str(column).isdigit() and int(column) < width:
            index = int(column)
        else:
            raise ValueError(f"column must be one of {header} or an index below {width} for "
                             f"{str(path)!r}, got {column!r}" if header else
                             f"column must be an index below {width} for {str(path)!r} (it has no "
                             f"header row), got {column!r}")
        values = []
        for n, row in enumerate(rows, 2 if header else 1):
            try:
                values.append(float(row[index]))
            except (ValueError, IndexError):
                raise ValueError(f"{str(path)!r} line {n}: column {column if column is not None else 0} "
                                 f"is not a number ({row[index] if index < len(row) else 'missing'!r})") from None
    else:
        raise ValueError(f"path {str(path)!r} must end in .csv or .npy")
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(f"{str(path)!r}: value {bad} of the series is not finite ({values[bad]}); "
                         f"fill or drop missing values first")
    if len(values) < 18:
        raise ValueError(f"{str(path)!r} holds {len(values)} values; a series needs at least 18 "
                         f"(16 to train, 2 to validate)")
    return values
