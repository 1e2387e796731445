"""The loss by position in a long context, carried vs reset (matrec.train.context), against the
same numbers computed by hand from one call over the whole segment."""
import json

import pytest
import torch

from matrec.data.tasks import build_task
from matrec.models import build_model
from matrec.train import Trainer
from matrec.train.context import loss_by_position, plan, position_eval_of_run
from support import SHAKESPEARE_FILE, tiny_config

FORECAST = {"seq_len": 7, "length": 1024, "lag": 20, "periods": [5, 11]}


def by_hand(losses, bins):
    """Mean of ``losses [rows, N]`` over the positions of each bin."""
    return [float(losses[:, lo:hi].mean()) for lo, hi in zip(bins, bins[1:])]


def segments(task, rows, chunks):
    parts = [task.batch_at("val", rows, i) for i in range(chunks)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


@pytest.mark.parametrize("model_name", ["gru", "mornn"])
def test_carried_equals_one_call_and_reset_equals_chunks_alone(model_name):
    torch.manual_seed(0)
    task = build_task("forecast", **FORECAST)
    model = build_model(model_name, **task.model_io(), hidden_size=6)
    bins = [0, 7, 30, 100]                                   # 100 -> 15 chunks of 7 = 105 steps
    layout = plan(task, bins)
    assert layout["chunks"] == 15 and layout["context"] == 105 and layout["rows"] == 127 // 105
    x, y = segments(task, layout["rows"], 15)                # [rows, 105, 1], [rows, 105]
    with torch.no_grad():
        whole = task.token_losses(model(x)[0], y)
        alone = torch.cat([task.token_losses(model(x[:, i:i + 7])[0], y[:, i:i + 7]) for i in range(0, 105, 7)], 1)
    carried = loss_by_position(model, task, bins, carry=True)
    reset = loss_by_position(model, task, bins, carry=False)
    assert carried["loss"] == pytest.approx(by_hand(whole, bins), rel=1e-5)
    assert reset["loss"] == pytest.approx(by_hand(alone, bins), rel=1e-5)
    assert carried["loss"][0] == reset["loss"][0]            # the first chunk: the same computation
    assert carried["steps"] == [7, 23, 70] and model.training


def test_token_losses_average_to_the_loss():
    torch.manual_seed(0)
    task = build_task("forecast", **FORECAST)
    out, y = torch.randn(3, 7, 1), task.batch_at("val", 3, 0)[1]
    assert task.token_losses(out, y).shape == (3, 7)
    torch.testing.assert_close(task.token_losses(out, y).mean(), task.loss(out, y))
    if SHAKESPEARE_FILE.exists():
        lm = build_task("shakespeare_stream", seq_len=9, path=str(SHAKESPEARE_FILE))
        logits, ids = torch.randn(2, 9, lm.vocab_size), lm.batch_at("val", 2, 0)[1]
        torch.testing.assert_close(lm.token_losses(logits, ids).mean(), lm.loss(logits, ids))
    with pytest.raises(TypeError, match="task 'copy' has no loss per position"):
        build_task("copy").token_losses(out, y)


def test_bad_layouts_are_named():
    task = build_task("forecast", **FORECAST)
    with pytest.raises(ValueError, match=r"needs a stream task \(its state carried across chunks\); "
                                         r"task 'copy' is not one"):
        plan(build_task("copy"), [0, 8])
    with pytest.raises(ValueError, match=r"holds 0 segment\(s\) of 203 steps"):
        plan(task, [0, 200])
    with pytest.raises(ValueError, match="rows must be an int >= 1"):
        plan(task, [0, 50], rows=0)
    with pytest.raises(ValueError, match=r"holds 1 segment\(s\) of 105 steps \(the last bin edge 100 in "
                                         r"chunks of 7\), not rows=2"):
        plan(task, [0, 100], rows=2)
    with pytest.raises(ValueError, match="bins must be a list of at least 2 strictly increasing ints"):
        plan(task, [0, 10, 10])


def test_run_evaluation_is_kept_and_reused_while_the_checkpoint_is_the_same(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "run", task="forecast", task_args=FORECAST,
                                  model="gru", model_args={"hidden_size": 4}, steps=4))
    trainer.train()
    first = position_eval_of_run(trainer.run_dir, [0, 7, 70])
    assert first["step"] == 4 and len(first["carried"]) == len(first["reset"]) == 2
    kept = trainer.run_dir / "position_eval.json"
    data = json.loads(kept.read_text())
    kept.write_text(json.dumps({**data, "carried": [9.0, 9.0]}))   # a kept result is read back, not recomputed
    assert position_eval_of_run(trainer.run_dir, [0, 7, 70])["carried"] == [9.0, 9.0]
    other = position_eval_of_run(trainer.run_dir, [0, 7, 35], rows=1)   # other bins: computed again
    assert other["carried"][0] == pytest.approx(first["carried"][0]) and other["bins"] == [0, 7, 35]
