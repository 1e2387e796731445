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
    with pytest.raises(ValueError, match="output_size must be a positive int"):
        matrec.build_model("lstm", vocab_size=3, output_size=0)
