"""Several models on one task, one after another on the same data: one table, one plot."""
from __future__ import annotations

import json
from pathlib import Path

from ..data.tasks import build_task
from ..models import build_model
from .config import TrainConfig
from .rundir import RunDirError, read_metrics
from .trainer import Trainer


def run_compare(base: TrainConfig, variants: list[dict], out_dir: str | Path) -> list[dict]:
    """Train ``base`` updated by each dict in ``variants`` (e.g. ``{"model": "gru"}``; an optional
    ``"label"`` names the row) into ``out_dir/<label>/``; write ``results.json``, ``results.md`` and
    ``compare.png`` there (rank 0 alone under torchrun) and return one summary per variant."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RunDirError(f"compare folder {str(out_dir)!r} exists and is not an empty folder; a "
                          f"comparison never overwrites one: choose another out folder (--out)")
    runs = []
    for variant in variants:
        variant = dict(variant)
        label = variant.pop("label", None) or variant.get("model", base.model)
        while label in [lab for lab, _ in runs]:
            label += "'"
        runs.append((label, TrainConfig.from_dict({**base.to_dict(), **variant, "run_name": label,
                                                   "out_dir": str(out_dir)})))
    check_buildable([cfg for _, cfg in runs])
    results, main = [], True
    for label, cfg in runs:
        trainer = Trainer(cfg, run_dir=out_dir / label)
        main = trainer.dist.is_main
        summary = trainer.train()
        summary["label"] = label
        results.append(summary)
    if not main:   # under torchrun only rank 0 writes
        return results
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(format_table(results) + "\n")
    plot_compare(out_dir, results)
    return results


def check_buildable(configs: list[TrainConfig]) -> None:
    """Build each config's task and model once, before any training: an option that only some of
    the models accept must fail before the first one has trained, not after."""
    tasks = {}
    for cfg in configs:
        key = json.dumps([cfg.task, cfg.task_args], sort_keys=True, default=repr)
        if key not in tasks:
            tasks[key] = build_task(cfg.task, **cfg.task_args)
        try:
            build_model(cfg.model, **tasks[key].model_io(), **cfg.model_args)
        except (TypeError, ValueError) as e:
            kind = TypeError if isinstance(e, TypeError) else ValueError
            raise kind(f"model {cfg.model!r} with model_args {cfg.model_args}: {e}") from None


def format_table(results: list[dict]) -> str:
    """A markdown table: one row per model, its final evaluation and its training time."""
    keys = sorted({k for r in results for k in r["eval"] if k != "loss"})
    header = ["model", "params", "steps", "train s", "eval loss", *keys, "baseline loss"]
    rows = []
    for r in results:
        base = "-" if r["baseline"] is None else f"{r['baseline']:.4f}"
        rows.append([r["label"], f"{r['parameters']:,}", str(r["step"]), f"{r['train_seconds']:.1f}",
                     f"{r['eval'].get('loss', float('nan')):.4f}",
                     *(f"{r['eval'][k]:.4f}" if k in r["eval"] else "-" for k in keys), base])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot_compare(out_dir: Path, results: list[dict]) -> Path:
    """Eval loss (and each other eval metric) against step, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {r["label"]: [m for m in read_metrics(Path(r["run_dir"]) / "metrics.jsonl")
                           if m["kind"] == "eval"] for r in results}
    keys = ["loss"] + sorted({k for r in results for k in r["eval"] if k != "loss"})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, evals in curves.items():
            ax.plot([m["step"] for m in evals if key in m], [m[key] for m in evals if key in m],
                    "o-", ms=3, label=label)
        if key == "loss":
            baseline = results[0]["baseline"]
            if baseline is not None:
                ax.axhline(baseline, ls="--", color="gray", label="memoryless baseline")
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=f"eval {key}")
        ax.legend()
    task = results[0]["task"]
    fig.suptitle(f"{task}: " + " vs ".join(curves))
    fig.tight_layout()
    path = out_dir / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
