"""The copy task (docs/tasks.md, "The tasks"): remember 10 symbols across a delay of ``T`` blanks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TASKS, Task, check_int, check_split

BLANK, MARKER = 0, 9


@TASKS.register("copy")
class Copy(Task):
    """Input: ``n`` symbols from 1..8, ``delay - 1`` blanks, the marker 9, ``n`` blanks
    (length ``delay + 2n``). Target: blanks, then the ``n`` symbols in the last ``n`` positions.

    The loss is cross-entropy over every position; a memoryless model reaches
    ``n ln 8 / (delay + 2n)`` (``baseline``), i.e. chance on the recall. ``recall`` is the accuracy
    on the last ``n`` positions (chance 1/8).
    """

    name = "copy"
    vocab_size = 10
    output_size = 9  # blank + 8 symbols

    def __init__(self, delay: int = 100, n_symbols: int = 10, alphabet: int = 8) -> None:
        if alphabet != 8:
            raise ValueError(f"alphabet must be 8 (symbols 1..8, blank 0, marker 9), got {alphabet!r}")
        self.delay, self.n = check_int("delay", delay), check_int("n_symbols", n_symbols)
        self.length = delay + 2 * n_symbols
        self.baseline = n_symbols * math.log(alphabet) / self.length

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_split(split)
        n, L, batch_size = self.n, self.length, check_int("batch_size", batch_size)
        symbols = torch.randint(1, 9, (batch_size, n), generator=generator)
        x = torch.full((batch_size, L), BLANK, dtype=torch.long)
        x[:, :n] = symbols
        x[:, L - n - 1] = MARKER
        y = torch.full((batch_size, L), BLANK, dtype=torch.long)
        y[:, L - n:] = symbols
        return x, y

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        recall = (output[:, -self.n:].argmax(-1) == target[:, -self.n:]).float().mean()
        return {"loss": float(self.loss(output, target)), "recall": float(recall)}
