"""Evaluation of long copy sequences in chunks, the state carried: equal to the whole-sequence
evaluation, and holding one chunk at a time whatever the delay."""
import pytest
import torch

from matrec.train import Trainer
from support import tiny_config as tiny


def _reference(trainer, task_args, batches):
    """The plain evaluation: each validation batch whole, in one forward call."""
    from matrec.data.tasks import build_task
    task = build_task(trainer.cfg.task, **{**trainer.cfg.task_args, **task_args})
    gen = torch.Generator().manual_seed(trainer.cfg.seed + 1)
    totals = {}
    trainer.model.eval()
    with torch.no_grad():
        for _ in range(batches):
            x, y = task.get_batch("val", trainer.cfg.batch_size, gen)
            out, _ = trainer.model(x)
            for k, v in task.metrics(out, y).items():
                totals[k] = totals.get(k, 0.0) + v / batches
    return totals


@pytest.mark.parametrize("model,args", [("mornn", {"hidden_size": 12}), ("lstm", {"hidden_size": 8}),
                                        ("gru", {"hidden_size": 8}), ("rnn", {"hidden_size": 8})])
@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_evaluation_equals_the_whole_sequence(tmp_path, model, args, chunk):
    trainer = Trainer(tiny(tmp_path, "r", task="copy_variable", task_args={"delay": 60, "min_delay": 20},
                           model=model, model_args=args, steps=2, batch_size=5))
    trainer.train()
    for task_args in ({}, {"delay": 130, "min_delay": 130}):
        want = _reference(trainer, task_args, batches=2)
        got = trainer.evaluate(batches=2, task_args=task_args, chunk=chunk)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert set(got) == {"loss", "recall"}


def test_chunked_evaluation_holds_one_chunk_whatever_the_delay(tmp_path):
    trainer = Trainer(tiny(tmp_path, "r", task="copy", task_args={"delay": 30}, model="mornn",
                           model_args={"hidden_size": 8}, steps=1, batch_size=2))
    trainer.train()
    peaks = {}

    def record(module, inputs, output):
        out, state = output
        sizes = [out.numel()] + [t.numel() for t in (state if isinstance(state, (list, tuple)) else [state])
                                 if torch.is_tensor(t)]
        peaks["numel"] = max(peaks.get("numel", 0), *sizes)
        peaks["steps"] = max(peaks.get("steps", 0), inputs[0].shape[1])

    trainer.model.register_forward_hook(record)
    trainer.task.get_batch = None   # the whole batch is never built
    by_delay = {}
    for delay in (1_000, 12_000):
        peaks.clear()
        metrics = trainer.evaluate(batches=1, task_args={"delay": delay}, chunk=256)
        assert 0 <= metrics["recall"] <= 1
        by_delay[delay] = dict(peaks)
    assert by_delay[1_000] == by_delay[12_000]
    assert by_delay[12_000]["steps"] == 256 and by_delay[12_000]["numel"] == 2 * 256 * 9
