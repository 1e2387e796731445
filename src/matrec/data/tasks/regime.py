"""A forecasting stream whose far past is learnable: a hidden regime, set by rare visible switches
and asked for by rare visible queries.

Why this design (docs/results.md, "Forecasting"): an echo of i.i.d. noise thousands of steps back
needs thousands of numbers of state, more than a small recurrent state holds; here the whole far
past that matters is one sign, so a bounded state suffices, and the rule that uses it (a switch
sets the sign, a query asks for it) fits inside one training chunk when switches and queries are
dense. Evaluated with sparse switches and queries (``dwell``, ``query_every`` of tens of thousands
of steps), only a model that keeps the sign across that many steps answers the queries.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .base import TASKS, Task, check_int, check_number
from .forecast import SeriesMixin
from .stream import StreamMixin

BACKGROUND, SWITCH, QUERY, RESPONSE = 0, 1, 2, 3


def regime_series(steps: int, dwell: float, query_every: float, noise: float, marker: float, query: float,
                  response: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, kind, regime)``: the series (float32 ``[steps]``), each step's kind (int8: background,
    switch, query, response) and the hidden regime (int8, +-1).

    Each step after a query is a response ``response * regime``; any other step is a switch with
    probability ``1 / dwell`` (the regime is drawn anew, +-1 with equal odds, and the step shows
    ``marker * regime``), a query with probability ``1 / query_every`` (the step shows ``query``),
    else background noise ``noise * N(0, 1)``. Step 0 is a switch (the regime is stated at the start).
    Switches, queries and responses are exact values (no noise), so each kind is known from its value.
    """
    rng = np.random.default_rng(seed)
    u = rng.random(steps)
    signs = rng.integers(0, 2, steps).astype(np.int8) * 2 - 1
    eps = rng.standard_normal(steps)
    p_switch, p_query = 1.0 / dwell, 1.0 / query_every
    kind = np.where(u < p_switch, SWITCH, np.where(u < p_switch + p_query, QUERY, BACKGROUND)).astype(np.int8)
    kind[0] = SWITCH
    # the step after a query is its response, whatever was drawn for it; a query drawn right after
    # a query is thus a response and asks nothing (a sequential rule: a loop over the queries only)
    for t in np.flatnonzero(kind == QUERY):
        if kind[t] == QUERY and t + 1 < steps:
            kind[t + 1] = RESPONSE
    last = np.maximum.accumulate(np.where(kind == SWITCH, np.arange(steps), 0))   # last switch at or before t
    regime = signs[last]
    x = noise * eps
    x[kind == SWITCH] = marker * regime[kind == SWITCH]
    x[kind == QUERY] = query
    x[kind == RESPONSE] = response * regime[kind == RESPONSE]
    return x.astype(np.float32), kind, regime


def regime_errors(dwell: float, query_every: float, noise: float, marker: float, query: float,
                  response: float) -> dict[str, float]:
    """Closed-form MSEs of the next value, per step of the stationary series.

    A step follows a query with probability ``pi_r = p_q / (1 + p_q)`` (it is then a response);
    otherwise it is a switch, a query or background, whatever the past. ``floor``: the ideal
    predictor, which knows the regime (the last switch or response) and so predicts responses
    exactly; ``memoryless``: a predictor that sees only the current value (it knows a response is
    next but not its sign: error ``response^2`` there); ``variance``: predicting the mean.
    """
    p_s, p_q = 1.0 / dwell, 1.0 / query_every
    pi_r = p_q / (1 + p_q)
    second = p_s * marker ** 2 + p_q * query ** 2 + (1 - p_s - p_q) * noise ** 2   # E[x^2], not after a query
    not_after_query = second - (p_q * query) ** 2                                   # its variance
    floor = (1 - pi_r) * not_after_query
    mean = (1 - pi_r) * p_q * query
    return {"floor": floor, "memoryless": floor + pi_r * response ** 2,
            "variance": (1 - pi_r) * second + pi_r * response ** 2 - mean ** 2,
            "response_share": pi_r}


@TASKS.register("forecast_regime")
class ForecastRegime(SeriesMixin, StreamMixin, Task):
    """Predict the next value of a series with a hidden regime (+-1) that only rare steps reveal.

    Background steps are noise (``noise`` times N(0, 1)). A switch (on average every ``dwell``
    steps) draws a new regime and shows it (``marker * regime``); a query (on average every
    ``query_every`` steps) shows the value ``query``, and the step after it is the response
    ``response * regime``. To forecast a response a model must hold the sign since the last switch
    or response, which lies about ``min(dwell, query_every)`` steps back: train with both small
    (the rule fits in one chunk), evaluate with both in the tens of thousands (``eval_at``).

    Read as ``batch_size`` streams of ``seq_len``-step chunks carried across batches (``stream =
    True``); ``length`` training steps, ``val_length`` validation steps (each row of an evaluation
    reads ``val_length // batch_size`` of them). Features ``[B, seq_len, 1]``, targets ``[B,
    seq_len]``; loss MSE on every step. Attributes: ``baseline`` (the variance), ``floor`` (the
    ideal predictor's MSE), ``memoryless`` (the MSE of the best predictor from the current value
    alone), all in closed form (:func:`regime_errors`). Metrics: ``loss``, ``r2``, and on the
    response steps alone ``response_mse`` (ideal 0, memoryless ``response^2``) and
    ``response_accuracy`` (the sign of the forecast; memoryless 0.5), pooled over the evaluation.
    """

    name = "forecast_regime"
    input_size = 1
    output_size = 1

    def __init__(self, seq_len: int = 128, length: int = 1 << 20, val_length: int = 1 << 17,
                 dwell: float = 512.0, query_every: float = 64.0, noise: float = 0.1, marker: float = 2.0,
                 query: float = 3.0, response: float = 1.0, seed: int = 0) -> None:
        self.seq_len = check_int("seq_len", seq_len)
        check_int("length", length, 2)
        check_int("val_length", val_length, 2)
        check_int("seed", seed, 0)
        for key, value in (("dwell", dwell), ("query_every", query_every)):
            if not check_number(key, value) >= 2:
                raise ValueError(f"{key} must be >= 2 (a mean gap in steps), got {value!r}")
        if 1 / dwell + 1 / query_every >= 1:
            raise ValueError(f"1/dwell + 1/query_every must be < 1, got {dwell!r}, {query_every!r}")
        if not check_number("noise", noise) >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        levels = {"marker": check_number("marker", marker), "query": check_number("query", query),
                  "response": check_number("response", response)}
        if min(abs(v) for v in levels.values()) == 0 or len({abs(v) for v in levels.values()}) != 3:
            raise ValueError(f"marker, query and response must be non-zero with distinct sizes (each kind "
                             f"of step is told by its value), got {levels}")
        self.options = dict(dwell=float(dwell), query_every=float(query_every), noise=float(noise),
                            marker=float(marker), query=float(query), response=float(response))
        x, kind, regime = regime_series(length + val_length, seed=seed, **self.options)
        self.series = {"train": x[:length], "val": x[length:]}
        self.kind = {"train": kind[:length], "val": kind[length:]}
        self.regime = {"train": regime[:length], "val": regime[length:]}
        errors = regime_errors(**self.options)
        self.baseline, self.floor, self.memoryless = errors["variance"], errors["floor"], errors["memoryless"]

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        loss = float(self.loss(output, target))
        # a response is the only step whose value is exactly +-response (background is continuous)
        is_response = target.abs() == self.options["response"]                    # [B, T]
        pred = output[..., 0].float()[is_response]
        truth = target[is_response]
        count = int(is_response.sum())
        sums = {"response_count": float(count), "response_hits": float((pred.sign() == truth.sign()).sum()),
                "response_sq": float(((pred - truth) ** 2).sum())}
        return self.summarize({"loss": loss, "r2": 1.0 - loss / self.baseline, **sums})

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Response metrics pooled over every batch averaged (ratios of the summed counts), not a
        mean of per-batch ratios: most chunks hold no response when queries are sparse."""
        count = means.get("response_count", 0.0)
        out = dict(means)
        out["response_accuracy"] = means["response_hits"] / count if count else math.nan
        out["response_mse"] = means["response_sq"] / count if count else math.nan
        return out
