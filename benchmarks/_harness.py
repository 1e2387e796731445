"""The one harness every benchmark script uses: timing with warm-up, the reference check, tables.

(The leading underscore keeps ``matrec bench`` from running this file as a benchmark.)

A script builds :class:`Table` objects (rows are dicts of plain values), prints them as markdown
(``benchmarks/results/`` records that text) and returns them from ``main``, so tests check the
numbers, not the printed text; ``--json PATH`` (:func:`add_json_argument`) writes the same rows.

Timing rule: the minimum over ``repeats`` runs after ``warmup`` untimed ones. On a shared machine
other processes only ever add time, so the least disturbed run is the best estimate; candidates
compared with each other are run round-robin (:func:`best_ms_each`) so a burst of load hits all alike.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_ms_each(fns: dict[str, Callable[[], object]], device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best wall time in milliseconds of each function, run round-robin after ``warmup`` rounds."""
    return {name: min(t) for name, t in times_ms_each(fns, device, repeats, warmup).items()}


def times_ms_each(fns: dict[str, Callable[[], object]], device, repeats: int,
                  warmup: int = 1) -> dict[str, list[float]]:
    """Every timed run's wall time in milliseconds, per function, run round-robin after ``warmup``
    rounds (:func:`best_ms_each` keeps the minimum; a script may report the median instead)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def best_ms(fn: Callable[[], object], device, repeats: int, warmup: int = 1) -> float:
    """Best wall time of ``fn`` in milliseconds (see :func:`best_ms_each`)."""
    return best_ms_each({"fn": fn}, device, repeats, warmup)["fn"]


def module_fwd_bwd(module, x) -> Callable[[], None]:
    """One forward and backward of a recurrent module (``out, state = module(x)``), grads cleared after."""
    def run():
        out, _ = module(x)
        out.sum().backward()
        module.zero_grad(set_to_none=True)

    return run


def relative_error(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def check_close(pairs: Sequence[tuple[str, Tensor, Tensor]], tol: float) -> str | None:
    """None when every ``(name, value, reference)`` agrees within relative ``tol``, else why not.

    Every benchmark checks a candidate against its reference this way before timing it, and
    reports a failure instead of a time.
    """
    for name, value, ref in pairs:
        if value.shape != ref.shape:
            return f"{name} shape {tuple(value.shape)} != reference {tuple(ref.shape)}"
        err = relative_error(value, ref)
        if not err < tol:
            return f"{name} relative error {err:.2e} > {tol:.0e}"
    return None


@dataclass
class Table:
    """Rows of one result table: ``columns`` maps each key to its printed header and ``formats``
    gives a format for numeric cells (``"{:.2f}"``). A missing or None cell prints empty.

    With ``stream=True`` the header prints on the first row and each row as it is added (long runs
    show progress); otherwise :meth:`markdown` renders everything at once.
    """

    columns: dict[str, str]
    title: str | None = None
    formats: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    rows: list[dict] = field(default_factory=list)

    def add(self, **cells) -> dict:
        unknown = sorted(set(cells) - set(self.columns))
        if unknown:
            raise KeyError(f"cells {unknown} are not columns of this table ({list(self.columns)})")
        if self.stream and not self.rows:
            print("\n".join(self._head()), flush=True)
        self.rows.append(cells)
        if self.stream:
            print(self._line(cells), flush=True)
        return cells

    def column(self, key: str) -> list:
        return [row.get(key) for row in self.rows]

    def _head(self) -> list[str]:
        head = [f"### {self.title}", ""] if self.title else []
        return head + ["| " + " | ".join(self.columns.values()) + " |", "|" + "---|" * len(self.columns)]

    def _cell(self, key: str, value) -> str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in self.formats:
            return self.formats[key].format(value)
        return str(value)

    def _line(self, row: dict) -> str:
        return "| " + " | ".join(self._cell(k, row.get(k)) for k in self.columns) + " |"

    def markdown(self) -> str:
        return "\n".join(self._head() + [self._line(r) for r in self.rows])

    def print(self) -> None:
        """Print the table (with ``stream=True`` the rows are already out: nothing to do)."""
        if not self.stream:
            print(self.markdown() + "\n", flush=True)

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": list(self.columns), "rows": self.rows}


def add_quick_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--quick``: small sizes, for smoke runs and ``matrec bench --quick``. A script that calls this
    also declares ``QUICK = what`` at module level, which is how ``matrec bench`` knows, without
    running the script, that it has a quick mode (a test checks the two agree for every script)."""
    parser.add_argument("--quick", action="store_true", help=what)


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result rows as JSON")


def write_json(path: str | None, tables: Sequence[Table], **meta) -> None:
    """Write ``tables`` (and ``meta``: device, settings) to ``path`` when one is given."""
    if path:
        with open(path, "w") as f:
            json.dump({**meta, "tables": [t.to_dict() for t in tables]}, f, indent=1)
