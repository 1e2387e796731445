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


def test_copy_batch_is_unchanged_by_the_layout_code():
    # the known layout, built by hand from the same draws: symbols, blanks, marker, answer
    task = build_task("copy", delay=5, n_symbols=3)
    x, y = task.get_batch("val", 2, torch.Generator().manual_seed(3))
    s = torch.randint(1, 9, (2, 3), generator=torch.Generator().manual_seed(3))
    z = torch.zeros(2, 4, dtype=torch.long)
    assert torch.equal(x, torch.cat([s, z, torch.full((2, 1), 9), torch.zeros(2, 3, dtype=torch.long)], 1))
    assert torch.equal(y, torch.cat([torch.zeros(2, 8, dtype=torch.long), s], 1))


def test_copy_variable_layout_marker_and_answer_per_sequence():
    task = build_task("copy_variable", delay=6, min_delay=2, n_symbols=2)
    assert task.length == 10 and task.min_delay == 2
    gen = torch.Generator().manual_seed(0)
    x, y = task.get_batch("train", 64, gen)
    g = torch.Generator().manual_seed(0)
    s = torch.randint(1, 9, (64, 2), generator=g)
    d = torch.randint(2, 7, (64,), generator=g)
    assert set(d.tolist()) == {2, 3, 4, 5, 6}      # every delay of the range occurs in 64 draws
    for i in range(64):
        di = int(d[i])
        want_x = [*s[i].tolist()] + [0] * (di - 1) + [9] + [0] * (2 + 6 - di)
        want_y = [0] * (di + 2) + s[i].tolist() + [0] * (6 - di)
        assert x[i].tolist() == want_x and y[i].tolist() == want_y
    # min_delay = delay is the plain copy task, draw for draw up to the delay draw
    fixed = build_task("copy_variable", delay=6, min_delay=6, n_symbols=2)
    xc, yc = build_task("copy", delay=6, n_symbols=2).get_batch("val", 5, torch.Generator().manual_seed(4))
    xv, yv = fixed.get_batch("val", 5, torch.Generator().manual_seed(4))
    assert torch.equal(xc, xv) and torch.equal(yc, yv)


def test_copy_variable_default_range_and_bad_options():
    assert build_task("copy_variable", delay=1000).min_delay == 500
    assert build_task("copy_variable", delay=1000, min_delay=0).min_delay == 500
    with pytest.raises(ValueError, match=r"min_delay must be <= delay \(10\), got 11"):
        build_task("copy_variable", delay=10, min_delay=11)
    with pytest.raises(ValueError, match="min_delay must be an int >= 1"):
        build_task("copy_variable", delay=10, min_delay=-1)
    with pytest.raises(ValueError, match=r"loss_on must be one of \['all', 'answers'\], got 'last'"):
        build_task("copy", loss_on="last")


def test_copy_variable_baseline_is_what_a_memoryless_predictor_scores():
    # blanks certain everywhere but the answer, uniform over the 8 symbols there (it knows when to
    # answer from the marker, not what)
    for loss_on, want in (("all", 10 * math.log(8) / 60), ("answers", math.log(8))):
        task = build_task("copy_variable", delay=40, min_delay=20, loss_on=loss_on)
        assert task.baseline == pytest.approx(want)
        _, y = task.get_batch("train", 32, torch.Generator().manual_seed(2))
        out = torch.full((32, 60, 9), -1e9)
        out[..., 0] = 0.0
        answer = y != 0
        out[answer] = torch.tensor([-1e9] + [0.0] * 8)
        assert float(task.loss(out, y)) == pytest.approx(task.baseline, rel=1e-5)


def test_copy_answers_loss_weighs_only_the_answer_positions():
    task_all, task_ans = build_task("copy", delay=7, n_symbols=2), build_task("copy", delay=7, n_symbols=2,
                                                                               loss_on="answers")
    x, y = task_all.get_batch("train", 3, torch.Generator().manual_seed(5))
    out = torch.randn(3, 11, 9, generator=torch.Generator().manual_seed(6))
    ce = torch.nn.functional.cross_entropy(out.reshape(-1, 9), y.reshape(-1), reduction="none").view(3, 11)
    assert float(task_all.loss(out, y)) == pytest.approx(float(ce.mean()), rel=1e-6)
    assert float(task_ans.loss(out, y)) == pytest.approx(float(ce[:, -2:].mean()), rel=1e-6)
    # blank positions do not move the answers loss; recall is the same for both
    out2 = out.clone()
    out2[:, :9] += 5 * torch.randn(3, 9, 9)
    assert float(task_ans.loss(out2, y)) == pytest.approx(float(task_ans.loss(out, y)), rel=1e-6)
    assert task_ans.metrics(out, y)["recall"] == task_all.metrics(out, y)["recall"]
    assert task_ans.metrics(out, y)["recall"] == pytest.approx(
        float((out[:, -2:].argmax(-1) == y[:, -2:]).float().mean()))


@pytest.mark.parametrize("name,args", [("copy", {"delay": 23}), ("copy_variable", {"delay": 23, "min_delay": 3})])
@pytest.mark.parametrize("chunk", [1, 7, 43, 100])
def test_copy_chunks_are_the_batch_in_pieces_and_metrics_sum(name, args, chunk):
    task = build_task(name, n_symbols=3, **args)
    x, y = task.get_batch("val", 4, torch.Generator().manual_seed(8))
    pieces = list(task.chunks("val", 4, torch.Generator().manual_seed(8), chunk))
    assert all(p[0].shape[1] <= chunk for p in pieces)
    assert torch.equal(torch.cat([p[0] for p in pieces], 1), x)
    assert torch.equal(torch.cat([p[1] for p in pieces], 1), y)
    out = torch.randn(4, task.length, 9, generator=torch.Generator().manual_seed(9))
    out[..., 1:4] += 2.0   # some answers right, some wrong
    sums = {}
    start = 0
    for px, py in pieces:
        for k, (s, c) in task.metric_sums(out[:, start:start + px.shape[1]], py).items():
            sums[k] = (sums.get(k, (0.0, 0))[0] + s, sums.get(k, (0.0, 0))[1] + c)
        start += px.shape[1]
    whole = task.metrics(out, y)
    assert 0 < whole["recall"] < 1
    assert {k: s / c for k, (s, c) in sums.items()} == pytest.approx(whole, rel=1e-9)


def test_copy_variable_options_parse_from_the_command_line():
    from matrec.data.tasks import parse_task_options
    assert parse_task_options("copy_variable", {"delay": "1000000", "min_delay": "1000000",
                                                "loss_on": "answers"}) == {
        "delay": 1000000, "min_delay": 1000000, "loss_on": "answers"}
