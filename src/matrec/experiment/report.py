"""`matrec experiment report DIR`: tables, a JSON of every number and plots, from run directories
alone (any folder holding them: runs made on another machine or a cluster report the same way).

A run directory is a folder with ``config.json`` and ``metrics.jsonl``. Its ``cell.json`` (written
by ``matrec experiment run``) places it in an experiment; a plain ``matrec train`` run is grouped
by its parent folder, labelled by its model, with its task options as the swept values.

An earlier ``report.json`` can be read in beside them (``include``): its per-seed entries count as
runs whose directories are gone (made on another machine, or cleaned up), with their final numbers,
evaluations at other settings, loss by position and evaluation curves (kept per seed since reports
could be included; no training-loss curves). A run directory of the same
experiment, scale, cell and seed replaces its entry, so a report grows run by run across machines.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..train.context import position_eval_of_run
from .earlier import run_key, runs_of_report
from .paired import cell_name, named_pairs, paired_differences, paired_section, pairs_section
from .spec import parse_target
from .state import (DamagedRun, check_finished, inspect, read_cell, read_json, read_records, read_status,
                    read_timing)


def _load(path: Path):
    try:
        return read_json(path)
    except DamagedRun:   # a config.json that is no config: not a run directory
        return None


def collect_runs(root: str | Path, warn=None) -> list[dict]:
    """Every run directory under ``root``, read into one record each. A run whose bookkeeping
    files cannot be read is kept with state ``damaged`` and the file named in its ``reason``
    (``warn`` gets that line too); it never stops the report of the others."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"report folder {str(root)!r} is not a folder")
    runs = []
    for config_path in sorted(root.rglob("config.json")):
        run_dir = config_path.parent
        if not (run_dir / "metrics.jsonl").exists():
            continue
        config = _load(config_path)
        if not isinstance(config, dict) or "model" not in config:
            continue
        plain = {"experiment": run_dir.parent.name, "scale": "", "label": config["model"],
                 "swept": {f"task_args.{k}": v for k, v in sorted(config.get("task_args", {}).items())},
                 "seed": config.get("seed", 0), "metric": "loss", "target": None, "matching": "", "size": ""}
        state, damage = inspect(run_dir)
        try:
            if state == "damaged":
                raise DamagedRun(damage)
            cell = read_cell(run_dir) or plain
            summary = read_json(run_dir / "summary.json") or {}
            records = read_records(run_dir)
            timing = {row["step"]: row["train_seconds"] for row in read_timing(run_dir / "timing.jsonl")}
            status = read_status(run_dir)
            if status is None:   # a plain `matrec train` run: its summary says how it ended
                state = {"completed": "done", "non-finite": "failed"}.get(summary.get("status"), "partial")
                if state == "done":
                    check_finished(run_dir, records)
        except DamagedRun as e:
            if warn is not None:
                warn(f"damaged run {str(run_dir)!r}: {e}")
            runs.append(_damaged(run_dir, _readable_cell(run_dir) or _cell_of_siblings(run_dir, config)
                                 or plain, str(e)))
            continue
        if state == "retry":   # failed for a reason of the machine; the next `run` retries it
            state = "failed"
        evals = [r for r in records if r.get("kind") == "eval"]
        trains = [{"step": r["step"], "loss": r["loss"]} for r in records
                  if r.get("kind") == "train" and "loss" in r]
        step = (status or {}).get("step", summary.get("step", evals[-1]["step"] if evals else 0))
        seconds = (status or {}).get("train_seconds", summary.get("train_seconds"))
        run = {"run_dir": str(run_dir), "experiment": cell["experiment"], "scale": cell.get("scale", ""),
               "label": cell["label"], "swept": cell.get("swept", {}), "seed": cell.get("seed"),
               "state": state, "reason": (status or {}).get("reason", summary.get("message", "")),
               "parameters": summary.get("parameters", cell.get("parameters")), "step": step,
               "train_seconds": seconds, "final": evals[-1] if evals else {}, "evals": evals,
               "train_losses": trains, "eval_at": (status or {}).get("eval_at", []),
               "loss_spikes": loss_spikes(trains),
               "metric": cell.get("metric", "loss"), "target": cell.get("target"),
               "matching": cell.get("matching", ""), "size": cell.get("size", ""),
               "position_eval": cell.get("position_eval"), "position": None,
               "target_step": None, "target_seconds": None, "target_seconds_estimated": False}
        if run["target"]:
            target = parse_target(run["target"])
            hit = next((r for r in evals if target.met(r)), None)
            if hit is not None:
                run["target_step"] = hit["step"]
                if hit["step"] in timing:
                    run["target_seconds"] = timing[hit["step"]]
                elif seconds and step:   # a run without timing.jsonl: its mean pace
                    run["target_seconds"] = seconds * hit["step"] / step
                    run["target_seconds_estimated"] = True
        if run["position_eval"] and state == "done":
            run["position"] = _position_of(run_dir, run["position_eval"])
        runs.append(run)
    return runs


def _cell_of_siblings(run_dir: Path, config: dict) -> dict | None:
    """A cell for a run whose own cell.json is damaged, from a sibling run of the same experiment:
    its experiment and settings, the label its folder name starts with, swept values and seed
    from the run's own config.json."""
    cells = [c for c in map(_readable_cell, sorted(p for p in run_dir.parent.iterdir()
                                                     if p.is_dir() and p != run_dir)) if c]
    if not cells:
        return None
    labels = sorted({c["label"] for c in cells if run_dir.name.startswith(c["label"] + "-")}, key=len)
    settings = {**config, **{k: config.get(k, {}) for k in ("task_args", "model_args")}}

    def value(key: str):
        group, _, option = key.partition(".")
        return settings.get(option) if group == "train" else settings[group].get(option)

    return {**cells[0], "label": labels[-1] if labels else config["model"], "seed": config.get("seed"),
            "swept": {k: value(k) for k in cells[0].get("swept", {})}, "size": ""}


def _readable_cell(run_dir: Path) -> dict | None:
    try:
        return read_cell(run_dir)
    except DamagedRun:
        return None


def _damaged(run_dir: Path, cell: dict, damage: str) -> dict:
    """The record of a run whose files cannot be read: counted (as damaged) in its cell, no numbers."""
    return {"run_dir": str(run_dir), "experiment": cell.get("experiment", run_dir.parent.name),
            "scale": cell.get("scale", ""), "label": cell.get("label", "?"), "swept": cell.get("swept", {}),
            "seed": cell.get("seed"), "state": "damaged", "reason": damage,
            "parameters": cell.get("parameters"), "step": 0, "train_seconds": None, "final": {},
            "evals": [], "train_losses": [], "eval_at": [], "loss_spikes": [],
            "metric": cell.get("metric", "loss"), "target": cell.get("target"),
            "matching": cell.get("matching", ""), "size": cell.get("size", ""),
            "position_eval": cell.get("position_eval"), "position": None, "target_step": None,
            "target_seconds": None, "target_seconds_estimated": False}


def _position_of(run_dir: Path, settings: dict) -> dict:
    """The run's loss by position (carried and reset), or ``{"error": ...}``: one run whose
    checkpoint or data cannot be read must not stop the report of the others."""
    try:
        return position_eval_of_run(run_dir, settings["bins"], settings.get("rows"))
    except Exception as e:   # noqa: BLE001 - reported beside the table
        return {"error": f"{type(e).__name__}: {e}"}
SPIKE_RATIO, SPIKE_WINDOW = 1.5, 10


def loss_spikes(train_losses: list[dict], ratio: float = SPIKE_RATIO, window: int = SPIKE_WINDOW) -> list[dict]:
    """The logged training losses above ``ratio`` x the median of the finite ones among the ``window``
    logged losses before them (a loss spike; the first ``window`` records are never spikes)."""
    spikes = []
    for i in range(window, len(train_losses)):
        before = [r["loss"] for r in train_losses[i - window:i] if math.isfinite(r["loss"])]
        loss = train_losses[i]["loss"]
        if not before or not math.isfinite(loss):
            continue
        median = statistics.median(before)
        if loss > ratio * median:
            spikes.append({"step": train_losses[i]["step"], "loss": loss, "median": median})
    return spikes


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _fmt(s: dict, digits: int = 4) -> str:
    if not s["n"]:
        return "-"
    return f"{s['mean']:.{digits}g} ± {s['std']:.2g}"


def _order(value) -> tuple:
    # numbers by value, before anything else (strings, lists) by its JSON text
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (
        1, 0, json.dumps(value, sort_keys=True))


# a metric's chance level, where a table marks means under it: the copy tasks' recall (8 symbols)
CHANCE = {"recall": 1 / 8}


def _fmt_metric(s: dict, metric: str) -> str:
    below = s["n"] and metric in CHANCE and s["mean"] < CHANCE[metric]
    return _fmt(s) + (" (below chance)" if below else "")


def _fmt_count(s: dict) -> str:
    # step counts: a fraction of a step in the mean says nothing
    return f"{s['mean']:.0f} ± {s['std']:.0f}" if s["n"] else "-"


def _position_stats(runs: list[dict]) -> dict:
    """Per bin, mean ± std over the runs of the carried loss, the reset loss and reset - carried."""
    good = [r["position"] for r in runs if r["position"] and "error" not in r["position"]]
    errors = [f"{Path(r['run_dir']).name}: {r['position']['error']}" for r in runs
              if r["position"] and "error" in r["position"]]
    if not good:
        return {"n": 0, "errors": errors}
    first, bins = good[0], range(len(good[0]["bins"]) - 1)
    return {"n": len(good), "errors": errors,
            **{k: first[k] for k in ("bins", "chunk", "context", "rows", "steps")},
            "carried": [_stats([p["carried"][k] for p in good]) for k in bins],
            "reset": [_stats([p["reset"][k] for p in good]) for k in bins],
            "reset_minus_carried": [_stats([p["reset"][k] - p["carried"][k] for p in good]) for k in bins]}


def summarise(runs: list[dict]) -> list[dict]:
    """Runs grouped into experiments (name, scale) and cells (label, swept values)."""
    experiments = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cell_key = (run["label"], json.dumps(run["swept"], sort_keys=True))
        experiments[(run["experiment"], run["scale"])][cell_key].append(run)
    out = []
    for (name, scale), cells in sorted(experiments.items()):
        first = next(iter(cells.values()))[0]
        metric, target = first["metric"], first["target"]
        rows = []
        for (label, _), members in cells.items():
            members.sort(key=lambda r: (r["seed"] is None, r["seed"]))
            ok = [r for r in members if r["state"] == "done"]
            reached = [r for r in ok if r["target_step"] is not None]
            row_position = _position_stats(ok) if members[0].get("position_eval") else None
            rows.append({
                "position": row_position,
                "label": label, "swept": members[0]["swept"], "size": members[0]["size"],
                "parameters": members[0]["parameters"], "runs": len(members), "done": len(ok),
                "failed": sum(r["state"] == "failed" for r in members),
                "partial": sum(r["state"] == "partial" for r in members),
                "damaged": sum(r["state"] == "damaged" for r in members),
                "metric": _stats([r["final"].get(metric) for r in ok]),
                "loss": _stats([r["final"].get("loss") for r in ok]),
                "steps": _stats([r["step"] for r in ok]),
                "train_seconds": _stats([r["train_seconds"] for r in ok]),
                "step_ms": _stats([1000 * r["train_seconds"] / r["step"] for r in ok
                                   if r["train_seconds"] is not None and r["step"]]),
                "eval_at": _eval_at_stats(ok, metric),
                "loss_spikes": sum(len(r.get("loss_spikes", [])) for r in members),
                "target_reached": len(reached),
                "target_step": _stats([r["target_step"] for r in reached]),
                "target_seconds": _stats([r["target_seconds"] for r in reached]),
                # (records built by hand, not by collect_runs, may lack eval_at and loss_spikes)
                "seeds": [{k: r.get(k, []) if k in ("eval_at", "loss_spikes") else r[k]
                           for k in ("seed", "state", "reason", "step", "train_seconds", "final", "eval_at",
                                     "loss_spikes", "target_step", "target_seconds",
                                     "target_seconds_estimated", "run_dir")}
                          | {"position": r.get("position"), "evals": r.get("evals", [])}
                          for r in members]})
        # run folders list in name order (delay1000 before delay300); tables read by the numbers
        rows.sort(key=lambda r: (r["label"], sorted((k, _order(v)) for k, v in r["swept"].items())))
        out.append({"name": name, "scale": scale, "metric": metric, "target": target,
                    "matching": first["matching"], "swept": sorted({k for r in rows for k in r["swept"]}),
                    "cells": rows, "_runs": [r for m in cells.values() for r in m]})
    return out


def _eval_at_stats(runs: list[dict], metric: str) -> list[dict]:
    """Per ``eval_at`` setting (in the order the runs list them): the metric's mean ± std over ``runs``."""
    settings = {}
    for r in runs:
        for e in r.get("eval_at", []):
            settings.setdefault(json.dumps(e["task_args"], sort_keys=True), e["task_args"])
    return [{"task_args": options,
             "metric": _stats([next((e.get(metric) for e in r.get("eval_at", [])
                                     if json.dumps(e["task_args"], sort_keys=True) == key), None) for r in runs])}
            for key, options in settings.items()]


def _eval_at_label(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def table(exp: dict) -> str:
    metric, swept = exp["metric"], exp["swept"]
    extra = []   # the eval_at settings of any cell, in first-seen order
    for c in exp["cells"]:
        for e in c["eval_at"]:
            if e["task_args"] not in extra:
                extra.append(e["task_args"])
    header = ["model", *(k.rsplit(".", 1)[-1] for k in swept), "params", "runs ok", "steps",
              f"{metric} (mean ± std)", *(["loss"] if metric != "loss" else []),
              *(f"{metric} at {_eval_at_label(o)}" for o in extra), "train s", "ms / step", "loss spikes"]
    if exp["target"]:
        header += [f"steps to {exp['target']}", "seconds to target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in exp["cells"]:
        ok = f"{c['done']}/{c['runs']}" + (f" ({c['failed']} failed)" if c["failed"] else "") + (
            f" ({c['partial']} partial)" if c["partial"] else "") + (
            f" ({c['damaged']} damaged)" if c.get("damaged") else "")
        row = [c["label"], *(json.dumps(c["swept"].get(k)) for k in swept),
               "-" if c["parameters"] is None else f"{c['parameters']:,}", ok, _fmt_count(c["steps"]),
               _fmt_metric(c["metric"], metric), *([_fmt(c["loss"])] if metric != "loss" else []),
               *(next((_fmt_metric(e["metric"], metric) for e in c["eval_at"] if e["task_args"] == o), "-")
                 for o in extra),
               _fmt(c["train_seconds"], 3), _fmt(c["step_ms"], 3), str(c["loss_spikes"])]
        if exp["target"]:
            if not c["target_reached"]:
                row += ["not reached", "not reached"]
            else:
                part = "" if c["target_reached"] == c["done"] else f" ({c['target_reached']}/{c['done']} reached)"
                row += [_fmt_count(c["target_step"]) + part, _fmt(c["target_seconds"], 3) + part]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(root: str | Path, out: str | Path | None = None, warn=None,
                 include: list[str | Path] = (), pairs: list[tuple[str, str]] = ()) -> dict:
    """Write ``report.md``, ``report.json`` and the plots into ``out`` (default ``root``); each
    damaged run is named in report.md (and to ``warn``). ``include``: earlier report.json files
    whose runs count beside the directories' (a directory replaces the entry of its run). ``pairs``:
    (A, B) cell names whose per-seed differences A − B are tabled too."""
    runs = collect_runs(root, warn)
    seen = {run_key(r) for r in runs}
    for path in include:   # a run counts once: its directory first, else the first file holding it
        for r in runs_of_report(path):
            if run_key(r) not in seen:
                seen.add(run_key(r))
                runs.append(r)
    if not runs:
        raise FileNotFoundError(f"no run directories (config.json + metrics.jsonl) under {str(root)!r}")
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    experiments = summarise(runs)
    names = {cell_name(c) for exp in experiments for c in exp["cells"]}
    unknown = sorted({n for pair in pairs for n in pair} - names)
    if unknown:
        raise ValueError(f"--pair names {unknown}, not cells of this report; its cells: {sorted(names)}")
    md, plots = [], []
    for exp in experiments:
        title = exp["name"] + (f" ({exp['scale']} scale)" if exp["scale"] else "")
        md += [f"## {title}", ""]
        if exp["matching"]:
            md += [f"Model sizes: {exp['matching']}", ""]
        sizes = {c["label"]: c["size"] for c in exp["cells"] if c["size"]}
        if sizes:
            md += ["Sizes as stated in the file: " + "; ".join(f"{k}: {v}" for k, v in sizes.items()), ""]
        md += [table(exp), ""]
        exp["paired"] = paired_differences(exp)
        md += paired_section(exp["paired"])
        exp["pairs"] = named_pairs(exp, pairs)
        md += pairs_section(exp["metric"], exp["pairs"])
        included = [r for r in exp["_runs"] if r.get("included")]
        if included:
            sources = ", ".join(sorted({r["included"] for r in included}))
            md += [f"{len(included)} of these {len(exp['_runs'])} runs are read from an earlier report "
                   f"({sources}): no training-loss curves, and no evaluation curves from reports older "
                   "than this option.", ""]
        damaged = [r for r in exp["_runs"] if r["state"] == "damaged"]
        if damaged:
            md += ["Damaged runs (counted, no numbers): " + "; ".join(
                f"{Path(r['run_dir']).name}: {r['reason']}" for r in damaged), ""]
        stem = f"{exp['name']}-{exp['scale']}" if exp["scale"] else exp["name"]
        for path in (plot_swept(exp, out / f"{stem}-{exp['metric']}.png"),
                     plot_curves(exp, out / f"{stem}-curves.png"),
                     plot_eval_at(exp, out / f"{stem}-eval_at.png")):
            if path is not None:
                plots.append(str(path))
                md += [f"![{path.stem}]({path.name})", ""]
        if any(c["position"] is not None for c in exp["cells"]):
            md += position_section(exp)
            path = plot_positions(exp, out / f"{stem}-position.png")
            if path is not None:
                plots.append(str(path))
                md += [f"![{path.stem}]({path.name})", ""]
    for exp in experiments:
        del exp["_runs"]
    (out / "report.md").write_text("\n".join(md))
    data = {"experiments": experiments, "plots": plots}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    files = [str(out / "report.md"), str(out / "report.json"), *plots]
    return {"markdown": "\n".join(md), "json": data, "files": files}


def _bin_labels(bins: list[int]) -> list[str]:
    return [f"{lo:,}-{hi:,}" for lo, hi in zip(bins, bins[1:])]


def position_section(exp: dict) -> list[str]:
    """The loss by position in the context: per model, carried, reset every chunk and their
    difference (mean ± std over seeds), one column per bin of positions."""
    cells = [c for c in exp["cells"] if c["position"] is not None]
    ref = next((c["position"] for c in cells if c["position"]["n"]), None)
    lines = ["### Loss by position in the context: state carried vs reset every chunk", ""]
    if ref is None:
        lines += ["No run could be evaluated by position.", ""]
    else:
        lines += [f"The validation stream read as {ref['rows']} segment(s) of {ref['context']:,} steps from "
                  f"a zero state, in chunks of {ref['chunk']} (the training chunk): *carried* passes the "
                  f"state from chunk to chunk, *reset* starts every chunk from a zero state. Per-step "
                  f"loss averaged within each bin of positions, mean ± std over seeds (the done runs); "
                  f"*reset - carried* > 0 means the carried state helps there.", ""]
        header = ["model", "state", *(_bin_labels(ref["bins"]))]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c in cells:
            p = c["position"]
            if not p["n"]:
                lines.append("| " + " | ".join([c["label"], "-", *("-" for _ in ref["bins"][1:])]) + " |")
                continue
            for key, name in (("carried", "carried"), ("reset", f"reset every {p['chunk']}"),
                              ("reset_minus_carried", "reset - carried")):
                lines.append("| " + " | ".join([c["label"], name, *(_fmt(s) for s in p[key])]) + " |")
        lines.append("")
    errors = [e for c in cells for e in c["position"]["errors"]]
    if errors:
        lines += ["Runs that could not be evaluated by position: " + "; ".join(errors), ""]
    return lines


def plot_positions(exp: dict, path: Path) -> Path | None:
    """Loss against the bin of positions, one panel per model: carried (solid) and reset every
    chunk (dashed), error bars = std over seeds."""
    cells = [c for c in exp["cells"] if c["position"] is not None and c["position"]["n"]]
    if not cells:
        return None
    plt = _pyplot()
    ncols = min(len(cells), 3)
    nrows = math.ceil(len(cells) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.1 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax, c in zip(axes.flat, cells):
        p = c["position"]
        x = list(range(len(p["bins"]) - 1))
        for key, style, name in (("carried", "-o", "carried"), ("reset", "--s", f"reset every {p['chunk']}")):
            ax.errorbar(x, [s["mean"] for s in p[key]], yerr=[s["std"] for s in p[key]], fmt=style,
                        capsize=3, label=name)
        ax.set_xticks(x, _bin_labels(p["bins"]), rotation=30, fontsize=7)
        ax.set(title=f"{c['label']} (n={p['n']})", xlabel="position in the context")
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("validation loss")
    fig.suptitle(exp["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_swept(exp: dict, path: Path) -> Path | None:
    """The final metric (mean, error bar = std over seeds) against the first numeric swept value,
    one line per model (and per value of the other swept keys)."""
    numeric = [k for k in exp["swept"] if all(isinstance(c["swept"].get(k), (int, float)) for c in exp["cells"])]
    if not numeric:
        return None
    x_key = numeric[0]
    lines = defaultdict(list)
    for c in exp["cells"]:
        if c["metric"]["n"]:
            rest = ", ".join(f"{k.rsplit('.', 1)[-1]}={c['swept'][k]}" for k in exp["swept"] if k != x_key)
            lines[c["label"] + (f" ({rest})" if rest else "")].append(
                (c["swept"][x_key], c["metric"]["mean"], c["metric"]["std"]))
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in lines.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=label)
    values = [p[0] for pts in lines.values() for p in pts]
    if min(values) > 0 and max(values) / min(values) >= 20:
        ax.set_xscale("log")
    ax.set(xlabel=x_key.rsplit(".", 1)[-1], ylabel=f"final eval {exp['metric']}", title=exp["name"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_eval_at(exp: dict, path: Path) -> Path | None:
    """The metric at each ``eval_at`` setting (mean, error bar = std over seeds) against the first
    task option they share with a number in every setting (e.g. the evaluation delay), one line per
    cell; None when the runs have no such settings."""
    settings = [e["task_args"] for c in exp["cells"] for e in c["eval_at"]]
    keys = [k for k in (settings[0] if settings else {})
            if all(isinstance(o.get(k), (int, float)) and not isinstance(o.get(k), bool) for o in settings)]
    if not keys:
        return None
    x_key, lines = keys[0], {}
    for c in exp["cells"]:
        pts = sorted((e["task_args"][x_key], e["metric"]["mean"], e["metric"]["std"])
                     for e in c["eval_at"] if e["metric"]["n"])
        if pts:
            swept = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in c["swept"].items())
            lines[c["label"] + (f" (trained at {swept})" if swept else "")] = pts
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in lines.items():
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=label)
    if exp["metric"] in CHANCE:   # a share: the whole range, so chance does not look like a rise
        ax.axhline(CHANCE[exp["metric"]], color="grey", lw=0.8, ls=":", label="chance")
        ax.set_ylim(0, 1.02)
    values = [p[0] for pts in lines.values() for p in pts]
    if min(values) > 0 and max(values) / min(values) >= 20:
        ax.set_xscale("log")
    ax.set(xlabel=f"evaluation {x_key}", ylabel=exp["metric"], title=f"{exp['name']}: evaluated beyond training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(exp: dict, path: Path) -> Path | None:
    """Learning curves: the eval metric against step, mean over seeds with a band from the lowest
    to the highest seed; one panel per combination of swept values. With the loss as the metric,
    the logged training loss too (dashed, mean over seeds, same colour)."""
    metric = exp["metric"]
    panels = defaultdict(lambda: defaultdict(list))
    train_panels = defaultdict(lambda: defaultdict(list))
    for run in exp["_runs"]:
        curve = {r["step"]: r[metric] for r in run["evals"] if metric in r}
        if curve:
            panels[json.dumps(run["swept"], sort_keys=True)][run["label"]].append(curve)
        if metric == "loss" and run.get("train_losses"):
            train_panels[json.dumps(run["swept"], sort_keys=True)][run["label"]].append(
                {r["step"]: r["loss"] for r in run["train_losses"]})
    if not panels:
        return None
    plt = _pyplot()
    keys = sorted(panels)[:8]
    labels = list(dict.fromkeys(label for key in keys for label in panels[key]))
    # one colour per model across panels; more than 10 models need a 20-colour map to stay distinct
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colours = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    wide = len(labels) > 6   # a long legend goes beside the panel, not over the curves
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys) + 2.2 * wide, 3.6 + 0.8 * wide),
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, curves in panels[key].items():
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            vals = [[c[s] for c in curves] for s in steps]
            line, = ax.plot(steps, [statistics.fmean(v) for v in vals], label=f"{label} (n={len(curves)})",
                            color=colours[label])
            if len(curves) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2,
                                color=line.get_color())
            train = train_panels[key].get(label, [])
            train_steps = sorted(set.intersection(*(set(c) for c in train))) if train else []
            if train_steps:
                ax.plot(train_steps, [statistics.fmean(c[s] for c in train) for s in train_steps], "--",
                        color=line.get_color(), linewidth=0.8)
        swept = json.loads(key)
        ax.set(xlabel="step", ylabel=f"eval {metric}" + (" (train dashed)" if train_panels else ""),
               title=", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in swept.items()) or exp["name"])
        if metric == "loss":
            ax.set_yscale("log")
        if wide:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
