"""benchmarks/mornn.py and benchmarks/mornn_copy.py run and print every row their docs record."""
import pytest

from support import load_benchmark as load


def test_mornn_speed_benchmark_times_every_model_and_map():
    speed, maps = load("mornn").main(["--device", "cpu", "--batch", "2", "--seq", "5", "--hidden", "4",
                                      "--large-hidden", "6", "--repeats", "1", "--warmup", "0"])
    shapes = ["B=2, T=5, H=4", "B=2, T=5, H=6"]
    rows = {row["model"]: row for row in speed.rows}
    want = ["nn.RNN tanh", "nn.LSTM", "nn.GRU", "MORNN tanh", "MORNN relu", "MORNN modrelu",
            "MORNN identity", "MORNN modrelu (autograd loop)"]
    assert set(want) <= set(rows)
    for name in want:
        assert all(rows[name][s] > 0 for s in shapes), name  # both shapes timed
        for s in shapes:
            assert rows[name][f"{s} ratio"] == rows[name][s] / rows["nn.RNN tanh"][s]
    assert {row["map"] for row in maps.rows} == {"expm", "cayley", "householder"}
    assert all(row[s] > 0 for row in maps.rows for s in shapes)


def test_copy_benchmark_trains_both_models_at_equal_size():
    table, meta = load("mornn_copy").main(["--delay", "3", "--steps", "2", "--every", "1", "--hidden", "8"])
    assert abs(meta["mornn_params"] - meta["lstm_params"]) <= 0.1 * meta["mornn_params"]
    assert [(r["model"], r["step"]) for r in table.rows] == [("MORNN modrelu", 1), ("MORNN modrelu", 2),
                                                              ("LSTM", 1), ("LSTM", 2)]
    assert all(0 <= r["recall"] <= 1 and r["loss"] > 0 and r["seconds"] > 0 for r in table.rows)


@pytest.mark.parametrize("n_params", [500, 3533, 14089])
def test_lstm_hidden_for_is_the_closest_size(n_params):
    module = load("mornn_copy")

    def count(H, embed=10, vocab=10, out=9):
        return vocab * embed + 4 * H * (embed + H + 2) + H * out + out

    H = module.lstm_hidden_for(n_params, 10, 10, 9)
    assert all(abs(count(H) - n_params) <= abs(count(h) - n_params) for h in range(1, 200))
