"""The copy task (docs/tasks.md, "The tasks"): remember 10 symbols across a delay of ``T`` blanks,
and its variant whose delay varies per sequence (the marker says when to answer)."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TASKS, Task, check_int, check_split

BLANK, MARKER = 0, 9
LOSS_ON = ("all", "answers")


@TASKS.register("copy")
class Copy(Task):
    """Input: ``n`` symbols from 1..8, ``delay - 1`` blanks, the marker 9, ``n`` blanks
    (length ``delay + 2n``). Target: blanks, then the ``n`` symbols in the last ``n`` positions.

    ``loss_on="all"`` (the default, the standard copy loss): cross-entropy over every position; a
    memoryless model reaches ``n ln 8 / (delay + 2n)`` (``baseline``), i.e. chance on the recall.
    ``loss_on="answers"``: cross-entropy over the ``n`` answer positions only (baseline ``ln 8``), so
    the recall's share of the loss does not shrink as the delay grows. ``recall`` is the accuracy on
    the answer positions (chance 1/8).

    Long sequences can be read in chunks (``chunks``) and scored from sums (``metric_sums``), so an
    evaluation at a delay of a million steps holds one chunk at a time.
    """

    name = "copy"
    vocab_size = 10
    output_size = 9  # blank + 8 symbols
    chunkable = True

    def __init__(self, delay: int = 100, n_symbols: int = 10, alphabet: int = 8, loss_on: str = "all") -> None:
        if alphabet != 8:
            raise ValueError(f"alphabet must be 8 (symbols 1..8, blank 0, marker 9), got {alphabet!r}")
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {list(LOSS_ON)}, got {loss_on!r}")
        self.delay, self.n = check_int("delay", delay), check_int("n_symbols", n_symbols)
        self.loss_on = loss_on
        self.length = delay + 2 * n_symbols
        self.baseline = (n_symbols * math.log(alphabet) / self.length if loss_on == "all"
                         else math.log(alphabet))

    def _draw(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The random part of a batch: symbols ``[B, n]`` and each sequence's delay ``[B]``."""
        symbols = torch.randint(1, 9, (batch_size, self.n), generator=generator)
        return symbols, torch.full((batch_size,), self.delay, dtype=torch.long)

    def _layout(self, symbols: Tensor, delays: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Positions ``[start, stop)`` of the batch given by ``symbols`` and ``delays``: the marker at
        ``delay + n - 1``, the answer at ``[delay + n, delay + 2n)``, blanks elsewhere."""
        n = self.n
        pos = torch.arange(start, stop).unsqueeze(0)                       # [1, T]
        x = torch.full((symbols.shape[0], stop - start), BLANK, dtype=torch.long)
        y = torch.full_like(x, BLANK)
        if start < n:
            x[:, :min(stop, n) - start] = symbols[:, start:min(stop, n)]
        x[pos == (delays + n - 1).unsqueeze(1)] = MARKER
        k = pos - (delays + n).unsqueeze(1)                                  # [B, T] index into the answer
        answer = (k >= 0) & (k < n)
        y[answer] = symbols.gather(1, k.clamp(0, n - 1))[answer]
        return x, y

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_split(split)
        symbols, delays = self._draw(check_int("batch_size", batch_size), generator)
        return self._layout(symbols, delays, 0, self.length)

    def chunks(self, split: str, batch_size: int, generator: torch.Generator,
               chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batch ``get_batch`` would draw with ``generator``, as consecutive ``(x, y)`` pieces of at
        most ``chunk`` steps (only one piece exists at a time)."""
        check_split(split)
        symbols, delays = self._draw(check_int("batch_size", batch_size), generator)
        chunk = check_int("chunk", chunk)
        for start in range(0, self.length, chunk):
            yield self._layout(symbols, delays, start, min(self.length, start + chunk))

    @staticmethod
    def _answers(target: Tensor) -> Tensor:
        return target != BLANK   # [B, T]: the answer positions (symbols are 1..8, never blank)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.loss_on == "answers":
            mask = self._answers(target)
            return F.cross_entropy(output[mask].float(), target[mask])
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))

    @torch.no_grad()
    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, tuple[float, int]]:
        """Each metric as ``(sum, count)`` over this piece of the sequences; summed over the pieces of
        a chunked read and divided, they give :meth:`metrics` of the whole."""
        mask = self._answers(target)
        losses = F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1),
                                 reduction="none").view(target.shape)
        scored = mask if self.loss_on == "answers" else torch.ones_like(mask)
        hits = (output.argmax(-1) == target) & mask
        return {"loss": (float(losses[scored].double().sum()), int(scored.sum())),
                "recall": (float(hits.sum()), int(mask.sum()))}

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {k: s / max(c, 1) for k, (s, c) in self.metric_sums(output, target).items()}


@TASKS.register("copy_variable")
class CopyVariable(Copy):
    """Copy with a delay drawn per sequence, uniform in ``[min_delay, delay]`` (``min_delay=0``, the
    default: ``delay // 2``): ``n`` symbols, ``d - 1`` blanks, the marker 9, the ``n``-symbol
    answer, then blanks up to the common length ``delay + 2n``. Only the marker says when to answer,
    so a model learns to hold the symbols for any delay, not for one. ``min_delay = delay`` is the
    plain copy task (what an evaluation at one long delay uses).

    Loss, ``loss_on`` and ``recall`` as for ``copy``; ``baseline`` is the memoryless loss of the
    common length (``n ln 8 / (delay + 2n)``, or ``ln 8`` on the answers).
    """

    name = "copy_variable"

    def __init__(self, delay: int = 1000, min_delay: int = 0, n_symbols: int = 10,
                 alphabet: int = 8, loss_on: str = "all") -> None:
        super().__init__(delay, n_symbols, alphabet, loss_on)
        # 0: the default range [delay // 2, delay] (an int, so `--task-arg min_delay=N` parses as one)
        self.min_delay = check_int("min_delay", max(1, delay // 2) if min_delay == 0 else min_delay)
        if self.min_delay > delay:
            raise ValueError(f"min_delay must be <= delay ({delay}), got {min_delay!r}")

    def _draw(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        symbols = torch.randint(1, 9, (batch_size, self.n), generator=generator)
        return symbols, torch.randint(self.min_delay, self.delay + 1, (batch_size,), generator=generator)
