"""The seasonal-naive forecaster: the lagged value, across chunks through its carried state, and
training/evaluation through the Trainer like any model."""
import pytest
import torch

from matrec.data.tasks import build_task
from matrec.models import build_model
from support import tiny_config


def reference(series, period):
    """x_{t+1-period} for every t of ``series [B, N, F]`` (0 before the start), by index."""
    out = torch.zeros_like(series)
    for t in range(series.shape[1]):
        if t + 1 - period >= 0:
            out[:, t] = series[:, t + 1 - period]
    return out


@pytest.mark.parametrize("period", [1, 3, 7, 40])
@pytest.mark.parametrize("T", [1, 7, 100])
def test_lagged_value_across_chunks_equals_one_call_and_the_reference(period, T):
    torch.manual_seed(0)
    model = build_model("seasonal_naive", input_size=2, output_size=2, period=period, fit=False)
    series = torch.randn(3, 3 * T, 2)
    whole, _ = model(series)
    torch.testing.assert_close(whole, reference(series, period), rtol=0, atol=0)
    state, parts = None, []
    for start in range(0, 3 * T, T):
        out, state = model(series[:, start:start + T], state)
        assert state.shape == (3, period, 2)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=0)


def test_gain_and_bias_and_their_gradients():
    model = build_model("seasonal_naive", input_size=1, output_size=1, period=2)
    with torch.no_grad():
        model.gain.fill_(0.5)
        model.bias.fill_(0.25)
    x = torch.randn(2, 9, 1)
    out, _ = model(x)
    lagged = reference(x, 2)
    torch.testing.assert_close(out, 0.5 * lagged + 0.25)
    out.sum().backward()
    torch.testing.assert_close(model.gain.grad, lagged.sum().reshape(1))
    torch.testing.assert_close(model.bias.grad, torch.tensor([float(out.numel())]))
    fixed = build_model("seasonal_naive", input_size=1, output_size=1, period=2, fit=False)
    assert not any(p.requires_grad for p in fixed.parameters())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="feature inputs"):
        build_model("seasonal_naive", vocab_size=5, output_size=5, period=3)
    with pytest.raises(ValueError, match="output_size must equal input_size"):
        build_model("seasonal_naive", input_size=1, output_size=2, period=3)
    with pytest.raises(ValueError, match="period"):
        build_model("seasonal_naive", input_size=1, output_size=1, period=0)
    with pytest.raises(TypeError, match="fit must be a bool"):
        build_model("seasonal_naive", input_size=1, output_size=1, period=3, fit="no")
    model = build_model("seasonal_naive", input_size=1, output_size=1, period=3)
    with pytest.raises(ValueError, match=r"x must be features \[B, T, 1\]"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"state must be the last period inputs \[2, 3, 1\]"):
        model(torch.randn(2, 5, 1), torch.zeros(2, 4, 1))


def test_trains_and_evaluates_through_the_trainer_on_the_forecast_stream(tmp_path):
    from matrec.train import Trainer
    task_args = {"seq_len": 16, "length": 4096, "lag": 64, "periods": [8, 32], "echo": 0.9}
    common = dict(task="forecast", task_args=task_args, model="seasonal_naive", steps=6, batch_size=4,
                  eval_every=6, eval_batches=8, optimizer="rmsprop", lr=0.05)
    fixed = Trainer(tiny_config(tmp_path, "fixed", model_args={"period": 64, "fit": False}, **{
        k: v for k, v in common.items() if k != "model_args"}))
    summary = fixed.train()
    assert summary["status"] == "completed" and float(fixed.model.gain) == 1.0
    # the trainer's evaluation (state carried from the start of the val stream) is the textbook
    # forecast, computed here from the val series directly
    task = build_task("forecast", **task_args)
    rows = [task.batch_at("val", 4, i) for i in range(8)]
    x = torch.cat([r[0] for r in rows], 1)                                   # [4, 128, 1]
    y = torch.cat([r[1] for r in rows], 1)
    mse = float(((reference(x, 64)[..., 0] - y) ** 2).mean())
    assert summary["eval"]["loss"] == pytest.approx(mse, rel=1e-5)
    # its checkpoint (an optimiser with nothing to update) resumes like any other
    assert Trainer.resume(fixed.run_dir, steps=8).train()["eval"]["loss"] == pytest.approx(mse, rel=1e-5)
    fitted = Trainer(tiny_config(tmp_path, "fitted", model_args={"period": 64}, **common))
    fitted.train()
    assert float(fitted.model.gain.detach()) != 1.0   # the gain is fitted
