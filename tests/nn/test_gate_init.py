"""Gate-bias initialisations of LSTM / GRU (nn/gate_init.py): the values land on the right gates."""
import math

import pytest
import torch
from torch import nn

import matrec
from matrec.models.mixers import MIXERS
from matrec.nn.gate_init import GATE_INITS, gated, init_gates


def _gate(bias: torch.Tensor, gate: int, H: int) -> torch.Tensor:
    return bias[gate * H:(gate + 1) * H]


def _layers(rnn):
    """(bias_ih, bias_hh) of every layer and direction."""
    return [(p, getattr(rnn, n.replace("bias_ih", "bias_hh"))) for n, p in rnn.named_parameters()
            if n.startswith("bias_ih")]


def test_default_is_pytorchs_initialisation():
    torch.manual_seed(3)
    ref = nn.LSTM(5, 7, num_layers=2)
    torch.manual_seed(3)
    ours = gated(nn.LSTM)(5, 7, num_layers=2)
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), name
    torch.manual_seed(3)
    model = matrec.build_model("lstm", vocab_size=10, output_size=9, hidden_size=7)
    torch.manual_seed(3)
    lstm = nn.LSTM(32, 7, batch_first=True)  # the factory builds the rnn, then the embedding
    emb = nn.Embedding(10, 32)
    assert torch.equal(model.encoder.weight, emb.weight)
    assert torch.equal(model.rnn.bias_ih_l0, lstm.bias_ih_l0)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_forget_bias_1_sets_the_keep_gate_sum_to_one(cls):
    torch.manual_seed(0)
    rnn = init_gates(cls(4, 6, num_layers=2, bidirectional=True), "forget_bias_1")
    torch.manual_seed(0)
    ref = cls(4, 6, num_layers=2, bidirectional=True)
    H, keep = 6, 1  # LSTM (i, f, g, o) and GRU (r, z, n): the keep gate is the second
    layers, ref_layers = _layers(rnn), _layers(ref)
    assert len(layers) == 4  # 2 layers x 2 directions
    for (b_ih, b_hh), (r_ih, r_hh) in zip(layers, ref_layers):
        torch.testing.assert_close(_gate(b_ih + b_hh, keep, H), torch.ones(H))
        n_gates = b_ih.numel() // H
        for g in set(range(n_gates)) - {keep}:  # the other gates untouched
            assert torch.equal(_gate(b_ih, g, H), _gate(r_ih, g, H))
            assert torch.equal(_gate(b_hh, g, H), _gate(r_hh, g, H))
    for (name, p), (_, q) in zip(rnn.named_parameters(), ref.named_parameters()):
        if name.startswith("weight"):
            assert torch.equal(p, q), name


def test_chrono_lstm_forget_in_log_range_input_is_its_negative():
    t_max, H = 1000, 512
    torch.manual_seed(0)
    rnn = init_gates(nn.LSTM(3, H, num_layers=2), "chrono", t_max=t_max)
    draws = []
    for b_ih, b_hh in _layers(rnn):
        f = _gate(b_ih + b_hh, 1, H)
        i = _gate(b_ih + b_hh, 0, H)
        assert f.min() >= 0 and f.max() <= math.log(t_max - 1)
        torch.testing.assert_close(i, -f)
        # log U[1, t_max - 1]: half the units above log(mid-point)
        assert 0.4 < (f > math.log((t_max - 2) / 2 + 1)).float().mean() < 0.6
        draws.append(f)
    assert not torch.equal(draws[0], draws[1])  # drawn afresh per layer
    assert draws[0].max() > math.log(t_max) - 0.1  # the range reaches t_max


def test_chrono_gru_sets_the_update_gate_only():
    torch.manual_seed(1)
    rnn = init_gates(nn.GRU(3, 64), "chrono", t_max=50)
    torch.manual_seed(1)
    ref = nn.GRU(3, 64)
    z = _gate(rnn.bias_ih_l0 + rnn.bias_hh_l0, 1, 64)
    assert z.min() >= 0 and z.max() <= math.log(49)
    for g in (0, 2):
        assert torch.equal(_gate(rnn.bias_ih_l0, g, 64), _gate(ref.bias_ih_l0, g, 64))


def test_chrono_is_reproducible_under_the_seed():
    torch.manual_seed(5)
    a = init_gates(nn.LSTM(2, 8), "chrono", t_max=100)
    torch.manual_seed(5)
    b = init_gates(nn.LSTM(2, 8), "chrono", t_max=100)
    assert torch.equal(a.bias_ih_l0, b.bias_ih_l0)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_models_and_mixers_take_the_option(name):
    torch.manual_seed(0)
    model = matrec.build_model(name, vocab_size=10, output_size=9, hidden_size=16, init="chrono", t_max=300)
    b = model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0
    assert _gate(b, 1, 16).min() >= 0 and _gate(b, 1, 16).max() <= math.log(299)
    model = matrec.build_model("sequence", pattern=[name, "mlp"], vocab_size=10, output_size=9, d_model=8,
                               mixer_options={name: {"init": "forget_bias_1"}})
    rnn = model.layers[0].mixer.rnn
    torch.testing.assert_close(_gate(rnn.bias_ih_l0 + rnn.bias_hh_l0, 1, 8), torch.ones(8))
    out, _ = model(torch.randint(0, 10, (2, 5)))
    assert out.shape == (2, 5, 9)
    assert "lstm" in MIXERS.names()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="init must be one of"):
        matrec.build_model("lstm", vocab_size=5, output_size=5, init="henaff")
    with pytest.raises(ValueError, match="init='chrono' needs t_max"):
        matrec.build_model("lstm", vocab_size=5, output_size=5, init="chrono")
    with pytest.raises(ValueError, match="t_max must be a finite number > 2"):
        init_gates(nn.LSTM(2, 4), "chrono", t_max=1)
    with pytest.raises(ValueError, match="t_max is chrono's option"):
        init_gates(nn.LSTM(2, 4), "forget_bias_1", t_max=100)
    with pytest.raises(TypeError, match="nn.LSTM and nn.GRU"):
        init_gates(nn.RNN(2, 4), "chrono", t_max=100)
    with pytest.raises(ValueError, match="bias=True"):
        init_gates(nn.LSTM(2, 4, bias=False), "forget_bias_1")
    assert GATE_INITS.names() == ["default", "forget_bias_1", "chrono"]


def test_matrec_train_takes_the_option(tmp_path, capsys):
    import json

    from matrec import cli

    args = ["train", "--task", "copy", "--task-arg", "delay=3", "--model", "lstm", "--hidden-size", "8",
            "--model-arg", "init=chrono", "--steps", "1", "--batch-size", "2", "--out-dir", str(tmp_path),
            "--no-progress", "--no-tensorboard", "--no-plot", "--threads", "1"]
    assert cli.main([*args, "--model-arg", "t_max=50", "--run-name", "c"]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model_args"] == {"hidden_size": 8, "init": "chrono", "t_max": 50}
    with pytest.raises(SystemExit) as e:  # the model's error, as a one-line user error
        cli.main([*args, "--run-name", "d"])
    assert e.value.code == 2
    assert "init='chrono' needs t_max" in capsys.readouterr().err
