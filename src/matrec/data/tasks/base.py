"""The task interface shared by every task and by the trainer."""
from __future__ import annotations

import abc
import inspect

import torch
from torch import Tensor

from ...checks import check_int, check_number  # noqa: F401  (re-exported for the tasks)
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

    Determinism (the trainer's bit-exact resume depends on it): ``get_batch`` draws every random
    number from ``generator`` and from nothing else, so restoring the generator's state restores the
    batches. A stream task (``stream = True``) instead reads its sequences in order: it keeps a
    cursor per split, returned by ``state_dict()`` and restored by ``load_state_dict()``, which the
    trainer checkpoints with the generator; ``batch_at(split, batch_size, index)`` is the pure
    function behind it. Non-stream tasks have an empty state.

    Optional capabilities have defaults here, so callers never probe for them: a text task sets
    ``has_vocabulary = True`` and overrides ``encode``/``decode`` (for sampling) and, when its
    vocabulary has a ``tokenizers`` form, ``tokenizer_json`` (checkpoints keep it); a stream task
    overrides ``reset``, ``state_dict`` and ``load_state_dict``; a task whose sequences can be very
    long (copy) sets ``chunkable = True`` and overrides ``chunks`` and ``metric_sums``, so an
    evaluation reads one piece at a time.
    """

    name: str = "task"
    vocab_size: int | None = None
    input_size: int | None = None
    output_size: int
    baseline: float | None = None
    stream: bool = False
    has_vocabulary: bool = False
    chunkable: bool = False   # True: chunks() and metric_sums() read one batch in pieces (evaluation)

    @abc.abstractmethod
    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One batch ``(x, y)`` for ``split`` in {"train", "val"}, drawn with ``generator`` (CPU)."""

    def get_packed_batch(self, split: str, batch_size: int, generator: torch.Generator
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x, y, starts)``: :meth:`get_batch`'s batch (the same draw) and, for a task that packs
        several documents into a row, ``starts [B, T]`` (bool, True at each document's first step:
        the model restarts its state there, the mixer protocol's packed documents); None otherwise.
        The trainer reads batches through it."""
        return (*self.get_batch(split, batch_size, generator), None)

    @abc.abstractmethod
    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Scalar training loss of ``output [B, T, output_size]`` against ``target``."""

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Named evaluation numbers (loss always; accuracy-like ones where they make sense)."""
        return {"loss": float(self.loss(output, target))}

    def chunks(self, split: str, batch_size: int, generator: torch.Generator, chunk: int):
        """The batch :meth:`get_batch` would draw, as consecutive ``(x, y)`` pieces of at most
        ``chunk`` steps (tasks with ``chunkable = True``; with :meth:`metric_sums`)."""
        raise TypeError(f"task {self.name!r} cannot be read in chunks")

    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, tuple[float, int]]:
        """Each metric of a piece of a batch as ``(sum, count)`` (tasks with ``chunkable = True``)."""
        raise TypeError(f"task {self.name!r} has no metrics summable over chunks")

    def token_losses(self, output: Tensor, target: Tensor) -> Tensor:
        """The loss at every position ``[B, T]`` (its mean is :meth:`loss`), for the loss by
        position in a long context; tasks whose loss is a mean over positions override it."""
        raise TypeError(f"task {self.name!r} has no loss per position (its loss is not a mean over "
                        f"the positions of a sequence)")

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """The evaluation's numbers from the means over its batches of :meth:`metrics` (the
        trainer calls it once per evaluation). Tasks whose scored positions are sparse (a chunk
        may hold none) return counts and sums from ``metrics`` and pool them into ratios here."""
        return means

    def encode(self, text: str) -> Tensor:
        """Token ids ``[T]`` (int64) of ``text``; only tasks with ``has_vocabulary`` have one."""
        raise TypeError(f"task {self.name!r} has no vocabulary to encode text with")

    def decode(self, ids) -> str:
        """The text of token ids ``ids`` (the inverse of :meth:`encode`)."""
        raise TypeError(f"task {self.name!r} has no vocabulary to decode ids with")

    def tokenizer_json(self) -> str | None:
        """The vocabulary as a ``tokenizers`` JSON (what checkpoints keep), or None if it has none."""
        return None

    def reset(self, split: str | None = None) -> None:
        """Rewind ``split`` (or every split) to its start; only stream tasks have a position."""

    def state_dict(self) -> dict:
        """Position state to checkpoint (stream tasks: the per-split cursors; others: empty)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"task {self.name!r} has no state to load, got keys {sorted(state)}")

    @classmethod
    def describe(cls) -> str:
        """Help text: the class docstring and its keyword options with defaults (for ``--help``)."""
        doc = inspect.cleandoc(cls.__doc__ or "")
        options = [f"  {p.name}={p.default!r}" if p.default is not p.empty else f"  {p.name} (required)"
                   for p in inspect.signature(cls.__init__).parameters.values()
                   if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return doc + ("\n\nOptions:\n" + "\n".join(options) if options else "\n\nOptions: none")

    def model_io(self) -> dict[str, int | None]:
        """Keyword arguments that size a model for this task (for ``matrec.build_model``)."""
        return {"vocab_size": self.vocab_size, "input_size": self.input_size,
                "output_size": self.output_size}


def build_task(name: str, **kwargs) -> Task:
    """Build the registered task ``name`` with its keyword options."""
    cls = TASKS.get(name)
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(accepted) - {"self"})
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        valid = sorted(k for k in accepted if k != "self")
        raise ValueError(f"task {name!r} got unknown option(s) {unknown}; its options are {valid}")
    return cls(**kwargs)


def describe_tasks() -> str:
    """Every registered task's help text, for the CLI's ``--help``."""
    return "\n\n".join(f"{name}:\n" + "\n".join("  " + line for line in TASKS.get(name).describe().splitlines())
                       for name in TASKS.names())


SPLITS = ("train", "val")


def check_split(split: str) -> str:
    """``split`` if it is "train" or "val", else a ValueError naming the argument."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split


def _parse_value(argument: str, text: str, default):
    """Convert the command-line string ``text`` to the type of ``default``."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{argument} must be {type(default).__name__} (like {default!r}), "
                         f"got {text!r}") from None
    return None if text.lower() == "none" else text


def parse_task_options(name: str, options: dict[str, str]) -> dict:
    """Turn command-line strings (e.g. ``{"delay": "200", "periods": "50,400"}``) into the task's
    option types, taken from the defaults of its ``__init__`` (ints, floats, bools, tuples, str)."""
    params = inspect.signature(TASKS.get(name).__init__).parameters
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown:
        raise ValueError(f"task {name!r} got unknown option(s) {unknown}; its options are "
                         f"{sorted(k for k in params if k != 'self')}")
    return {key: _parse_value(key, text, params[key].default) if isinstance(text, str) else text
            for key, text in options.items()}
