import math

import pytest
import torch
import torch.nn.functional as F

from matrec.data.tasks import build_task


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_adding_layout_target_and_baseline():
    task = build_task("adding", length=11)
    x, y = task.get_batch("train", 512, _gen())
    assert x.shape == (512, 11, 2) and y.shape == (512,) and x.dtype == torch.float32
    values, mask = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    assert (mask[:, :5].sum(1) == 1).all() and (mask[:, 5:].sum(1) == 1).all()   # one mark per half
    assert torch.allclose(y, (values * mask).sum(1))
    assert task.baseline == pytest.approx(0.167, abs=5e-4)
    # Predicting 1 (the best memoryless guess) scores the baseline; the exact sum scores 0.
    _, y = task.get_batch("train", 40_000, _gen(1))
    out = torch.ones(40_000, 11, 1)
    assert float(task.loss(out, y)) == pytest.approx(task.baseline, abs=0.005)
    out[:, -1, 0] = y
    assert task.metrics(out, y) == {"loss": 0.0, "accuracy": 1.0}


def test_selective_copy_layout_target_and_baseline():
    task = build_task("selective_copy", length=30, n_symbols=5, alphabet=6)
    assert task.model_io() == {"vocab_size": 8, "input_size": None, "output_size": 6}
    x, y = task.get_batch("train", 64, _gen())
    assert x.shape == (64, 35) and y.shape == (64, 5)
    assert (x[:, 30:] == 7).all()                                    # the markers
    body = x[:, :30]
    assert ((body > 0).sum(1) == 5).all() and (body <= 6).all()
    for row in range(64):                                            # symbols in order of appearance
        assert torch.equal(body[row][body[row] > 0] - 1, y[row])
    uniform = torch.zeros(64, 35, 6)
    assert float(task.loss(uniform, y)) == pytest.approx(math.log(6)) == pytest.approx(task.baseline)
    perfect = torch.nn.functional.one_hot(torch.cat([torch.zeros(64, 30, dtype=torch.long), y], 1), 6) * 50.0
    m = task.metrics(perfect, y)
    assert m["accuracy"] == m["sequence_accuracy"] == 1.0 and m["loss"] < 1e-6


def test_assoc_recall_layout_target_and_baseline():
    task = build_task("assoc_recall", n_pairs=6, n_queries=3, n_keys=10, n_values=5, gap=4)
    assert task.model_io() == {"vocab_size": 16, "input_size": None, "output_size": 5}
    x, y = task.get_batch("val", 32, _gen())
    assert x.shape == (32, 12 + 4 + 3) and y.shape == (32, 3)
    keys, values = x[:, 0:12:2], x[:, 1:12:2]
    assert ((keys >= 1) & (keys <= 10)).all() and ((values >= 11) & (values <= 15)).all()
    assert all(len(set(row.tolist())) == 6 for row in keys)          # distinct keys
    assert (x[:, 12:16] == 0).all()
    for row in range(32):
        table = dict(zip(keys[row].tolist(), (values[row] - 11).tolist()))
        assert [table[q] for q in x[row, 16:].tolist()] == y[row].tolist()
        assert len(set(x[row, 16:].tolist())) == 3                     # distinct queries
    assert float(task.loss(torch.zeros(32, 19, 5), y)) == pytest.approx(task.baseline) == pytest.approx(math.log(5))


@pytest.mark.parametrize("name, kwargs", [("adding", {"length": 9}), ("selective_copy", {"length": 20}),
                                          ("assoc_recall", {}), ("copy", {"delay": 5}),
                                          ("seq_digits", {}), ("perm_digits", {})])
def test_batches_are_a_function_of_the_generator(name, kwargs):
    task = build_task(name, **kwargs)
    a = task.get_batch("train", 8, _gen(3))
    b = task.get_batch("train", 8, _gen(3))
    c = task.get_batch("train", 8, _gen(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name, kwargs, match", [
    ("adding", {"length": 1}, "length must be an int >= 2"),
    ("adding", {"length": 5.0}, "length must be an int"),
    ("selective_copy", {"length": 4, "n_symbols": 5}, "n_symbols must be <= length"),
    ("selective_copy", {"alphabet": 1}, "alphabet must be an int >= 2"),
    ("assoc_recall", {"n_pairs": 20, "n_keys": 10}, "n_pairs must be <= n_keys"),
    ("assoc_recall", {"n_queries": 9, "n_pairs": 8}, "n_queries must be <= n_pairs"),
    ("assoc_recall", {"gap": -1}, "gap must be an int >= 0"),
    ("adding", {"lenght": 5}, r"unknown option\(s\) \['lenght'\]; its options are \['length'\]"),
    ("nope", {}, r"task must be one of \[.*'adding'.*\], got 'nope'"),
])
def test_bad_arguments_are_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_task(name, **kwargs)


def test_bad_split_and_batch_size():
    task = build_task("adding")
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val'\], got 'test'"):
        task.get_batch("test", 4, _gen())
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        task.get_batch("train", 0, _gen())


def test_describe_lists_docstring_and_options():
    from matrec.data.tasks import TASKS, describe_tasks
    text = describe_tasks()
    for name in TASKS.names():
        assert f"{name}:" in text
    help_ = TASKS.get("assoc_recall").describe()
    assert "associative recall" in help_ and "n_pairs=8" in help_ and "gap=0" in help_


def test_parse_task_options_converts_command_line_strings():
    from matrec.data.tasks import parse_task_options
    opts = parse_task_options("forecast", {"seq_len": "64", "echo": "0.5", "periods": "20, 300"})
    assert opts == {"seq_len": 64, "echo": 0.5, "periods": (20, 300)}
    assert parse_task_options("text", {"path": "a.txt", "vocab_size": "512"}) == {"path": "a.txt", "vocab_size": 512}
    assert parse_task_options("copy", {"delay": 7}) == {"delay": 7}          # already typed: kept
    with pytest.raises(ValueError, match=r"delay must be int \(like 100\), got .ten."):
        parse_task_options("copy", {"delay": "ten"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['dealy'\]"):
        parse_task_options("copy", {"dealy": "3"})
    with pytest.raises(TypeError, match="echo must be a number, got '0.5'"):
        build_task("forecast", echo="0.5")


@pytest.mark.parametrize("name, kwargs", [
    ("copy", {"delay": 5}), ("adding", {"length": 6}), ("selective_copy", {"length": 6, "n_symbols": 2}),
    ("assoc_recall", {}), ("seq_digits", {}), ("forecast", {"seq_len": 4, "length": 4096, "lag": 10}),
])
def test_metrics_of_an_output_that_needs_grad_are_computed_without_a_graph(name, kwargs, monkeypatch):
    # float() of a tensor that requires grad warns (once per process, so the check is on the mode):
    # every loss function the metrics call must run with grad off
    import matrec
    task = build_task(name, **kwargs)
    model = matrec.build_model("gru", **task.model_io(), hidden_size=4)
    x, y = task.get_batch("train", 3, _gen())
    out, _ = model(x)                                  # out requires grad
    modes = []
    for fn in ("cross_entropy", "mse_loss", "binary_cross_entropy_with_logits"):
        real = getattr(F, fn)
        monkeypatch.setattr(F, fn, lambda *a, _real=real, **k: modes.append(torch.is_grad_enabled()) or _real(*a, **k))
    metrics = task.metrics(out, y)
    monkeypatch.undo()
    assert modes and not any(modes) and metrics and all(type(v) is float for v in metrics.values())
    task.loss(out, y).backward()                       # metrics left the graph usable
