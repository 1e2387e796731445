"""The loss as a function of the position in a long context, with the state carried or reset.

A stream task's validation sequence is cut into ``rows`` contiguous segments of ``context`` steps
(``context`` = the last bin edge, rounded up to whole chunks of the task's ``seq_len``). The model
reads each segment chunk by chunk from a zero state, either carrying its state from chunk to chunk
(as in training: the recurrent state, Transformer-XL's memory, a window's KV cache) or resetting it
before every chunk. The per-step loss is averaged within each bin of positions ``[bins[k],
bins[k+1])``; at equal position, carried minus reset is what the state brought from earlier chunks
is worth. In the first chunk both are the same computation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checks import check_int, is_int
from ..data.tasks import Task
from .checkpoint import load_for_inference, write_json_atomic
from .trainer import detach_state

CACHE_FILE = "position_eval.json"


def check_bins(bins, argument: str = "bins") -> list[int]:
    """``bins`` if it is a list of >= 2 strictly increasing ints starting at 0, else a ValueError."""
    if (not isinstance(bins, (list, tuple)) or len(bins) < 2 or bins[0] != 0
            or not all(is_int(b) for b in bins)
            or any(b >= c for b, c in zip(bins, bins[1:]))):
        raise ValueError(f"{argument} must be a list of at least 2 strictly increasing ints starting at 0 "
                         f"(bin edges, e.g. [0, 256, 1024, 4096, 30000]), got {bins!r}")
    return list(bins)


def plan(task: Task, bins, rows: int | None = None) -> dict:
    """The evaluation's layout: ``chunk`` (the task's seq_len), ``chunks`` per segment, ``context``
    (chunks * chunk) and ``rows`` (given, or as many segments of ``context`` steps as the validation
    sequence holds); a ValueError when the task is not a stream or its validation part is too short."""
    bins = check_bins(bins)
    if not task.stream:
        raise ValueError(f"the loss by position needs a stream task (its state carried across chunks); "
                         f"task {task.name!r} is not one")
    chunk = task.seq_len
    chunks = math.ceil(bins[-1] / chunk)
    context = chunks * chunk
    fits = (task.stream_length("val") - 1) // context
    check_int("rows", rows, allow_none=True)
    if fits < (rows or 1):
        raise ValueError(f"the validation stream of task {task.name!r} ({task.stream_length('val'):,} steps) "
                         f"holds {fits} segment(s) of {context:,} steps (the last bin edge {bins[-1]:,} "
                         f"in chunks of {chunk}), not rows={rows or 1}; use smaller bins or fewer rows")
    rows = fits if rows is None else rows
    return {"bins": bins, "chunk": chunk, "chunks": chunks, "context": context, "rows": rows}


@torch.no_grad()
def loss_by_position(model: nn.Module, task: Task, bins, *, carry: bool = True, rows: int | None = None,
                     device: str | torch.device = "cpu") -> dict:
    """Mean per-step loss in each bin of positions, over ``rows`` segments of the validation stream.

    Returns ``{"bins", "chunk", "chunks", "context", "rows", "carry", "loss": [per bin], "steps":
    [steps averaged per bin]}`` (``steps`` = positions in the bin * rows).
    """
    layout = plan(task, bins, rows)
    edges = np.asarray(layout["bins"])
    T, rows = layout["chunk"], layout["rows"]
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    was_training = model.training
    model.eval()
    state = None
    for index in range(layout["chunks"]):
        x, y = task.batch_at("val", rows, index)
        out, new_state = model(x.to(device), state if carry else None)
        state = detach_state(new_state)
        losses = task.token_losses(out.float(), y.to(device)).sum(0).double().cpu().numpy()   # [T]
        positions = index * T + np.arange(T)
        inside = positions < edges[-1]
        which = np.searchsorted(edges, positions[inside], side="right") - 1
        np.add.at(sums, which, losses[inside])
        np.add.at(counts, which, rows)
    model.train(was_training)
    return {**layout, "carry": carry, "loss": (sums / counts).tolist(), "steps": counts.astype(int).tolist()}


def position_eval_of_run(run_dir: str | Path, bins, rows: int | None = None,
                         device: str | torch.device | None = None) -> dict:
    """:func:`loss_by_position` of a run's latest checkpoint, carried and reset:
    ``{"step", "bins", ..., "carried": [per bin], "reset": [per bin]}``, on ``device`` (default:
    CUDA when available, else the CPU).

    The result is kept in ``<run_dir>/position_eval.json`` and reused while the checkpoint step,
    bins and rows are the same (not kept when the folder is read-only).
    """
    run_dir = Path(run_dir)
    bins = check_bins(bins)
    cache = run_dir / CACHE_FILE
    cfg, task, model, meta = load_for_inference(run_dir)
    try:
        kept = json.loads(cache.read_text())
        if kept["step"] == meta["step"] and kept["bins"] == bins and kept["rows_asked"] == rows:
            return kept
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        pass
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    carried = loss_by_position(model, task, bins, carry=True, rows=rows, device=device)
    reset = loss_by_position(model, task, bins, carry=False, rows=rows, device=device)
    result = {"step": meta["step"], "rows_asked": rows,
              **{k: carried[k] for k in ("bins", "chunk", "chunks", "context", "rows", "steps")},
              "carried": carried["loss"], "reset": reset["loss"]}
    try:
        write_json_atomic(cache, result)
    except OSError:   # a read-only copy of the runs still reports
        pass
    return result
