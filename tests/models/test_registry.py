import pytest
import torch

import matrec


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_torch_baselines_tokens_and_features(name):
    m = matrec.build_model(name, vocab_size=10, output_size=7, hidden_size=16)
    out, state = m(torch.randint(0, 10, (3, 5)))
    assert out.shape == (3, 5, 7)
    m = matrec.build_model(name, input_size=2, output_size=1, hidden_size=16)
    out, _ = m(torch.randn(3, 5, 2))
    assert out.shape == (3, 5, 1)


def test_build_model_errors():
    with pytest.raises(ValueError, match="exactly one of vocab_size and input_size"):
        matrec.build_model("lstm", output_size=3)
    with pytest.raises(ValueError, match="model must be one of"):
        matrec.build_model("nope", vocab_size=3, output_size=3)
    with pytest.raises(ValueError, match="output_size must be an int >= 1"):
        matrec.build_model("lstm", vocab_size=3, output_size=0)


@pytest.mark.parametrize("name, kwargs, err, match", [
    ("lstm", {"embed_dim": 0}, ValueError, "embed_dim must be an int >= 1 or None, got 0"),
    ("gru", {"hidden_size": True}, ValueError, "hidden_size must be an int >= 1, got True"),
    ("rnn", {"num_layers": 0}, ValueError, "num_layers must be an int >= 1, got 0"),
    ("lstm", {"bidirectional": "yes"}, TypeError, "bidirectional must be a bool, got 'yes'"),
    ("attn", {"d_model": 0}, ValueError, "d_model must be an int >= 1, got 0"),
    ("mlp", {"d_model": 0}, ValueError, "d_model must be an int >= 1, got 0"),
    ("linear_attn", {"n_heads": 0}, ValueError, "n_heads must be an int >= 1, got 0"),
])
def test_build_model_names_the_bad_size(name, kwargs, err, match):
    with pytest.raises(err, match=match):
        matrec.build_model(name, vocab_size=5, output_size=5, **kwargs)


@pytest.mark.parametrize("name, kwargs", [("gru", {"hidden_size": 8}), ("mru", {"d_model": 8, "n_heads": 2})])
def test_token_models_name_bad_token_input(name, kwargs):
    m = matrec.build_model(name, vocab_size=3, output_size=3, **kwargs)
    with pytest.raises(IndexError, match=r"x holds token ids outside \[0, 3\) \(the model's vocab_size\): from 0 to 7"):
        m(torch.tensor([[0, 7]]))
    with pytest.raises(TypeError, match="x must be a Tensor"):
        m([[0, 1]])


@pytest.mark.parametrize("name", ["txl", "mru"])
def test_an_integer_state_is_refused_not_cast(name):
    m = matrec.build_model(name, vocab_size=3, output_size=3, d_model=8, n_heads=2)
    x = torch.tensor([[0, 1, 2]])
    _, state = m(x)
    as_int = [s.long() if isinstance(s, torch.Tensor) else s for s in state]
    with pytest.raises(ValueError, match="state must be .*floating-point.*got torch.int64"):
        m(x, as_int)
