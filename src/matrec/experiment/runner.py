"""Running an experiment's cells: each one an ordinary Trainer run in its own run directory.

A run directory gets, beside what the Trainer writes, ``cell.json`` (its place in the experiment and
the settings that decide when it stops, written when it starts), ``timing.jsonl`` (training seconds
at each evaluation, for the time to a target), once it ends ``status.json`` (``done`` or ``failed``,
and why; the final model's metrics at the file's ``eval_at`` task settings), and ``failures.jsonl``
(the earlier statuses of a run that failed for a reason of the machine and was tried again). Its
state, read from disk alone: see :mod:`matrec.experiment.state`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from ..train.checkpoint import write_json_atomic
from ..train.config import TrainConfig
from ..train.rundir import FAILURES_NAME, LOCK_NAME, RunDirError, RunLock, RunLockedError
from ..train.trainer import NonFiniteError, Trainer
from .spec import Experiment, parse_target
from .state import STATES, check_settings, environmental, inspect, read_status, read_timing, run_state

__all__ = ["STATES", "run_state", "read_status", "run_cell", "run_experiment", "specs_of",
           "InlineBackend", "LocalBackend", "RayBackend"]
# what a run directory may hold before its first checkpoint: safe to clear for a fresh start
# (failures.jsonl excepted: the record of earlier failures is kept)
_UNSTARTED = {"config.json", "metrics.jsonl", "summary.json", "plot.png", "cell.json", "timing.jsonl",
              "status.json", "tb", "checkpoints", ".lock", "failures.jsonl"}
_KEPT = {LOCK_NAME, FAILURES_NAME}
RESULT_MARK = "MATREC_EXPERIMENT_RESULT "


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest.json").is_file()


def _clear_unstarted(run_dir: Path) -> None:
    """A run killed before its first checkpoint left nothing to resume: clear what it wrote (and
    nothing else) so it starts again, holding the run's lock while doing so."""
    other = sorted(p.name for p in run_dir.iterdir() if p.name not in _UNSTARTED)
    if other:
        raise RunDirError(f"run directory {str(run_dir)!r} has no checkpoint and holds files an "
                          f"experiment run does not write ({other}); move them away or delete the folder")
    lock = RunLock(run_dir).acquire()
    try:
        for p in run_dir.iterdir():
            if p.name in _KEPT:
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        lock.release()


def _archive_failure(run_dir: Path) -> str:
    """Move ``status.json`` of a run that failed for a reason of the machine to the end of
    ``failures.jsonl`` (under the run's lock), so the run can start again; returns that reason."""
    lock = RunLock(run_dir).acquire()
    try:
        status = read_status(run_dir)
        if status is None:   # another process moved it first
            return ""
        with open(run_dir / FAILURES_NAME, "a") as f:
            f.write(json.dumps(status) + "\n")
            f.flush()
            os.fsync(f.fileno())
        (run_dir / "status.json").unlink()
        return status.get("reason", "")
    finally:
        lock.release()


def end_with_driver(driver: dict | None) -> None:
    """Make this process (a ``--jobs`` worker or a Ray task on the driver's machine) end when the
    driver that started it dies, however it dies (``kill -9`` included): a run left going would
    hold its lock and a rerun would see it as blocked. Linux: ``PR_SET_PDEATHSIG``; everywhere: a
    thread that watches the driver."""
    if not driver or driver.get("pid") == os.getpid() or driver.get("host") != socket.gethostname():
        return
    pid, child = driver["pid"], driver["pid"] == os.getppid()
    if child and sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def alive() -> bool:
        if child:
            return os.getppid() == pid   # a dead parent's child is handed to another process
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def watch() -> None:
        while alive():
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    if not alive():   # the driver died before this process could watch it
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="matrec-driver-watch", daemon=True).start()


def run_cell(spec: dict) -> dict:
    """Run (or resume, or skip) one cell; returns its status (also written to ``status.json``).

    ``spec``: ``run_dir``, ``config`` (TrainConfig fields), ``cell`` (cell.json's content). The
    training is the Trainer's: with a target or a time budget it is called up to each evaluation
    step in turn, so the runner can record the time there and stop at either. A run another process
    is writing, or a folder holding files no run writes, is left alone (state ``blocked``, nothing
    written).
    """
    run_dir = Path(spec["run_dir"])
    end_with_driver(spec.get("driver"))
    state, detail = inspect(run_dir)
    if state in ("done", "failed"):
        return {**read_status(run_dir), "run_dir": str(run_dir), "skipped": True}
    if state == "damaged":
        return {"state": "damaged", "run_dir": str(run_dir), "message": detail}
    cell = spec["cell"]
    target = parse_target(cell["target"]) if cell.get("target") else None
    retried = {}
    try:
        if state == "retry":
            retried = {"retried": _archive_failure(run_dir)}
        if _has_checkpoint(run_dir):
            trainer = Trainer.resume(run_dir)
        else:
            if run_dir.exists():
                _clear_unstarted(run_dir)
            trainer = Trainer(TrainConfig.from_dict(spec["config"]), run_dir=run_dir)
    except RunDirError as e:
        return _blocked(run_dir, e)
    except Exception as e:   # noqa: BLE001 - recorded in the run, never dropped
        return {**_record(run_dir, "failed", f"could not start: {type(e).__name__}: {e}", cell,
                          tb=traceback.format_exc(), environmental=environmental(e)), **retried}
    try:
        return _train_cell(trainer, run_dir, cell, target, retried)
    finally:   # the status is written under the run's lock: no other process sees it unfinished
        trainer.release()


def _train_cell(trainer: Trainer, run_dir: Path, cell: dict, target, retried: dict) -> dict:
    cfg = trainer.cfg
    timing_path = run_dir / "timing.jsonl"
    timing = read_timing(timing_path, trainer.step)
    reason = "steps"
    seconds = cell.get("seconds")
    # with a target or a time budget the runner stops at each evaluation to record the time and
    # check the target (one extra checkpoint there); without, the Trainer runs to the end in one
    # call. The Trainer checks the time budget at every step (and evaluates where it stops it).
    chunk = cfg.eval_every if target is not None or seconds is not None else cfg.steps
    try:
        if not (trainer.claim() / "cell.json").exists():   # at the start: a killed run is still placed
            write_json_atomic(run_dir / "cell.json", cell)
        while trainer.step < cfg.steps:
            # out of time after a chunk, or on resuming a run killed after it ran out
            if seconds is not None and trainer.elapsed >= seconds:
                reason = "time budget"
                break
            until = min(cfg.steps, (trainer.step // chunk + 1) * chunk)
            trainer.train(until, seconds=seconds)
            timing.append({"step": trainer.step, "train_seconds": round(trainer.elapsed, 4)})
            timing_path.write_text("".join(json.dumps(r) + "\n" for r in timing))
            if target is not None and cell.get("stop_at_target") and target.met(trainer.last_eval):
                reason = "target"
                break
        # the final model at other task settings (e.g. 2x and 4x the training context); a run killed
        # here stays partial and its resume, at the last step already, only evaluates
        extra = [{"task_args": o, **trainer.evaluate(task_args=o)} for o in cell.get("eval_at") or []]
    except NonFiniteError as e:
        return {**_record(run_dir, "failed", f"diverged: {e}", cell, trainer=trainer), **retried}
    except RunDirError as e:
        return _blocked(run_dir, e)
    except (KeyboardInterrupt, SystemExit):
        raise   # the run stays partial: the next `experiment run` resumes it
    except Exception as e:   # noqa: BLE001
        return {**_record(run_dir, "failed", f"{type(e).__name__}: {e}", cell, trainer=trainer,
                          tb=traceback.format_exc(), environmental=environmental(e)), **retried}
    return {**_record(run_dir, "done", reason, cell, trainer=trainer, eval_at=extra), **retried}


def _blocked(run_dir: Path, e: RunDirError) -> dict:
    # locked: another process writes the run now (the driver waits for it and looks again)
    return {"state": "blocked", "run_dir": str(run_dir), "message": str(e),
            "locked": isinstance(e, RunLockedError)}


def _record(run_dir: Path, state: str, reason: str, cell: dict, trainer: Trainer | None = None,
            tb: str = "", eval_at: list | None = None, environmental: bool = False) -> dict:
    """Write ``status.json`` (and ``cell.json`` if missing); returns the status. A failure of the
    machine (``environmental``) is retried by the next rerun; when the disk refuses the status
    itself, the run stays partial on disk, which a rerun resumes too."""
    status = {"state": state, "reason": reason, "host": socket.gethostname(),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if environmental:
        status["environmental"] = True
    if trainer is not None:
        status.update(step=trainer.step, train_seconds=round(trainer.elapsed, 4), eval=trainer.last_eval)
    if eval_at:
        status["eval_at"] = eval_at
    if tb:
        status["traceback"] = tb
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "cell.json").exists():
            write_json_atomic(run_dir / "cell.json", cell)
        write_json_atomic(run_dir / "status.json", status)
    except OSError as e:
        if not environmental:
            raise
        status["reason"] += f" (status.json not written: {e.strerror}; the run stays partial)"
    return {**status, "run_dir": str(run_dir)}


# ------------------------------------------------------------------------------------ backends


class InlineBackend:
    """Runs each cell in this process, one after the other (``--jobs 1``)."""

    def run(self, specs: list[dict]):
        for spec in specs:
            yield run_cell(spec)


class LocalBackend:
    """Up to ``jobs`` cells at once, each in its own process (``python -m matrec.experiment.worker``)
    with its own thread count; with several GPUs, slot ``i`` sees GPU ``i % count`` alone
    (``CUDA_VISIBLE_DEVICES``). A process that dies without a result (killed, out of memory)
    gets its run recorded as failed with the exit status."""

    def __init__(self, jobs: int, gpus: int = 0) -> None:
        self.jobs, self.gpus = jobs, gpus

    def _start(self, spec: dict, slot: int) -> subprocess.Popen:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        if self.gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)
        # stdout to a file, not a pipe: a run that prints more than a pipe holds would block on it
        # while this process only reads once the run has ended
        out = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, "-m", "matrec.experiment.worker"], env=env,
                                stdin=subprocess.PIPE, stdout=out, text=True)
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        proc.result_file = out
        return proc

    def run(self, specs: list[dict]):
        pending = list(specs)
        running: dict[int, tuple[subprocess.Popen, dict]] = {}
        try:
            while pending or running:
                for slot in range(self.jobs):
                    if slot not in running and pending:
                        spec = pending.pop(0)
                        running[slot] = (self._start(spec, slot), spec)
                for slot, (proc, spec) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[slot]
                    yield _result_of(proc, spec)
                time.sleep(0.05)
        finally:
            for proc, _ in running.values():   # interrupted: stop the runs (they stay partial)
                proc.terminate()
            for proc, _ in running.values():
                proc.wait()


def _result_of(proc: subprocess.Popen, spec: dict) -> dict:
    proc.result_file.seek(0)
    out = proc.result_file.read()
    proc.result_file.close()
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return _record(Path(spec["run_dir"]), "failed", f"the run's process exited with status "
                   f"{proc.returncode} without a result", spec["cell"])


class RayBackend:
    """Each cell a Ray task on the cluster at ``address`` (``ray.init(address=...)``), asking for
    the run's threads as CPUs and one GPU on a cuda device. The run directories must lie on a file
    system every node sees (the experiment's ``--out``)."""

    def __init__(self, address: str, ray_module=None) -> None:
        if ray_module is None:
            try:
                import ray as ray_module
            except ImportError:
                raise ImportError("--ray needs Ray: pip install 'matrec[ray]'") from None
        self.ray, self.address = ray_module, address

    def run(self, specs: list[dict]):
        ray = self.ray
        ray.init(address=self.address, ignore_reinit_error=True)
        task = ray.remote(run_cell)
        refs = {}
        for spec in specs:
            gpu = 1 if str(spec["config"].get("device", "auto")).startswith("cuda") else 0
            refs[task.options(num_cpus=max(1, spec["config"].get("threads") or 1), num_gpus=gpu)
                 .remote(spec)] = spec
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                spec = refs.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as e:   # noqa: BLE001 - a lost worker or node: recorded, not dropped
                    yield _record(Path(spec["run_dir"]), "failed", f"ray task failed: {e}", spec["cell"])


# ------------------------------------------------------------------------------------ the experiment


def specs_of(exp: Experiment, jobs: int = 1, threads: int | None = None) -> list[dict]:
    """One spec per cell; a run without a thread count gets ``threads`` (default: this machine's
    cores // ``jobs``). ``driver``: this process, which the runs' processes end with."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    driver = {"host": socket.gethostname(), "pid": os.getpid()}
    specs = []
    for cell in exp.cells:
        config = dict(cell.config)
        if not config.get("threads"):
            config["threads"] = threads
        specs.append({"run_dir": str(Path(config["out_dir"]) / cell.name), "config": config,
                      "cell": {**exp.cell_info(cell), "parameters": exp.parameters.get(cell.label)},
                      "driver": driver})
    return specs


def _log_result(result: dict, log) -> None:
    extra = f" at step {result['step']}" if "step" in result else ""
    why = result.get("reason", result.get("message", ""))
    by = " (finished by another process)" if result.get("by_other") else ""
    if result.get("locked"):   # looked at again once that process lets go of it
        why = f"{why}; looked at again when it ends"
    log(f"{result['state']:<5} {Path(result['run_dir']).name}: {why}{extra}{by}")


def run_experiment(exp: Experiment, backend, jobs: int = 1, log=print, threads: int | None = None) -> list[dict]:
    """Run every cell not done or failed yet through ``backend``; one result per cell run or left
    alone (``damaged``). Refuses first, naming them, runs made with other settings than the file's
    (:func:`matrec.experiment.state.check_settings`)."""
    specs = specs_of(exp, jobs, threads)
    check_settings(specs, f"experiment file {exp.path!r}")
    states = {s["run_dir"]: inspect(s["run_dir"]) for s in specs}
    todo = [s for s in specs if states[s["run_dir"]][0] in ("new", "partial", "retry")]
    results = []
    for s in specs:
        state, detail = states[s["run_dir"]]
        name = Path(s["run_dir"]).name
        if state in ("done", "failed"):
            log(f"skip  {name}: {state}")
        elif state == "damaged":   # left alone, named; the others go on
            log(f"damaged {name}: {detail}; left alone (repair or move the file away, or delete the run)")
            results.append({"state": "damaged", "run_dir": s["run_dir"], "message": detail})
        elif state == "retry":
            log(f"retry {name}: it failed for a reason of the machine ({detail}); the record moves to "
                f"failures.jsonl")
    ran = []
    for result in backend.run(todo):
        if result.get("skipped"):   # finished since the listing above: by another process
            result["by_other"] = True
        ran.append(result)
        _log_result(result, log)
    # another `experiment run` on the same folder was writing these: wait for it, then look again
    # (resume the run if that process died, count it if it finished it)
    held = {r["run_dir"] for r in ran if r["state"] == "blocked" and r.get("locked")}
    if held:
        log(f"waiting for {len(held)} run(s) that another process is writing: "
            f"{', '.join(sorted(Path(d).name for d in held))}")
        for d in sorted(held):
            RunLock(d).wait_free()
        ran = [r for r in ran if r["run_dir"] not in held]
        for result in backend.run([s for s in todo if s["run_dir"] in held]):
            if result.get("skipped"):
                result["by_other"] = True
            ran.append(result)
            _log_result(result, log)
    return results + ran
