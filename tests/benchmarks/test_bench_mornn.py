"""benchmarks/mornn.py and benchmarks/mornn_copy.py run and print every row their docs record."""
import re

import pytest

from support import load_benchmark as load


def table_rows(out):
    return {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}


def test_mornn_speed_benchmark_prints_every_model_and_map(capsys):
    load("mornn").main(["--device", "cpu", "--batch", "2", "--seq", "5", "--hidden", "4",
                        "--large-hidden", "6", "--repeats", "1", "--warmup", "0"])
    rows = table_rows(capsys.readouterr().out)
    want = ["nn.RNN tanh", "nn.LSTM", "nn.GRU", "MORNN tanh", "MORNN relu", "MORNN modrelu",
            "MORNN identity", "MORNN modrelu (autograd loop)", "expm", "cayley", "householder"]
    for name in want:
        cells = rows[name].split("|")[2:-1]
        assert len(cells) == 2, name  # both shapes
        assert all(float(c.split()[0]) > 0 for c in cells), name
    assert "1.00x" in rows["nn.RNN tanh"]


def test_copy_benchmark_trains_both_models_at_equal_size(capsys):
    module = load("mornn_copy")
    module.main(["--delay", "3", "--steps", "2", "--every", "1", "--hidden", "8"])
    out = capsys.readouterr().out
    n_mornn, n_lstm = map(int, re.findall(r"\((\d+) params\)", out.splitlines()[0]))
    assert abs(n_mornn - n_lstm) <= 0.1 * n_mornn
    rows = [line.split("|")[1:-1] for line in out.splitlines()
            if line.startswith("| MORNN") or line.startswith("| LSTM")]
    assert [(r[0].strip(), int(r[1])) for r in rows] == [("MORNN modrelu", 1), ("MORNN modrelu", 2),
                                                          ("LSTM", 1), ("LSTM", 2)]
    assert all(0 <= float(r[4]) <= 1 for r in rows)  # recall


@pytest.mark.parametrize("n_params", [500, 3533, 14089])
def test_lstm_hidden_for_is_the_closest_size(n_params):
    module = load("mornn_copy")

    def count(H, embed=10, vocab=10, out=9):
        return vocab * embed + 4 * H * (embed + H + 2) + H * out + out

    H = module.lstm_hidden_for(n_params, 10, 10, 9)
    assert all(abs(count(H) - n_params) <= abs(count(h) - n_params) for h in range(1, 200))
