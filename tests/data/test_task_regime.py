"""forecast_regime: the layout of the series, its closed-form floors against the ideal and the
memoryless predictors run on the series itself, the pooled response metrics, determinism."""
import math

import numpy as np
import pytest
import torch

from matrec.data.tasks import build_task
from matrec.data.tasks.regime import BACKGROUND, QUERY, RESPONSE, SWITCH, regime_errors, regime_series

OPTS = dict(dwell=100.0, query_every=20.0, noise=0.1, marker=2.0, query=3.0, response=1.0)


def test_layout_on_a_tiny_series():
    x, kind, regime = regime_series(2000, seed=3, **OPTS)
    assert kind[0] == SWITCH and x[0] == 2.0 * regime[0]
    # every query is followed by its response, which shows the regime in force, exactly
    q = np.flatnonzero(kind == QUERY)
    q = q[q + 1 < len(x)]
    assert (kind[q + 1] == RESPONSE).all() and (x[q] == 3.0).all()
    r = np.flatnonzero(kind == RESPONSE)
    assert (kind[r - 1] == QUERY).all() and (x[r] == regime[r]).all()
    # the regime changes only at switches, which show the new one
    changes = np.flatnonzero(np.diff(regime) != 0) + 1
    assert set(changes) <= set(np.flatnonzero(kind == SWITCH))
    s = np.flatnonzero(kind == SWITCH)
    assert (x[s] == 2.0 * regime[s]).all()
    # background is noise: never one of the exact levels, so a step's kind is told by its value
    b = x[kind == BACKGROUND]
    assert not np.isin(np.abs(b), [1.0, 2.0, 3.0]).any() and abs(b.std() - 0.1) < 0.01
    x2, kind2, _ = regime_series(2000, seed=3, **OPTS)
    assert np.array_equal(x, x2) and np.array_equal(kind, kind2)
    assert not np.array_equal(x, regime_series(2000, seed=4, **OPTS)[0])


def test_closed_form_errors_match_the_ideal_and_memoryless_predictors():
    x, kind, regime = regime_series(400_000, seed=0, **OPTS)
    e = regime_errors(**OPTS)
    p_q = 1 / OPTS["query_every"]
    after_query = kind[:-1] == QUERY
    ideal = np.where(after_query, regime[:-1] * 1.0, p_q * 3.0)      # knows the regime
    memoryless = np.where(after_query, 0.0, p_q * 3.0)                # knows only the current kind
    assert ((x[1:] - ideal) ** 2).mean() == pytest.approx(e["floor"], rel=0.02)
    assert ((x[1:] - memoryless) ** 2).mean() == pytest.approx(e["memoryless"], rel=0.02)
    assert x.var() == pytest.approx(e["variance"], rel=0.02)
    assert (kind == RESPONSE).mean() == pytest.approx(e["response_share"], rel=0.05)
    assert e["floor"] < e["memoryless"] < e["variance"]


def test_task_batches_floors_and_pooled_response_metrics():
    task = build_task("forecast_regime", seq_len=16, length=4096, val_length=1024, **OPTS)
    e = regime_errors(**OPTS)
    assert (task.floor, task.memoryless, task.baseline) == (e["floor"], e["memoryless"], e["variance"])
    x, y = task.batch_at("val", 4, 0)
    assert x.shape == (4, 16, 1) and y.shape == (4, 16)
    assert torch.equal(x[:, 1:, 0], y[:, :-1])
    # metrics on the true regime (the ideal forecast at responses) and on zero (memoryless)
    kind, regime = task.kind["val"], task.regime["val"]
    totals_ideal, totals_zero, n = {}, {}, 8
    for i in range(n):
        xb, yb = task.batch_at("val", 4, i)
        seg = (len(task.series["val"]) - 1) // 4
        idx = np.arange(4)[:, None] * seg + i * 16 + 1 + np.arange(16)          # the targets' steps
        resp = torch.from_numpy(kind[idx] == RESPONSE)
        ideal = torch.where(resp, torch.from_numpy(regime[idx]).float(), torch.zeros(4, 16))
        for out, totals in ((ideal, totals_ideal), (torch.zeros(4, 16), totals_zero)):
            for k, v in task.metrics(out.unsqueeze(-1), yb).items():
                totals[k] = totals.get(k, 0.0) + v / n
    ideal, zero = task.summarize(totals_ideal), task.summarize(totals_zero)
    assert totals_ideal["response_count"] > 0
    assert ideal["response_accuracy"] == 1.0 and ideal["response_mse"] == 0.0
    assert zero["response_mse"] == 1.0
    assert math.isnan(task.summarize({"loss": 1.0, "r2": 0.0, "response_count": 0.0, "response_hits": 0.0,
                                      "response_sq": 0.0})["response_accuracy"])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="dwell must be >= 2"):
        build_task("forecast_regime", dwell=1)
    with pytest.raises(ValueError, match="distinct sizes"):
        build_task("forecast_regime", marker=1.0, response=1.0, length=1000, val_length=100)
    with pytest.raises(ValueError, match="query_every"):
        build_task("forecast_regime", dwell=2, query_every=2)


def test_the_trainer_pools_response_metrics_over_its_evaluation(tmp_path):
    """Trainer.evaluate reports the ratio of summed hits to summed responses (Task.summarize),
    not a mean of per-batch ratios, for a model that forecasts zero (memoryless: every response
    costs exactly 1)."""
    from matrec.train import Trainer
    from support import tiny_config
    cfg = tiny_config(tmp_path, "naive", task="forecast_regime", model="seasonal_naive",
                      model_args={"period": 1, "fit": False},
                      task_args={"seq_len": 16, "length": 4096, "val_length": 2048, **OPTS},
                      steps=1, batch_size=4, eval_every=1, eval_batches=16, optimizer="rmsprop")
    result = Trainer(cfg).evaluate()
    task = build_task("forecast_regime", seq_len=16, length=4096, val_length=2048, **OPTS)
    xs, ys = zip(*(task.batch_at("val", 4, i) for i in range(16)))
    x, y = torch.cat(xs, 1)[..., 0], torch.cat(ys, 1)                  # persistence: forecast = input
    resp = y.abs() == 1.0
    assert result["response_count"] * 16 == int(resp.sum())
    assert result["response_mse"] == pytest.approx(float(((x - y)[resp] ** 2).mean()))
    assert result["response_accuracy"] == pytest.approx(float((x.sign() == y.sign())[resp].float().mean()))
