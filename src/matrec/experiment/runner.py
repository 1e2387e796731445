"""Running an experiment's cells: each one an ordinary Trainer run in its own run directory.

A run directory gets, beside what the Trainer writes, ``cell.json`` (its place in the experiment),
``timing.jsonl`` (training seconds at each evaluation, for the time to a target) and, once it ends,
``status.json`` (``done`` or ``failed``, and why; the final model's metrics at the file's ``eval_at``
task settings). Its state, read from disk alone: ``new`` (no
directory), ``partial`` (no final status: interrupted, or running now), ``done``, ``failed``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ..train.checkpoint import write_json_atomic
from ..train.config import TrainConfig
from ..train.rundir import RunDirError, RunLock
from ..train.trainer import NonFiniteError, Trainer
from .spec import Experiment, parse_target

STATES = ("new", "partial", "done", "failed")
# what a run directory may hold before its first checkpoint: safe to clear for a fresh start
_UNSTARTED = {"config.json", "metrics.jsonl", "summary.json", "plot.png", "cell.json", "timing.jsonl",
              "status.json", "tb", "checkpoints", ".lock"}
RESULT_MARK = "MATREC_EXPERIMENT_RESULT "


def run_state(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "new"
    status = read_status(run_dir)
    return status["state"] if status and status.get("state") in ("done", "failed") else "partial"


def read_status(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
            if p.name == ".lock":
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        lock.release()


def _read_timing(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:   # a line cut by a kill
            continue
        if row["step"] <= upto:
            rows.append(row)
    return rows


def run_cell(spec: dict) -> dict:
    """Run (or resume, or skip) one cell; returns its status (also written to ``status.json``).

    ``spec``: ``run_dir``, ``config`` (TrainConfig fields), ``cell`` (cell.json's content). The
    training is the Trainer's: with a target or a time budget it is called up to each evaluation
    step in turn, so the runner can record the time there and stop at either. A run another process
    is writing, or a folder holding files no run writes, is left alone (state ``blocked``, nothing
    written).
    """
    run_dir = Path(spec["run_dir"])
    state = run_state(run_dir)
    if state in ("done", "failed"):
        return {**read_status(run_dir), "run_dir": str(run_dir), "skipped": True}
    cell = spec["cell"]
    target = parse_target(cell["target"]) if cell.get("target") else None
    try:
        if state == "partial" and _has_checkpoint(run_dir):
            trainer = Trainer.resume(run_dir)
        else:
            if run_dir.exists():
                _clear_unstarted(run_dir)
            trainer = Trainer(TrainConfig.from_dict(spec["config"]), run_dir=run_dir)
    except RunDirError as e:
        return {"state": "blocked", "run_dir": str(run_dir), "message": str(e)}
    except Exception as e:   # noqa: BLE001 - recorded in the run, never dropped
        return _record(run_dir, "failed", f"could not start: {type(e).__name__}: {e}", cell,
                       tb=traceback.format_exc())
    cfg = trainer.cfg
    timing_path = run_dir / "timing.jsonl"
    timing = _read_timing(timing_path, trainer.step)
    reason = "steps"
    # with a target or a time budget the runner stops at each evaluation to record the time and
    # check them (one extra checkpoint there); without, the Trainer runs to the end in one call
    chunk = cfg.eval_every if target is not None or cell.get("seconds") is not None else cfg.steps
    try:
        while trainer.step < cfg.steps:
            until = min(cfg.steps, (trainer.step // chunk + 1) * chunk)
            trainer.train(until)
            if not (run_dir / "cell.json").exists():
                write_json_atomic(run_dir / "cell.json", cell)
            timing.append({"step": trainer.step, "train_seconds": round(trainer.elapsed, 4)})
            timing_path.write_text("".join(json.dumps(r) + "\n" for r in timing))
            if target is not None and cell.get("stop_at_target") and target.met(trainer.last_eval):
                reason = "target"
                break
            if cell.get("seconds") is not None and trainer.elapsed >= cell["seconds"]:
                reason = "time budget"
                break
        # the final model at other task settings (e.g. 2x and 4x the training context); a run killed
        # here stays partial and its resume, at the last step already, only evaluates
        extra = [{"task_args": o, **trainer.evaluate(task_args=o)} for o in cell.get("eval_at") or []]
    except NonFiniteError as e:
        return _record(run_dir, "failed", f"diverged: {e}", cell, trainer=trainer)
    except RunDirError as e:
        return {"state": "blocked", "run_dir": str(run_dir), "message": str(e)}
    except (KeyboardInterrupt, SystemExit):
        raise   # the run stays partial: the next `experiment run` resumes it
    except Exception as e:   # noqa: BLE001
        return _record(run_dir, "failed", f"{type(e).__name__}: {e}", cell, trainer=trainer,
                       tb=traceback.format_exc())
    return _record(run_dir, "done", reason, cell, trainer=trainer, eval_at=extra)


def _record(run_dir: Path, state: str, reason: str, cell: dict, trainer: Trainer | None = None,
            tb: str = "", eval_at: list | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "cell.json").exists():
        write_json_atomic(run_dir / "cell.json", cell)
    status = {"state": state, "reason": reason, "host": socket.gethostname(),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if trainer is not None:
        status.update(step=trainer.step, train_seconds=round(trainer.elapsed, 4), eval=trainer.last_eval)
    if eval_at:
        status["eval_at"] = eval_at
    if tb:
        status["traceback"] = tb
    write_json_atomic(run_dir / "status.json", status)
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
    cores // ``jobs``)."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    specs = []
    for cell in exp.cells:
        config = dict(cell.config)
        if not config.get("threads"):
            config["threads"] = threads
        specs.append({"run_dir": str(Path(config["out_dir"]) / cell.name), "config": config,
                      "cell": {**exp.cell_info(cell), "parameters": exp.parameters.get(cell.label)}})
    return specs


def run_experiment(exp: Experiment, backend, jobs: int = 1, log=print, threads: int | None = None) -> list[dict]:
    """Run every cell not done or failed yet through ``backend``; one result per cell."""
    specs = specs_of(exp, jobs, threads)
    todo = [s for s in specs if run_state(s["run_dir"]) in ("new", "partial")]
    for s in specs:
        if s not in todo:
            log(f"skip  {Path(s['run_dir']).name}: {run_state(s['run_dir'])}")
    results = []
    for result in backend.run(todo):
        results.append(result)
        extra = f" at step {result['step']}" if "step" in result else ""
        why = result.get("reason", result.get("message", ""))
        log(f"{result['state']:<5} {Path(result['run_dir']).name}: {why}{extra}")
    return results
