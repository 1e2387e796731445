"""One writer per run directory, nothing overwritten, paths confined to the run: with real
`matrec` processes where the guarantee is about processes."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matrec.train import CheckpointError, Trainer
from matrec.train.rundir import RunDirError, RunLock, claim_new_run
from support import SRC as SRC_DIR
from support import tiny_config

SRC = str(SRC_DIR)
CLI = [sys.executable, "-m", "matrec.cli"]
TINY = ["--task-arg", "delay=4", "--hidden-size", "8", "--batch-size", "4", "--eval-batches", "1",
        "--threads", "1", "--no-progress", "--no-tensorboard", "--no-plot"]


def env():
    return {**os.environ, "PYTHONPATH": SRC}


def tiny(tmp_path, name, **kw):
    return tiny_config(tmp_path, name, **{"task_args": {"delay": 4}, "model": "gru", "steps": 4,
                                          "model_args": {"hidden_size": 8}, "batch_size": 4,
                                          "eval_every": 2, "eval_batches": 1, "ckpt_every": 2, **kw})


def files_of(run: Path) -> dict:
    """Every file of a run but its lock file (which names whoever took the lock last)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ------------------------------------------------------------------------------ one writer


# `matrec train` in a process whose training steps are slowed down, so that it is still training
# when a second writer arrives however loaded the machine is
SLOW_CLI = ("import sys, time; from matrec.train import trainer; batch = trainer.Trainer._batch; "
            "trainer.Trainer._batch = lambda self, *a: (time.sleep(0.02), batch(self, *a))[1]; "
            "from matrec import cli; sys.exit(cli.main(sys.argv[1:]))")


@pytest.mark.slow
def test_two_concurrent_resumes_one_fails_clearly_and_metrics_are_not_duplicated(tmp_path):
    kw = dict(steps=400, log_every=5, eval_every=100, ckpt_every=100)
    Trainer(tiny(tmp_path, "full", **kw)).train()
    Trainer(tiny(tmp_path, "run", **kw)).train(until=100)
    args = ["train", "--resume", str(tmp_path / "run"), "--no-progress"]
    first = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock, deadline = tmp_path / "run" / ".lock", time.monotonic() + 120
    while f'"pid": {first.pid}' not in (lock.read_text() if lock.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.01)
    second = subprocess.run(CLI + args, env=env(), capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert (f"matrec train: error: run directory '{tmp_path / 'run'}' is being written by another "
            f"process (pid {first.pid} on host {socket.gethostname()}, since") in second.stderr
    # the second writer wrote nothing: the run is exactly the uninterrupted one
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == (tmp_path / "full" / "metrics.jsonl").read_bytes()


def test_a_held_run_is_refused_naming_the_holder_and_released_when_it_ends(tmp_path):
    Trainer(tiny(tmp_path, "run")).train()
    before = files_of(tmp_path / "run")
    lock = RunLock(tmp_path / "run").acquire()          # this process is the writer now
    try:
        done = subprocess.run(CLI + ["train", "--resume", str(tmp_path / "run"), "--steps", "6"],
                              env=env(), capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"being written by another process (pid {os.getpid()} on host {socket.gethostname()}, since" in done.stderr
    assert files_of(tmp_path / "run") == before         # the refused writer touched nothing
    assert Trainer.resume(tmp_path / "run", steps=6).train()["step"] == 6   # free again


def test_the_lock_dies_with_its_process(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from matrec.train.rundir import "
                               "RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(run)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"pid {holder.pid} on host"):
            RunLock(run).acquire()
    finally:
        holder.kill()          # SIGKILL: no chance to clean up
        holder.wait()
    RunLock(run).acquire().release()


def test_a_trainer_does_not_go_on_over_a_run_another_writer_moved_on(tmp_path):
    first = Trainer(tiny(tmp_path, "run", steps=8))
    first.train(until=4)
    Trainer.resume(tmp_path / "run").train(until=6)      # another writer, between two calls
    with pytest.raises(RunDirError, match="at step 6 now, not at step 4"):
        first.train()
    assert Trainer.resume(tmp_path / "run").train()["step"] == 8


# ------------------------------------------------------------------------------ nothing overwritten


def test_a_new_run_never_reuses_a_run_name(tmp_path, capsys):
    from matrec import cli
    argv = ["train", "--model", "gru", "--steps", "2", "--out-dir", str(tmp_path), "--run-name", "r", *TINY]
    assert cli.main(argv) == 0
    before = files_of(tmp_path / "r")
    with pytest.raises(SystemExit) as e:
        cli.main(argv[:2] + ["rnn"] + argv[3:])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "matrec train: error:" in err
    assert "already holds a run" in err and f"--resume {tmp_path / 'r'}" in err
    assert files_of(tmp_path / "r") == before
    # the same in Python, and for a folder that holds other files
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(tiny(tmp_path, "r")).train()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(tiny(tmp_path, "mine")).train()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_default_names_in_the_same_second_get_fresh_names(tmp_path, monkeypatch, capsys):
    import datetime
    import types

    from matrec.train import trainer as trainer_module

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(trainer_module, "_dt", types.SimpleNamespace(datetime=Frozen))
    cfgs = [tiny(tmp_path, None) for _ in range(3)]
    trainers = [Trainer(c) for c in cfgs]                  # all built within the same (frozen) second
    for t in trainers:
        t.train()
    names = [t.run_dir.name for t in trainers]
    assert names == ["copy-gru-20260102-030405", "copy-gru-20260102-030405-2", "copy-gru-20260102-030405-3"]
    assert "copy-gru-20260102-030405 is taken; this run writes to" in capsys.readouterr().err
    for t in trainers:   # each a whole run of its own
        assert json.loads((t.run_dir / "summary.json").read_text())["run_dir"] == str(t.run_dir)


@pytest.mark.slow
def test_concurrent_launches_with_default_names_write_separate_runs(tmp_path):
    cmd = CLI + ["train", "--model", "gru", "--steps", "2", "--out-dir", str(tmp_path), *TINY]
    procs = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = sorted(p for p in tmp_path.iterdir())
    assert len(runs) == 2 and all((r / "summary.json").is_file() for r in runs)
    assert len({(r / "metrics.jsonl").read_bytes() for r in runs}) == 1   # same seed, whole runs


def test_claim_refuses_a_path_under_a_file_or_read_only(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="cannot create run directory"):
        claim_new_run(tmp_path / "file" / "run")
    with pytest.raises(RunDirError, match="a file of that name exists"):
        claim_new_run(tmp_path / "file")
    if os.geteuid() != 0:   # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(RunDirError, match="cannot create run directory .*Permission denied"):
            claim_new_run(tmp_path / "ro" / "run")


# ------------------------------------------------------------------------------ confinement


@pytest.mark.parametrize("pointer", ["../../other/checkpoints/step-00000004", "/tmp", "..", "a/../step-00000004",
                                     "link"])
def test_a_pointer_out_of_the_run_is_refused(tmp_path, pointer, capsys):
    from matrec import cli
    Trainer(tiny(tmp_path, "other")).train()
    Trainer(tiny(tmp_path, "run")).train()
    ckpts = tmp_path / "run" / "checkpoints"
    if pointer == "link":   # a folder inside the run that is a link to another run's checkpoint
        (ckpts / "link").symlink_to(tmp_path / "other" / "checkpoints" / "step-00000004")
    (ckpts / "latest.json").write_text(json.dumps({"step": 4, "dir": pointer}))
    before = files_of(tmp_path / "other")
    with pytest.raises(CheckpointError, match="refusing to follow it"):
        Trainer.resume(tmp_path / "run")
    for argv in (["eval", str(tmp_path / "run")], ["train", "--resume", str(tmp_path / "run"), "--steps", "6"],
                 ["sample", str(tmp_path / "run")]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"matrec {argv[0]}: error:" in err and "refusing to follow it" in err
    assert files_of(tmp_path / "other") == before


def test_a_reader_follows_a_checkpoint_replaced_while_it_reads(tmp_path, monkeypatch):
    from matrec.train import checkpoint
    trainer = Trainer(tiny(tmp_path, "run", steps=8))
    trainer.train(until=4)
    read, calls = checkpoint._read_checkpoint, []

    def writer_moves_on_first(ckpt):   # the writer saves step 6 (and deletes step 4) mid-read
        if not calls:
            calls.append(ckpt)
            trainer.train(until=6)
        return read(ckpt)

    monkeypatch.setattr(checkpoint, "_read_checkpoint", writer_moves_on_first)
    meta, ckpt, _ = checkpoint.load_checkpoint(tmp_path / "run")
    assert calls[0].name == "step-00000004" and not calls[0].exists()
    assert meta["step"] == 6 and ckpt.name == "step-00000006"


def test_fresh_folder_names_never_collide(tmp_path):
    from matrec.train.rundir import fresh_name
    made = [fresh_name(tmp_path, "compare-copy-x", create=True) for _ in range(3)]
    assert [p.name for p in made] == ["compare-copy-x", "compare-copy-x-2", "compare-copy-x-3"]
    assert all(p.is_dir() for p in made)
    assert fresh_name(tmp_path, "compare-copy-x").name == "compare-copy-x-4"   # computed, not made
    assert not (tmp_path / "compare-copy-x-4").exists()


def test_a_crafted_pointer_is_refused_by_a_real_resume_process(tmp_path):
    Trainer(tiny(tmp_path, "other")).train()
    Trainer(tiny(tmp_path, "run")).train()
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text(
        json.dumps({"step": 4, "dir": "../../other/checkpoints/step-00000004"}))
    before = files_of(tmp_path / "other")
    done = subprocess.run(CLI + ["train", "--resume", str(tmp_path / "run"), "--steps", "8"], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "matrec train: error: checkpoint pointer" in done.stderr and "refusing to follow it" in done.stderr
    assert files_of(tmp_path / "other") == before


def test_a_save_outside_train_takes_the_lock_too(tmp_path):
    trainer = Trainer(tiny(tmp_path, "run"))
    trainer.train(until=2)
    lock = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            trainer.save()
    finally:
        lock.release()
    assert trainer.save().name == "step-00000002"
