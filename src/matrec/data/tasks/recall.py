"""Recall tasks (docs/tasks.md, "The tasks"): selective copy and multi-query associative recall.

Both ask for symbols seen earlier at positions the model must find by content, not by a fixed
delay, and both score only the answer positions: a model that does not remember can only guess,
so the memoryless cross-entropy is ``ln(choices)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import TASKS, Task, check_int, check_split


def _random_subset(batch: int, population: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct indices from ``range(population)`` per row, in random order: ``[batch, k]``."""
    return torch.rand(batch, population, generator=generator).argsort(dim=-1)[:, :k]


class _AnswerTask(Task):
    """Shared scoring: the last ``n_answers`` outputs are classified against ``target [B, n_answers]``."""

    n_answers: int

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        answers = output[:, -self.n_answers:].float()                        # [B, n, C]
        return F.cross_entropy(answers.reshape(-1, answers.shape[-1]), target.reshape(-1))

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        hits = output[:, -self.n_answers:].argmax(-1) == target               # [B, n]
        return {"loss": float(self.loss(output, target)), "accuracy": float(hits.float().mean()),
                "sequence_accuracy": float(hits.all(dim=-1).float().mean())}


@TASKS.register("selective_copy")
class SelectiveCopy(_AnswerTask):
    """Tokens ``[B, length + n_symbols]``: ``n_symbols`` symbols from 1..alphabet at random positions
    among ``length`` noise tokens 0, then ``n_symbols`` markers (``alphabet + 1``). At the marker
    positions the model must output the symbols in their order of appearance.

    Target ``[B, n_symbols]``: class ``s - 1`` for symbol ``s``. Loss: cross-entropy on the answer
    positions; memoryless ``baseline`` = ln(alphabet). Metrics: ``accuracy`` (per symbol) and
    ``sequence_accuracy`` (all symbols right).
    """

    name = "selective_copy"

    def __init__(self, length: int = 100, n_symbols: int = 10, alphabet: int = 8) -> None:
        self.length = check_int("length", length)
        self.n_answers = check_int("n_symbols", n_symbols)
        self.alphabet = check_int("alphabet", alphabet, 2)
        if n_symbols > length:
            raise ValueError(f"n_symbols must be <= length ({length}), got {n_symbols}")
        self.vocab_size = alphabet + 2              # noise 0, symbols 1..alphabet, marker
        self.output_size = alphabet
        self.baseline = math.log(alphabet)

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_split(split)
        B, n, L = check_int("batch_size", batch_size), self.n_answers, self.length
        positions = _random_subset(B, L, n, generator).sort(dim=-1).values    # [B, n] increasing
        symbols = torch.randint(1, self.alphabet + 1, (B, n), generator=generator)
        x = torch.zeros(B, L + n, dtype=torch.long)
        x.scatter_(1, positions, symbols)
        x[:, L:] = self.alphabet + 1
        return x, symbols - 1


@TASKS.register("assoc_recall")
class AssociativeRecall(_AnswerTask):
    """Multi-query associative recall. Tokens ``[B, 2 n_pairs + gap + n_queries]``: ``n_pairs``
    key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from 1..n_keys, values from
    ``n_keys + 1 .. n_keys + n_values``), ``gap`` blanks (0), then ``n_queries`` distinct keys of
    the pairs. At each query the model must output that key's value.

    Target ``[B, n_queries]``: value classes 0..n_values-1. Loss: cross-entropy on the queries;
    memoryless ``baseline`` = ln(n_values). Metrics: ``accuracy``, ``sequence_accuracy``.
    """

    name = "assoc_recall"

    def __init__(self, n_pairs: int = 8, n_queries: int = 4, n_keys: int = 16, n_values: int = 16,
                 gap: int = 0) -> None:
        self.n_pairs = check_int("n_pairs", n_pairs)
        self.n_answers = check_int("n_queries", n_queries)
        self.n_keys = check_int("n_keys", n_keys)
        self.n_values = check_int("n_values", n_values, 2)
        self.gap = check_int("gap", gap, 0)
        if n_pairs > n_keys:
            raise ValueError(f"n_pairs must be <= n_keys ({n_keys}) so keys are distinct, got {n_pairs}")
        if n_queries > n_pairs:
            raise ValueError(f"n_queries must be <= n_pairs ({n_pairs}), got {n_queries}")
        self.vocab_size = 1 + n_keys + n_values
        self.output_size = n_values
        self.baseline = math.log(n_values)

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_split(split)
        B, P, Q = check_int("batch_size", batch_size), self.n_pairs, self.n_answers
        keys = _random_subset(B, self.n_keys, P, generator) + 1                 # [B, P]
        values = torch.randint(0, self.n_values, (B, P), generator=generator)  # [B, P] classes
        asked = _random_subset(B, P, Q, generator)                             # [B, Q] pair indices
        pairs = torch.stack([keys, values + 1 + self.n_keys], dim=-1).reshape(B, 2 * P)
        x = torch.cat([pairs, torch.zeros(B, self.gap, dtype=torch.long), keys.gather(1, asked)], dim=1)
        return x, values.gather(1, asked)
