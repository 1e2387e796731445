"""Paired differences between a report's cells, seed by seed.

Seed ``s`` gives every model of an experiment the same batches, so much of the spread between seeds
is shared: one seed is harder for all of them. The difference between two models on the same seed
removes that shared part, and a difference with the same sign on every seed is a sharper result
than two means whose ± overlap. Each cell is compared with the experiment's best cell (by mean).
"""
from __future__ import annotations

import statistics

# which way is better, per metric; a metric not named here gets no paired section
LOWER_IS_BETTER = {"loss", "bits_per_token", "mse", "mae"}
HIGHER_IS_BETTER = {"accuracy", "recall"}


def cell_name(cell: dict) -> str:
    """The cell's label and its swept values, e.g. ``attn lr=0.001``."""
    swept = " ".join(f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(cell["swept"].items()))
    return f"{cell['label']} {swept}".strip()


def _per_seed(cell: dict, metric: str) -> dict:
    # (a run made without a seed, e.g. a plain `matrec train` run, pairs with nothing)
    return {s["seed"]: s["final"][metric] for s in cell["seeds"]
            if s["state"] == "done" and s["seed"] is not None and s["final"].get(metric) is not None}


def _differences(a: dict, b: dict) -> dict:
    """seed -> a's value minus b's, over the seeds both have."""
    return {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))}


def paired_differences(exp: dict) -> dict | None:
    """Each cell minus the best cell, per shared seed (``exp``: one experiment of ``summarise``).
    None when the metric's direction is unknown or fewer than two cells have two or more seeds."""
    metric = exp["metric"]
    if metric not in LOWER_IS_BETTER | HIGHER_IS_BETTER:
        return None
    values = {cell_name(c): _per_seed(c, metric) for c in exp["cells"]}
    values = {name: v for name, v in values.items() if len(v) >= 2}
    if len(values) < 2:
        return None
    pick = min if metric in LOWER_IS_BETTER else max
    best = pick(values, key=lambda name: statistics.fmean(values[name].values()))
    sign = 1 if metric in LOWER_IS_BETTER else -1   # sign * difference < 0: better than the reference
    rows = []
    for name, v in values.items():
        diffs = _differences(v, values[best])
        if name == best or len(diffs) < 2:
            continue
        rows.append({"cell": name, "differences": diffs, "mean": statistics.fmean(diffs.values()),
                     "seeds_better": sum(sign * d < 0 for d in diffs.values()), "seeds": len(diffs)})
    rows.sort(key=lambda r: sign * r["mean"])
    return {"metric": metric, "reference": best, "rows": rows}


def named_pairs(exp: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """``A − B`` per shared seed for each named pair of cells (names as :func:`cell_name` gives them)
    present in ``exp``; a pair naming a cell that ``exp`` lacks is left out."""
    values = {cell_name(c): _per_seed(c, exp["metric"]) for c in exp["cells"]}
    rows = []
    for a, b in pairs:
        if a not in values or b not in values:
            continue
        diffs = _differences(values[a], values[b])
        rows.append({"a": a, "b": b, "differences": diffs,
                     "mean": statistics.fmean(diffs.values()) if diffs else None})
    return rows


def pairs_section(metric: str, rows: list[dict]) -> list[str]:
    """report.md lines for :func:`named_pairs`."""
    if not rows:
        return []
    seeds = sorted({s for r in rows for s in r["differences"]})
    lines = [f"Named pairs: A's {metric} minus B's, on the same seed:", "",
             "| A − B | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|" + "---|" * (len(seeds) + 2)]
    for r in rows:
        cells = [f"{r['differences'][s]:+.4f}" if s in r["differences"] else "-" for s in seeds]
        mean = "-" if r["mean"] is None else f"{r['mean']:+.4f}"
        lines.append(f"| {r['a']} − {r['b']} | " + " | ".join(cells) + f" | {mean} |")
    return lines + [""]


def parse_pair(text: str) -> tuple[str, str]:
    """``"A:B"`` (two cell names) -> ``("A", "B")``."""
    parts = [p.strip() for p in str(text).split(":")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--pair must read A:B with two cell names (a label, then any swept values as "
                         f"'lr=0.001'), got {text!r}")
    return parts[0], parts[1]


def paired_section(paired: dict | None) -> list[str]:
    """report.md lines for :func:`paired_differences` (none when it is None)."""
    if not paired or not paired["rows"]:
        return []
    seeds = sorted({s for r in paired["rows"] for s in r["differences"]})
    header = ["model", *(f"seed {s}" for s in seeds), "mean", "seeds better than the reference"]
    lines = [f"Paired differences: each model's {paired['metric']} minus {paired['reference']}'s (the best "
             "mean), on the same seed (same batches):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in paired["rows"]:
        cells = [f"{r['differences'][s]:+.4f}" if s in r["differences"] else "-" for s in seeds]
        lines.append("| " + " | ".join([r["cell"], *cells, f"{r['mean']:+.4f}",
                                        f"{r['seeds_better']}/{r['seeds']}"]) + " |")
    return lines + [""]
