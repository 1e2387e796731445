"""The trainer's configuration: one flat dataclass, saved as JSON in every run directory."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


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
        positive = ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "ckpt_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        for name in ("lr", "orthogonal_lr_scale"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {self.threads!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("task_args", "model_args"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")

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
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(data)
