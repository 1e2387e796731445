"""The run directory: metrics as JSON lines (+ TensorBoard), the plot, the summary.

``<run>/``::

    config.json      the resolved TrainConfig
    metrics.jsonl    one JSON object per line: {"kind": "train"|"eval", "step": int, ...numbers}
    tb/              TensorBoard events (same numbers)
    plot.png         loss (and task metrics) against step
    checkpoints/     see matrec.train.checkpoint
    summary.json     final status, step, metrics, wall time, parameter count

``metrics.jsonl`` holds only numbers that the run's seed determines (no timings), so a resumed run
writes exactly the file an uninterrupted one would.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable


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
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            try:
                json.loads(lines[-1] if lines else "null")
            except json.JSONDecodeError:
                lines.pop()   # a process killed mid-append leaves a partial last line
            records = [json.loads(line) for line in lines]
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


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
