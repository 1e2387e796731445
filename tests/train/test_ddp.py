"""torchrun: two gloo processes on CPU match one process on the same global batch."""
import json
import os
import subprocess
import sys

import pytest

from matrec.train import TrainConfig, Trainer
from support import SRC as SRC_DIR

SRC = str(SRC_DIR)


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process(tmp_path):
    cfg = dict(task="copy", task_args={"delay": 5}, model="gru", model_args={"hidden_size": 16},
               steps=6, batch_size=8, eval_every=3, eval_batches=2, log_every=1, ckpt_every=3,
               progress=False, tensorboard=False, plot=False, threads=1, device="cpu")
    single = Trainer(TrainConfig(**cfg, out_dir=str(tmp_path), run_name="single")).train()

    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "out_dir": str(tmp_path), "run_name": "ddp"}))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "matrec.cli", "train", "--config", str(tmp_path / "cfg.json")],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1

    def records(name):
        return [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    a, b = records("single"), records("ddp")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        # the same numbers up to float summation order (gradients are all-reduced across processes)
        for key in ("loss", "grad_norm", "recall"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert ddp["eval"]["loss"] == pytest.approx(single["eval"]["loss"], rel=1e-5)
    assert (tmp_path / "ddp" / "checkpoints" / "latest.json").exists()


STREAM_SCRIPT = """
import json, sys
from matrec.train import Trainer, TrainConfig
out = sys.argv[1]
def cfg(name):
    return TrainConfig(task="forecast", task_args={"seq_len": 8, "length": 4096, "lag": 20}, model="gru",
                       model_args={"hidden_size": 8}, batch_size=4, steps=8, eval_every=4, eval_batches=2,
                       log_every=1, ckpt_every=3, out_dir=out, run_name=name, progress=False,
                       tensorboard=False, plot=False, threads=1, device="cpu")
Trainer(cfg("full")).train()
Trainer(cfg("paused")).train(until=6)
Trainer.resume(out + "/paused").train()
"""


@pytest.mark.slow
def test_two_process_stream_run_resumes_with_each_rank_its_own_state(tmp_path):
    """Each process carries the state of its own rows; a resume must hand each its own back."""
    (tmp_path / "script.py").write_text(STREAM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "script.py"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [(r["kind"], r["step"], r["loss"]) for r in map(json.loads, lines)]

    # the same losses, bit for bit (rank 0's state restored on both ranks changed step 7's loss)
    assert losses("paused") == losses("full") and len(losses("full")) == 10
    with pytest.raises(ValueError, match="stream state of 2 process"):
        Trainer.resume(tmp_path / "paused")     # this test process is a world of one
    from matrec import cli  # evaluation needs the weights only: any world size
    assert cli.main(["eval", str(tmp_path / "paused"), "--batches", "1"]) == 0
