"""The task interface shared by every task and by the trainer."""
from __future__ import annotations

import abc

import torch
from torch import Tensor

from ...registry import Registry

TASKS: Registry = Registry("task", argument="task")


class Task(abc.ABC):
    """A source of ``(inputs, targets)`` batches, with its loss and metrics.

    Inputs are token ids ``[B, T]`` (int64) when ``vocab_size`` is set, else features
    ``[B, T, input_size]`` (float32). Models map them to outputs ``[B, T, output_size]``; the task
    decides which positions count (e.g. only the last 10 for copy, only the last step for adding).

    Attributes:
        vocab_size: number of input tokens, or None for feature inputs.
        input_size: feature width, or None for token inputs.
        output_size: width of the model output per step (classes or regression targets).
        baseline: the loss of the best memoryless predictor, when known (None otherwise).
        stream: True when consecutive training batches continue the same sequences, so the trainer
            carries the model's recurrent state across them (truncated back-propagation).
    """

    name: str = "task"
    vocab_size: int | None = None
    input_size: int | None = None
    output_size: int
    baseline: float | None = None
    stream: bool = False

    @abc.abstractmethod
    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One batch ``(x, y)`` for ``split`` in {"train", "val"}, drawn with ``generator`` (CPU)."""

    @abc.abstractmethod
    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Scalar training loss of ``output [B, T, output_size]`` against ``target``."""

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Named evaluation numbers (loss always; accuracy-like ones where they make sense)."""
        return {"loss": float(self.loss(output, target))}

    def model_io(self) -> dict[str, int | None]:
        """Keyword arguments that size a model for this task (for ``matrec.build_model``)."""
        return {"vocab_size": self.vocab_size, "input_size": self.input_size,
                "output_size": self.output_size}


def build_task(name: str, **kwargs) -> Task:
    """Build the registered task ``name`` with its keyword options."""
    return TASKS.get(name)(**kwargs)
