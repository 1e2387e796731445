"""linear_ar: the window regression against an index-by-index reference, across chunks through
its carried state, its gradients, and a least-squares fit through the trainer."""
import pytest
import torch

from matrec.models import build_model
from support import tiny_config


def reference(series, weight, bias):
    """sum_k weight[f, k] x_{t-W+1+k}[f] + bias[f] for every t (0 before the start), by index."""
    B, N, F = series.shape
    W = weight.shape[1]
    out = torch.zeros_like(series)
    for t in range(N):
        for k in range(W):
            s = t - W + 1 + k
            if s >= 0:
                out[:, t] += weight[:, k] * series[:, s]
    return out + bias


@pytest.mark.parametrize("window", [1, 3, 40])
@pytest.mark.parametrize("T", [1, 7, 100])
def test_window_across_chunks_equals_one_call_and_the_reference(window, T):
    torch.manual_seed(0)
    model = build_model("linear_ar", input_size=2, output_size=2, window=window).double()
    with torch.no_grad():
        model.weight.normal_()
        model.bias.normal_()
    series = torch.randn(3, 3 * T, 2, dtype=torch.float64, requires_grad=True)
    whole, _ = model(series)
    torch.testing.assert_close(whole, reference(series, model.weight, model.bias))
    state, parts = None, []
    for start in range(0, 3 * T, T):
        out, state = model(series[:, start:start + T], state)
        assert state.shape == (3, window, 2)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), whole)
    g = torch.randn_like(whole)
    grads = torch.autograd.grad(whole, (series, model.weight, model.bias), g)
    ref = torch.autograd.grad(reference(series, model.weight, model.bias), (series, model.weight, model.bias), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="feature inputs"):
        build_model("linear_ar", vocab_size=5, output_size=5, window=3)
    with pytest.raises(ValueError, match="output_size must equal input_size"):
        build_model("linear_ar", input_size=1, output_size=2, window=3)
    with pytest.raises(ValueError, match="window"):
        build_model("linear_ar", input_size=1, output_size=1, window=0)
    model = build_model("linear_ar", input_size=1, output_size=1, window=3)
    with pytest.raises(ValueError, match=r"state must be the last window inputs \[2, 3, 1\]"):
        model(torch.randn(2, 5, 1), torch.zeros(2, 4, 1))


def test_fits_an_ar2_series_through_the_trainer(tmp_path):
    """On x_t = 1.2 x_{t-1} - 0.5 x_{t-2} + noise (a .npy series), training recovers the
    coefficients in the window's last two weights and nearly zero elsewhere."""
    import numpy as np

    from matrec.train import Trainer
    rng = np.random.default_rng(0)
    x = np.zeros(20000)
    for t in range(2, len(x)):
        x[t] = 1.2 * x[t - 1] - 0.5 * x[t - 2] + rng.standard_normal()
    np.save(tmp_path / "ar2.npy", x)
    trainer = Trainer(tiny_config(tmp_path, "ar", task="forecast", task_args={"path": str(tmp_path / "ar2.npy"),
                                                                              "seq_len": 32},
                                  model="linear_ar", model_args={"window": 4}, steps=300, batch_size=16,
                                  optimizer="adamw", lr=0.1, grad_clip=0.0, eval_every=300, eval_batches=4))
    trainer.train()
    w = trainer.model.weight.detach()[0]
    assert w[-1] == pytest.approx(1.2, abs=0.1) and w[-2] == pytest.approx(-0.5, abs=0.1)
    assert w[:2].abs().max() < 0.1
