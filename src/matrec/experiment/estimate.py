"""How long an experiment's runs take, estimated from measured step times (``--dry-run``).

A table (JSON, ``benchmarks/results/gpu_check_h200/step_times.json`` for CUDA,
``benchmarks/results/step_times_cpu.json`` for the CPU) gives, per model, the measured milliseconds
of one forward+backward per timestep of the sequence (``bounded_by`` may give an unmeasured model the
figure of a larger measured one), the share of that an evaluation (forward only)
costs, and a start-up cost per run. A run's estimate is its whole step budget (a run that stops at
its target ends sooner; a seconds budget caps the steps, below) plus its evaluations and its
``eval_at`` settings:

    steps * T * c + n_evals * eval_batches * T * c * share
                  + sum over eval_at of eval_batches * T' * c * share + startup

with ``T`` the training sequence's length and ``T'`` each ``eval_at`` setting's. The recurrences
are sequential in time, so the cost grows with ``T`` and is taken as independent of batch and width.
A ``seconds`` budget is checked at every step (``Trainer.train``), so ``steps`` is then at most
the first step whose training time reaches it; a model with no figure in the table is then counted
at its budget plus the start-up (its evaluations not counted), and listed as such.
"""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import torch

from ..data.tasks import build_task
from ..train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[3]
TABLES = {"cuda": ROOT / "benchmarks" / "results" / "gpu_check_h200" / "step_times.json",
          "cpu": ROOT / "benchmarks" / "results" / "step_times_cpu.json"}


def load_table(device: str) -> dict | None:
    """The step-time table for ``device`` ("cuda..." or "cpu"), or None when there is none."""
    path = TABLES.get("cuda" if str(device).startswith("cuda") else str(device))
    if path is None or not path.is_file():
        return None
    return {**json.loads(path.read_text()), "path": str(path)}


def figure(table: dict, model: str) -> float | None:
    """The table's ms per timestep for ``model``: its own measured figure, else that of the measured
    model its ``bounded_by`` entry names (a shell pattern of model names -> a model of the table: an
    unmeasured model taken at a larger one's cost), else None."""
    figures = table["fwd_bwd_ms_per_timestep"]
    if model in figures:
        return figures[model]
    bound = next((m for pattern, m in table.get("bounded_by", {}).items() if fnmatch.fnmatchcase(model, pattern)), None)
    return figures.get(bound)


def sequence_length(task_name: str, task_args: dict) -> int:
    """Steps of one sequence of the task (one validation batch of one row, built and measured)."""
    x, _ = build_task(task_name, **task_args).get_batch("val", 1, torch.Generator().manual_seed(0))
    return int(x.shape[1])


def estimate_cell(config: dict, eval_at: list, table: dict, seconds: float | None = None) -> float | None:
    """Seconds for one run with TrainConfig fields ``config`` (and a ``seconds`` budget); None when
    ``table`` has no figure for its model."""
    cfg = TrainConfig.from_dict(config)
    c = figure(table, cfg.model)
    if c is None:
        return None
    share = table.get("forward_share", 1 / 3)
    T = sequence_length(cfg.task, cfg.task_args)
    steps = cfg.steps
    if seconds is not None:
        steps = min(steps, max(1, math.ceil(seconds * 1000 / (T * c))))
    evals = math.ceil(steps / cfg.eval_every) + 1
    ms = steps * T * c + evals * cfg.eval_batches * T * c * share
    for options in eval_at:
        ms += cfg.eval_batches * sequence_length(cfg.task, {**cfg.task_args, **options}) * c * share
    return ms / 1000 + table.get("startup_s", 0)


def estimate(specs: list[dict], eval_at: list) -> dict:
    """Per run (``run_dir`` -> seconds or None) and the total at one run at a time; the table used;
    ``missing``: runs not counted; ``budgeted``: runs with no figure counted at their seconds budget."""
    devices = {str(s["config"].get("device", "cpu")) for s in specs}
    device = "cuda" if any(d.startswith("cuda") for d in devices) else "cpu"
    table = load_table(device)
    if table is None:
        return {"table": None, "runs": {}, "total": None, "missing": [s["run_dir"] for s in specs]}
    runs, budgeted = {}, []
    for s in specs:
        seconds = s.get("cell", {}).get("seconds")
        runs[s["run_dir"]] = estimate_cell(s["config"], eval_at, table, seconds)
        if runs[s["run_dir"]] is None and seconds is not None:
            runs[s["run_dir"]] = seconds + table.get("startup_s", 0)
            budgeted.append(s["run_dir"])
    missing = [r for r, v in runs.items() if v is None]
    return {"table": table["path"], "machine": table.get("machine", ""), "runs": runs,
            "total": sum(v for v in runs.values() if v is not None), "missing": missing,
            "budgeted": budgeted}
