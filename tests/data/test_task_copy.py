import math

import pytest
import torch

from matrec.data.tasks import build_task


def test_copy_batch_layout_and_baseline():
    task = build_task("copy", delay=30)
    assert task.baseline == pytest.approx(10 * math.log(8) / 50)
    assert build_task("copy", delay=1000).baseline == pytest.approx(0.0204, abs=1e-4)
    x, y = task.get_batch("train", 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 50) and x.dtype == torch.long
    assert ((x[:, :10] >= 1) & (x[:, :10] <= 8)).all()
    assert (x[:, 10:39] == 0).all() and (x[:, 39] == 9).all() and (x[:, 40:] == 0).all()
    assert torch.equal(y[:, 40:], x[:, :10]) and (y[:, :40] == 0).all()


def test_copy_baseline_is_what_a_memoryless_predictor_scores():
    task = build_task("copy", delay=30)
    x, y = task.get_batch("train", 64, torch.Generator().manual_seed(1))
    out = torch.full((64, 50, 9), -1e9)
    out[:, :40, 0] = 0.0     # blanks are certain
    out[:, 40:, 1:] = 0.0    # symbols uniform over 1..8
    assert float(task.loss(out, y)) == pytest.approx(task.baseline, rel=1e-5)
    assert task.metrics(out, y)["recall"] < 0.5


def test_copy_rejects_bad_delay():
    with pytest.raises(ValueError, match="delay must be an int >= 1"):
        build_task("copy", delay=0)
    with pytest.raises(ValueError, match="n_symbols must be an int >= 1, got True"):
        build_task("copy", n_symbols=True)
