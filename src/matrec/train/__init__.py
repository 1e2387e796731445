"""Training: the config, the loop, checkpoints, the run directory."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .optim import OPTIMIZERS, lr_factor, param_groups
from .trainer import NonFiniteError, Trainer

__all__ = ["CheckpointError", "NonFiniteError", "OPTIMIZERS", "TrainConfig", "Trainer",
           "load_checkpoint", "lr_factor", "param_groups", "save_checkpoint"]
