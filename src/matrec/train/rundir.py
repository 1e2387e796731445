"""The run directory: metrics as JSON lines (+ TensorBoard), the plot, the summary.

``<run>/``::

    config.json      the resolved TrainConfig
    metrics.jsonl    one JSON object per line: {"kind": "train"|"eval", "step": int, ...numbers}
    tb/              TensorBoard events (same numbers)
    plot.png         loss (and task metrics) against step
    checkpoints/     see matrec.train.checkpoint
    summary.json     final status, step, metrics, wall time, parameter count
    .lock            the writer's lock (see RunLock); holds its pid, host and start time
    failures.jsonl   (experiment runs) earlier failures of the machine, kept when the run starts again

``metrics.jsonl`` holds only numbers that the run's seed determines (no timings), so a resumed run
writes exactly the file an uninterrupted one would.

One writer per run directory: a trainer takes the directory's :class:`RunLock` before it writes,
a new run never reuses a directory that holds a run (:func:`claim_new_run`), and a resumed run checks
that the run is still where its checkpoint left it.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Callable

LOCK_NAME = ".lock"
FAILURES_NAME = "failures.jsonl"   # not a run: a run that starts again after such a failure keeps it


class RunDirError(RuntimeError):
    """A run directory cannot be written: another writer holds it, it already holds a run, it
    cannot be created, or one of its files is damaged. The message says which and what to do."""


class RunLockedError(RunDirError):
    """Another process holds the run directory's lock (it is writing the run now)."""


class RunLock:
    """An exclusive OS lock (``flock``) on ``<run_dir>/.lock``: one writer per run directory.

    The lock belongs to the open file, so the kernel drops it when the holder exits, however it
    exits (``kill -9`` included): a crashed run never leaves a stale lock to remove by hand. The
    file keeps the holder's pid, host and start time so that a refused writer can name it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock now or raise :class:`RunLockedError` naming the holder (never waits)."""
        try:
            import fcntl
        except ImportError:   # not a POSIX system: nothing to lock with, say so once
            warnings.warn("this platform has no fcntl.flock: the run directory is not locked, so "
                          "two processes could write the same run")
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot open the lock file of run directory {str(self.run_dir)!r}: "
                              f"{e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(f"run directory {str(self.run_dir)!r} is being written by another "
                              f"process ({holder}); one writer per run: wait for it to finish or "
                              f"stop it") from None
        stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": stamp}).encode())
        self._fd = fd
        return self

    def wait_free(self) -> None:
        """Block until no process holds the lock (its writer ended, however it ended); take nothing."""
        try:
            import fcntl
            fd = os.open(self.path, os.O_RDONLY)
        except (ImportError, FileNotFoundError):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the file drops the lock
            self._fd = None

    def __del__(self) -> None:   # a trainer resumed but never trained must not keep its run
        try:
            self.release()
        except Exception:   # at interpreter exit the process's end drops the lock anyway
            pass


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"   # it is between taking the lock and writing its name


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything but a lock file and a failure record (a run, or files
    that are not ours)."""
    return run_dir.is_dir() and any(p.name not in (LOCK_NAME, FAILURES_NAME) for p in run_dir.iterdir())


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is a run directory, its ``checkpoints/`` folder or one checkpoint (what a
    run writes: see this module and matrec.train.checkpoint)."""
    return ((folder / "config.json").is_file() and any((folder / f).exists() for f in
                                                       ("metrics.jsonl", "checkpoints", "cell.json"))) \
        or (folder / "latest.json").is_file() or (folder / "state.json").is_file()


def check_new_output(path: str | Path, what: str) -> None:
    """A ValueError naming ``what`` unless ``path`` is a new or empty folder outside every run
    directory: an export writes its own ``config.json``, which would replace a run's (and lose it)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{what} {str(out)!r} exists and is not an empty folder; nothing was "
                         f"overwritten (choose a new folder)")
    for folder in (out.resolve(), *out.resolve().parents):
        if is_run_dir(folder):
            raise ValueError(f"{what} {str(out)!r} lies inside the run directory {str(folder)!r}; "
                             f"nothing is ever written into a run (choose a folder outside it)")


def _make_dir(path: Path, exist_ok: bool) -> None:
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok:
            raise
        raise RunDirError(f"cannot create run directory {str(path)!r}: a file of that name "
                          f"exists") from None
    except OSError as e:   # a file on the way (NotADirectoryError), no permission, read-only disk
        raise RunDirError(f"cannot create run directory {str(path)!r}: {e.strerror} "
                          f"({e.filename})") from None


def claim_new_run(run_dir: str | Path, *, rename: bool = False) -> tuple[Path, RunLock]:
    """Create and lock the directory of a NEW run: ``(directory, its held lock)``.

    A directory that already holds a run is never reused. With ``rename`` (the name was not the
    user's choice, e.g. the default ``<task>-<model>-<timestamp>`` of two launches in the same
    second) the first free ``<name>-2``, ``<name>-3``, ... is taken instead and a line on stderr
    says so; otherwise :class:`RunDirError` explains how to resume the existing run instead.
    """
    base = Path(run_dir)
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if rename:
            try:   # mkdir is atomic: of two launches racing for one name, exactly one creates it
                _make_dir(path, exist_ok=False)
            except FileExistsError:
                continue
        else:
            _make_dir(path, exist_ok=True)
        lock = RunLock(path)
        try:
            lock.acquire()
        except RunDirError:
            if rename:
                continue
            raise
        if holds_run(path):
            lock.release()
            if rename:
                continue
            raise RunDirError(
                f"run directory {str(path)!r} already holds a run (or other files); a new run never "
                f"overwrites one: continue it with `matrec train --resume {path}` "
                f"(Trainer.resume), or choose another run_name / out_dir")
        if path != base:
            print(f"matrec: {base} is taken; this run writes to {path}", file=sys.stderr)
        return path, lock
    raise AssertionError("unreachable")


def fresh_name(parent: str | Path, name: str, create: bool = False) -> Path:
    """``parent/name``, or the first of ``name-2``, ``name-3``, ... that does not exist yet (for
    folders whose runs are then claimed one by one with :func:`claim_new_run`).

    ``create`` makes the folder too, atomically (of two launches racing for one name, one gets
    it and the other the next); without it, processes that must agree on the name without talking
    (torchrun ranks, before the process group exists) all compute the same one.
    """
    parent = Path(parent)
    for n in itertools.count(1):
        path = parent / (name if n == 1 else f"{name}-{n}")
        if not create:
            if not path.exists():
                return path
            continue
        try:
            _make_dir(path, exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed; metrics go to metrics.jsonl only "
                              "(pip install 'matrec[workbench]')")
            else:
                # purge_step: on resume, TensorBoard hides what the killed run logged after it
                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)

    def truncate(self, keep: Callable[[dict], bool]) -> None:
        """Drop the records ``keep`` rejects (on resume: those written after the checkpoint)."""
        if self.path.exists():
            records = read_metrics(self.path, partial_last=True)
            # written aside and swapped in: a run killed here keeps its whole log
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records if keep(r)))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path, partial_last: bool = False) -> list[dict]:
    """The records of a ``metrics.jsonl``; :class:`RunDirError` names the first damaged line.

    ``partial_last``: drop an unparsable last line, which a process killed mid-append leaves.
    """
    path = Path(path)
    try:
        lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except UnicodeDecodeError:
        raise RunDirError(f"{str(path)!r} is not a metrics log (not UTF-8 text)") from None
    records = []
    for k, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if partial_last and k == len(lines) - 1:
                break
            record = None
        if not (isinstance(record, dict) and record.get("kind") in ("train", "eval")
                and isinstance(record.get("step"), int)):
            raise RunDirError(f"{str(path)!r} line {i} is not a metrics record (a JSON object with "
                              f"kind 'train' or 'eval' and an int step): {line[:80]!r}; the log was "
                              f"edited or damaged, repair or delete that line")
        records.append(record)
    return records


def plot_metrics(records: list[dict], path: str | Path, *, title: str = "",
                 baseline: float | None = None) -> None:
    """Loss (train and eval) against step, and each other eval metric in its own panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    extra = sorted({k for r in evals for k in r if k not in ("kind", "step", "loss")})
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(5 * (1 + len(extra)), 3.6), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval", ms=3)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label="memoryless baseline")
    ax.set(xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    for ax, key in zip(axes[0, 1:], extra):
        ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-", ms=3)
        ax.set(xlabel="step", ylabel=key)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
