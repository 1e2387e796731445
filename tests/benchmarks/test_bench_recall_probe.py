"""benchmarks/recall_probe.py: a model that can recall learns the lag, one that cannot stays at chance."""
import pytest

from support import load_benchmark

probe = load_benchmark("recall_probe")


def test_quick_run_gives_a_row_per_model_and_lag():
    table = probe.main(["--quick"])
    assert [(r["model"], r["lag"]) for r in table.rows] == [("mru", 2), ("gru", 2)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["params"] > 0 for r in table.rows)


def test_the_probe_can_tell_recall_from_chance(monkeypatch):
    """The GRU learns lag 1 within 150 steps; the same GRU with its recurrence cut (a model that
    sees one token at a time) stays near chance, so the accuracy measures memory."""
    row = probe.probe("gru", 1, 150, 1e-2)
    assert row["accuracy"] > 0.9
    # a carried state from a prefix does not stop a model that forgets from learning
    assert probe.probe("gru", 1, 150, 1e-2, prefix=16)["accuracy"] > 0.9

    class Memoryless(probe.torch.nn.Module):
        def __init__(self, vocab_size, output_size, **_):
            super().__init__()
            self.net = probe.torch.nn.Sequential(probe.torch.nn.Embedding(vocab_size, 32),
                                                 probe.torch.nn.Linear(32, output_size))

        def forward(self, x, state=None):
            return self.net(x), None

    monkeypatch.setattr(probe, "build_model", lambda name, **kw: Memoryless(**kw))
    row = probe.probe("gru", 1, 150, 1e-2)
    assert row["accuracy"] < 0.2


@pytest.mark.parametrize("argv", [["--lags", "64"], ["--prefix", "-1"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        probe.main(argv)
