"""Runs read from an earlier ``report.json`` (``matrec experiment report --include``): each
per-seed entry becomes a run record like those ``report.collect_runs`` reads from run directories,
for runs whose directories are gone (made on another machine, or cleaned up). What such a record
lacks: the training-loss curve, and the evaluation curve when the report predates ``--include``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .state import DamagedRun, read_json


def runs_of_report(path: str | Path) -> list[dict]:
    """The runs recorded in an earlier ``report.json`` (see the module's docstring), each marked
    ``included`` with the file's path; :class:`ValueError` naming the file when it is no report."""
    path = Path(path)
    try:
        data = read_json(path)
    except DamagedRun as e:
        raise ValueError(f"include: {e}") from None
    if data is None:
        raise ValueError(f"include: no file {str(path)!r} (expected an earlier report.json)")
    experiments = data.get("experiments")
    if not isinstance(experiments, list):
        raise ValueError(f"include: {str(path)!r} has no 'experiments' list: not a report.json")
    runs = []
    for exp in experiments:
        for cell in exp.get("cells", []):
            for seed in cell.get("seeds", []):
                runs.append({
                    **{k: seed.get(k) for k in ("seed", "state", "reason", "step", "train_seconds",
                                                "target_step", "target_seconds", "run_dir", "position")},
                    "final": seed.get("final") or {}, "eval_at": seed.get("eval_at") or [],
                    "loss_spikes": seed.get("loss_spikes") or [],
                    "target_seconds_estimated": seed.get("target_seconds_estimated", False),
                    "experiment": exp["name"], "scale": exp.get("scale", ""), "label": cell["label"],
                    "swept": cell.get("swept", {}), "parameters": cell.get("parameters"),
                    "metric": exp.get("metric", "loss"), "target": exp.get("target"),
                    "matching": exp.get("matching", ""), "size": cell.get("size", ""),
                    "position_eval": cell.get("position") is not None,
                    "evals": seed.get("evals") or [], "train_losses": [], "included": str(path)})
    return runs


def run_key(run: dict) -> tuple:
    """What makes two records the same run: experiment, scale, label, swept values, seed."""
    return (run["experiment"], run["scale"], run["label"], json.dumps(run["swept"], sort_keys=True), run["seed"])
