"""The adding problem (docs/tasks.md, "The tasks"): add the two marked numbers of a long sequence."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TASKS, Task, check_int, check_split


@TASKS.register("adding")
class Adding(Task):
    """Features ``[B, T, 2]``: channel 0 holds values from U[0, 1], channel 1 a mask with one 1 in
    each half of the sequence. Target ``[B]``: the sum of the two marked values, read from the
    model's last output ``out[:, -1, 0]``.

    The loss is the mean squared error; always predicting 1 (the best memoryless guess) scores
    Var(u1 + u2) = 1/6 (``baseline`` 0.167). ``accuracy`` is the share of sums predicted within 0.04.
    """

    name = "adding"
    input_size = 2
    output_size = 1
    baseline = 1.0 / 6.0
    tolerance = 0.04

    def __init__(self, length: int = 100) -> None:
        self.length = check_int("length", length, 2)

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_split(split)
        B, T, half = check_int("batch_size", batch_size), self.length, self.length // 2
        values = torch.rand(B, T, generator=generator)                      # [B, T]
        first = torch.randint(0, half, (B,), generator=generator)           # [B] in the first half
        second = torch.randint(half, T, (B,), generator=generator)          # [B] in the second half
        mask = torch.zeros(B, T)
        rows = torch.arange(B)
        mask[rows, first] = 1.0
        mask[rows, second] = 1.0
        x = torch.stack([values, mask], dim=-1)                             # [B, T, 2]
        y = values[rows, first] + values[rows, second]                      # [B]
        return x, y

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output[:, -1, 0].float(), target)

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        err = (output[:, -1, 0].float() - target).abs()
        return {"loss": float(self.loss(output, target)),
                "accuracy": float((err < self.tolerance).float().mean())}
