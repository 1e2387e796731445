"""Reading long sequences in order, for tasks trained with truncated back-propagation.

A stream task cuts each split's one long sequence into ``batch_size`` contiguous segments, one per
batch row, and returns chunk ``index`` of every segment: batch ``index + 1`` continues exactly
where batch ``index`` stopped, so the trainer carries the model's state across batches. The chunk
is a pure function of ``(split, batch_size, index)`` (:meth:`StreamMixin.batch_at`); ``get_batch``
reads the next index from a per-split cursor, which ``state_dict``/``load_state_dict`` checkpoint.
After the last whole chunk of a segment the cursor wraps to its start (one discontinuity per pass).

A stream of packed documents (``_starts(split)`` an array of document starts, e.g. ``documents``)
also gives, with :meth:`StreamMixin.get_packed_batch`, ``starts [B, T]``: True at the first step of
each document and at the first step of each pass over a row's segment, where the model's state
restarts (the mixer protocol's packed documents, :mod:`matrec.nn.protocol`).

With several processes (DistributedDataParallel) every rank should ask for the global batch and
keep its own rows (e.g. ``x[rank::world]``): the cursors then advance alike on every rank and each
row stays one continuous stream, whatever the number of processes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import SPLITS, check_int, check_split


class StreamMixin:
    """Mix in before a Task that defines ``seq_len`` and ``_series(split) -> 1-D numpy array``.

    ``_pair(chunk)`` turns a ``[B, seq_len + 1]`` numpy chunk into the task's ``(x, y)``.
    """

    stream = True
    seq_len: int

    def _cursor(self) -> dict[str, int]:
        if not hasattr(self, "_cursors"):
            self._cursors = {split: 0 for split in SPLITS}
        return self._cursors

    def stream_length(self, split: str) -> int:
        """Steps in ``split``'s one long sequence (batches read ``batch_size`` segments of it)."""
        return len(self._series(check_split(split)))

    def chunks_per_pass(self, split: str, batch_size: int) -> int:
        """How many consecutive batches one pass over ``split`` gives at ``batch_size`` rows."""
        segment = (len(self._series(check_split(split))) - 1) // check_int("batch_size", batch_size)
        if segment < self.seq_len:
            raise ValueError(f"batch_size * seq_len must fit in the {split} split "
                             f"({len(self._series(split)):,} steps), got {batch_size} * {self.seq_len}")
        return segment // self.seq_len

    def _steps_at(self, split: str, batch_size: int, index: int) -> np.ndarray:
        """The stream positions ``[B, T + 1]`` of batch number ``index``."""
        chunks = self.chunks_per_pass(split, batch_size)
        segment = (len(self._series(split)) - 1) // batch_size
        first = np.arange(batch_size) * segment + (check_int("index", index, 0) % chunks) * self.seq_len
        return first[:, None] + np.arange(self.seq_len + 1)

    def _starts(self, split: str) -> np.ndarray | None:
        """Bool per step of ``split``'s stream: True where a document starts (None: one sequence)."""
        return None

    def batch_at(self, split: str, batch_size: int, index: int) -> tuple[Tensor, Tensor]:
        """Batch number ``index`` of the stream (pure: no cursor, no randomness)."""
        return self._pair(self._series(split)[self._steps_at(split, batch_size, index)])   # [B, T + 1]

    def packed_batch_at(self, split: str, batch_size: int, index: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``batch_at`` and its ``starts [B, T]`` (None for a stream of one sequence): True where a
        document starts and, in the first batch of each pass, at every row's first step."""
        marks = self._starts(check_split(split))
        x, y = self.batch_at(split, batch_size, index)
        if marks is None:
            return x, y, None
        starts = marks[self._steps_at(split, batch_size, index)[:, :-1]]   # [B, T]
        if index % self.chunks_per_pass(split, batch_size) == 0:
            starts[:, 0] = True
        return x, y, torch.from_numpy(starts)

    def _next_index(self, split: str) -> int:
        cursor = self._cursor()
        index = cursor[check_split(split)]
        cursor[split] = index + 1
        return index

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
        """The next batch of ``split``'s stream; ``generator`` is unused (the order is fixed)."""
        return self.batch_at(split, batch_size, self._next_index(split))

    def get_packed_batch(self, split: str, batch_size: int, generator: torch.Generator | None = None
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`get_batch` with its ``starts`` (:meth:`packed_batch_at`)."""
        return self.packed_batch_at(split, batch_size, self._next_index(split))

    def reset(self, split: str | None = None) -> None:
        """Rewind ``split`` (or every split) to the start of its stream, e.g. before an evaluation."""
        for s in SPLITS if split is None else (check_split(split),):
            self._cursor()[s] = 0

    def state_dict(self) -> dict:
        return {"cursor": dict(self._cursor())}

    def load_state_dict(self, state: dict) -> None:
        cursor = state.get("cursor") if isinstance(state, dict) else None
        if not isinstance(cursor, dict) or set(cursor) != set(SPLITS):
            raise ValueError(f"state must be {{'cursor': {{'train': int, 'val': int}}}} as returned by "
                             f"state_dict(), got {state!r}")
        self._cursors = {s: check_int(f"cursor[{s!r}]", cursor[s], 0) for s in SPLITS}
