"""Helpers shared by several test files (not collected: the name does not start with test_)."""
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from matrec.ops.orthogonal import project_orthogonal

ROOT = Path(__file__).resolve().parents[1]  # the repository
SRC = ROOT / "src"
BENCHMARKS = ROOT / "benchmarks"
# CI clones the repo beside shared/; a worktree elsewhere can point MATREC_SHAKESPEARE at the file.
SHAKESPEARE_FILE = Path(os.environ.get("MATREC_SHAKESPEARE")
                        or ROOT.parent / "shared/data/tinyshakespeare.txt")


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the scripts are not a package; they import
    ``_harness`` from their own folder, as they do when run as scripts)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    if name.startswith("_"):  # a helper module: the very module the scripts import
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
    spec.loader.exec_module(module)
    return module


def orthogonal_rnn(*args, **kwargs) -> nn.RNN:
    """An nn.RNN whose recurrent matrices are made orthogonal."""
    rnn = nn.RNN(*args, **kwargs)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(project_orthogonal(p))
    return rnn


def perturbed(module: nn.Module, scale: float) -> nn.Module:
    """``module`` in float64 eval mode with ``scale`` N(0, 1) noise on every parameter: away from
    identity-like inits, so a test sees every path of the module mix."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.double().eval()


def tiny_config(tmp_path, name, **kw):
    """A TrainConfig for a seconds-long run ``tmp_path/name`` (the copy task, an LSTM, no display)."""
    from matrec.train import TrainConfig
    base = dict(task="copy", task_args={"delay": 5}, model="lstm", model_args={"hidden_size": 16},
                steps=12, batch_size=8, eval_every=4, eval_batches=2, log_every=2, ckpt_every=4,
                out_dir=str(tmp_path), run_name=name, progress=False, tensorboard=False, plot=False,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def kill_after_first_checkpoint(args: list[str], run_dir, timeout: float = 120) -> int:
    """Start ``python -m matrec.cli *args``, SIGKILL it as soon as ``run_dir`` has a checkpoint,
    and return that checkpoint's step."""
    import json
    import signal
    import subprocess
    import time
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "matrec.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(latest.read_text())["step"]


def matrec_cli(*args, cwd=None, timeout: float = 300, env: dict | None = None, **kw):
    """``python -m matrec.cli *args`` in a subprocess (this checkout's src/ first; ``env`` adds
    variables): the real command, with its exit status and its stderr as a user sees them.
    Returns the CompletedProcess (text)."""
    import subprocess
    env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, "-m", "matrec.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, **kw)


TINY_TRAIN = ["--model", "rnn", "--hidden-size", "8", "--steps", "2",
              "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2",
              "--threads", "1", "--no-progress", "--no-tensorboard", "--no-plot"]


def one_line_error(proc, command: str, *fragments: str) -> str:
    """Assert ``proc`` failed as a user error (exit 2, one line ``matrec COMMAND: error: ...``, no
    traceback) holding every fragment; return that line. (Lines that installed libraries log while
    they are imported, such as torchao's, are theirs, not the command's.)"""
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("matrec")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().endswith(lines[0]) and lines[0].startswith(f"matrec {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def refused_in_process(capsys, *argv) -> str:
    """Run ``matrec ARGV`` in this process (``cli.main``) and assert a one-line user error (exit 2, no
    traceback); return the error text."""
    import pytest

    from matrec import cli
    with pytest.raises(SystemExit) as e:
        cli.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err
