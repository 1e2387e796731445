"""The trainer's configuration: one flat dataclass, saved as JSON in every run directory."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checks import check_int, check_real


@dataclass
class TrainConfig:
    """Everything that defines a training run (the resolved copy lands in ``<run>/config.json``).

    ``batch_size`` is the GLOBAL batch: under ``torchrun`` each of the ``W`` processes takes
    ``batch_size / W`` rows of the same global batch, so the run matches a single process.
    """

    # what to train
    task: str = "copy"
    task_args: dict = field(default_factory=dict)
    model: str = "lstm"
    model_args: dict = field(default_factory=dict)
    # how long and how big
    steps: int = 1000
    batch_size: int = 64
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    orthogonal_lr_scale: float = 0.1   # MORNN's orthogonal parameters train at lr * this
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1          # cosine decays lr to lr * this at the last step
    grad_clip: float = 1.0             # max global grad norm; 0 turns clipping off
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0
    # hardware
    device: str = "auto"               # "auto" = cuda when present, else cpu
    amp: bool = True                   # bf16 autocast (CUDA only; CPU runs stay fp32)
    compile: bool = False              # torch.compile the model
    threads: int = 0                   # CPU threads for torch (0 = torch's default)
    # outputs
    out_dir: str = "runs"
    run_name: str | None = None
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range; a ValueError or TypeError names the first bad one.

        The one check behind every way a config is made (Python, ``--config`` files, command-line
        options, a checkpoint's saved config); the trainer calls it again, since a dataclass's
        fields can be assigned after construction. Integral and real numbers are normalised to
        ``int``/``float`` (numpy scalars from a script), and ``out_dir`` to ``str``.
        """
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "ckpt_every"):
            _int(self, name, 1)
        _int(self, "warmup_steps", 0)
        _int(self, "threads", 0)
        # torch seeds take 64 bits; evaluation draws from seed + 1, so the top value is kept free
        _int(self, "seed", 0, 2 ** 63 - 1)
        for name in ("lr", "orthogonal_lr_scale"):
            _real(self, name, minimum=0, open_min=True)
        for name in ("weight_decay", "grad_clip"):
            _real(self, name, minimum=0)
        _real(self, "min_lr_ratio", minimum=0, maximum=1)
        for name in ("task", "model", "optimizer"):
            _text(self, name)
        for name in ("task_args", "model_args"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{name} keys must be option names (str), got {bad!r}")
        for name in ("amp", "compile", "tensorboard", "plot", "progress"):
            if not isinstance(getattr(self, name), bool):   # "false" would be truthy
                raise TypeError(f"{name} must be a bool (true or false), got {getattr(self, name)!r}")
        _check_device(self.device)
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        _text(self, "out_dir")
        if self.run_name is not None:
            _text(self, "run_name")
            # a run lives directly in out_dir: a path here would write somewhere else
            if Path(self.run_name).name != self.run_name or self.run_name in (".", ".."):
                raise ValueError(f"run_name must be a folder name (no '/', not '.' or '..'), got "
                                 f"{self.run_name!r}; put the parent folder in out_dir")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys by name (a typo must not be silently ignored)."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"config file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"config file {str(path)!r} is a directory, not a JSON file") from None
        except OSError as e:
            raise ValueError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {str(path)!r} is not UTF-8 text (a binary file?); expected "
                             f"a JSON object of TrainConfig fields") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {e}") from None
        except RecursionError:   # the parser recurses once per level
            raise ValueError(f"config file {str(path)!r} is nested too deeply for the JSON parser") from None
        return cls.from_dict(data)


def _int(cfg: TrainConfig, name: str, minimum: int, maximum: int | None = None) -> None:
    setattr(cfg, name, check_int(name, getattr(cfg, name), minimum, maximum=maximum, type_error=True))


def _real(cfg: TrainConfig, name: str, **bounds) -> None:
    setattr(cfg, name, check_real(name, getattr(cfg, name), type_error=True, **bounds))


def _text(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str, got {value!r}")


def _check_device(device) -> None:
    """The form of ``device`` only: whether it exists here is the trainer's check (a config can be
    written on one machine and run on another)."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a str ('auto', 'cpu', 'cuda' or 'cuda:N'), got {device!r}")
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):   # the trainer's autocast and RNG handling know these two
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
