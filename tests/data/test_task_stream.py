import json
import re

import numpy as np
import pytest
import torch

from matrec.data.tasks import build_task
from support import SHAKESPEARE_FILE


def _forecast(**kw):
    return build_task("forecast", **{"seq_len": 16, "length": 4096, "lag": 100, **kw})


def test_stream_batches_continue_each_other_and_cover_contiguous_segments():
    task = _forecast()
    assert task.stream and task.chunks_per_pass("train", 4) == 4095 // 4 // 16
    xs, ys = zip(*(task.get_batch("train", 4) for _ in range(5)))
    x = torch.cat(xs, dim=1)[..., 0]                                   # [4, 80]
    y = torch.cat(ys, dim=1)
    assert torch.equal(x[:, 1:], y[:, :-1])                            # one continuous sequence per row
    segment = 4095 // 4
    series = torch.from_numpy(task.series["train"])
    for row in range(4):
        assert torch.equal(x[row], series[row * segment: row * segment + 80])


def test_stream_position_is_checkpointable_and_batch_at_is_pure():
    task = _forecast()
    for _ in range(3):
        task.get_batch("train", 4)
    task.get_batch("val", 4)
    state = task.state_dict()
    assert state == {"cursor": {"train": 3, "val": 1}}
    expected = task.get_batch("train", 4)
    resumed = _forecast()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.get_batch("train", 4), expected))
    assert all(torch.equal(a, b) for a, b in zip(task.batch_at("train", 4, 3), expected))
    # After the last whole chunk the stream starts its pass again.
    n = task.chunks_per_pass("train", 4)
    assert torch.equal(task.batch_at("train", 4, n)[0], task.batch_at("train", 4, 0)[0])
    task.reset("train")
    assert task.state_dict()["cursor"] == {"train": 0, "val": 1}
    with pytest.raises(ValueError, match="state must be"):
        task.load_state_dict({"cursor": {"train": 1}})
    with pytest.raises(ValueError, match="batch_size \\* seq_len must fit in the val split"):
        task.batch_at("val", 64, 0)


def test_forecast_series_baseline_floor_and_echo():
    task = build_task("forecast", seq_len=32, length=1 << 17, lag=500, echo=0.9, noise_share=0.5)
    train = task.series["train"].astype(np.float64)
    assert len(train) >= 100_000 and len(task.series["val"]) == (1 << 17) // 8
    assert task.baseline == pytest.approx(train.var()) and 0.8 < task.baseline < 1.2
    assert task.floor == pytest.approx(0.5 * (1 - 0.81))
    # The echo is there: the series correlates with itself `lag` steps back beyond the sines' share.
    only_echo = build_task("forecast", length=1 << 17, lag=500, echo=0.9, noise_share=1.0).series["train"]
    corr = np.corrcoef(only_echo[500:], only_echo[:-500])[0, 1]
    assert corr == pytest.approx(0.9, abs=0.02)
    # Predicting the mean scores the baseline; r2 is 0 there.
    x, y = task.batch_at("train", 8, 0)
    m = task.metrics(torch.full((8, 32, 1), float(train.mean())), y)
    assert m["r2"] == pytest.approx(1 - m["loss"] / task.baseline)


def test_forecast_is_deterministic_in_seed():
    a, b, c = _forecast(seed=1), _forecast(seed=1), _forecast(seed=2)
    assert np.array_equal(a.series["train"], b.series["train"])
    assert not np.array_equal(a.series["train"], c.series["train"])


@pytest.mark.parametrize("kwargs, match", [
    ({"lag": 2000, "length": 4096}, "length must be >= 4 \\* lag"),
    ({"echo": 1.0}, "echo must be in \\[0, 1\\)"),
    ({"noise_share": 2}, "noise_share must be in \\[0, 1\\]"),
    ({"periods": (1,)}, r"periods\[0\] must be an int >= 2, got 1"),
    ({"seq_len": 0}, "seq_len must be an int >= 1"),
])
def test_forecast_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _forecast(**kwargs)


@pytest.mark.skipif(not SHAKESPEARE_FILE.exists(), reason="shared/data/tinyshakespeare.txt not beside the repo")
def test_shakespeare_stream_reads_the_text_in_order():
    task = build_task("shakespeare_stream", seq_len=64, path=str(SHAKESPEARE_FILE))
    assert task.stream and task.chunks_per_pass("train", 16) * 64 * 16 > 990_000   # ~1M steps per pass
    x0, y0 = task.get_batch("train", 16, torch.Generator())
    x1, _ = task.get_batch("train", 16, torch.Generator())
    text = SHAKESPEARE_FILE.read_text()
    segment = (1_003_854 - 1) // 16
    assert task.decode(torch.cat([x0[3], x1[3]])) == text[3 * segment: 3 * segment + 128]
    assert torch.equal(x1[:, 0], y0[:, -1])


def test_forecast_reads_a_users_series_from_csv_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    values = 5.0 + 3.0 * np.sin(np.arange(900) / 7.0) + 0.1 * rng.standard_normal(900)
    csv_path, npy_path = tmp_path / "series.csv", tmp_path / "series.npy"
    np.savetxt(csv_path, np.stack([np.arange(900), values], 1), delimiter=",", header="t,load", comments="")
    np.save(npy_path, np.stack([np.zeros(900), values], 1))
    by_name = build_task("forecast", seq_len=16, path=str(csv_path), column="load")
    by_index = build_task("forecast", seq_len=16, path=str(npy_path), column=1)
    train = values[:800]
    expected = (values - train.mean()) / train.std()   # standardised with the training part
    for task in (by_name, by_index):
        assert len(task.series["train"]) == 800 and len(task.series["val"]) == 100
        np.testing.assert_allclose(np.concatenate([task.series["train"], task.series["val"]]), expected, rtol=1e-5,
                                   atol=1e-5)
        assert task.baseline == 1.0 and task.mean == pytest.approx(train.mean())
    x, y = by_name.get_batch("train", 4)
    assert x.shape == (4, 16, 1) and y.shape == (4, 16)
    assert torch.equal(x[:, 1:, 0], y[:, :-1])   # the targets are the next values


@pytest.mark.parametrize("content, column, message", [
    ("t,load\n1,2\n", "price", "column must be one of ['t', 'load']"),
    ("t,load\n" + "1,2\n" * 20, None, "column is needed"),
    ("load\n" + "1\n" * 10 + "x\n" + "1\n" * 10, "load", "line 12: column load is not a number"),
    ("load\n" + "1\n" * 30, None, "constant"),
])
def test_forecast_file_errors_name_the_problem(tmp_path, content, column, message):
    path = tmp_path / "s.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_task("forecast", seq_len=4, path=str(path), column=column)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        build_task("forecast", path=str(tmp_path / "missing.csv"))


def test_matrec_train_on_a_users_series(tmp_path, capsys):
    from matrec import cli
    path = tmp_path / "s.npy"
    np.save(path, np.sin(np.arange(2000) / 5.0).astype(np.float32))
    assert cli.main(["train", "--task", "forecast", "--task-arg", f"path={path}", "--task-arg", "seq_len=16",
                     "--model", "gru", "--hidden-size", "8", "--steps", "4", "--batch-size", "4",
                     "--eval-every", "4", "--eval-batches", "1", "--threads", "1", "--no-progress",
                     "--no-tensorboard", "--no-plot", "--out-dir", str(tmp_path), "--run-name", "mine"]) == 0
    summary = json.loads((tmp_path / "mine" / "summary.json").read_text())
    assert summary["status"] == "completed" and "r2" in summary["eval"]
