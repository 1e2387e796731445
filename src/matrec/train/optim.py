"""Optimisers (by name), parameter groups with per-group learning rates, and the lr schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.mornn_training import mornn_param_groups
from ..registry import Registry
from .config import TrainConfig

OPTIMIZERS: Registry = Registry("optimizer", argument="optimizer")


@OPTIMIZERS.register("adamw")
def _adamw(groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Parameter groups, each with its own ``lr``: MORNN's orthogonal parameters at
    ``lr * orthogonal_lr_scale`` (via ``matrec.mornn_param_groups``), everything else at ``lr``.

    Models without orthogonal parameters get one group (empty for a model with nothing to train).
    Each group also records ``base_lr``, the peak the schedule scales.
    """
    groups = [dict(g) for g in mornn_param_groups(model, cfg.lr, orthogonal_lr=cfg.lr * cfg.orthogonal_lr_scale,
                                                 weight_decay=cfg.weight_decay)]
    if not groups:   # nothing to train (seasonal_naive, fit=False): one empty group, as torch accepts
        groups = [{"params": [], "lr": cfg.lr, "name": "other", "weight_decay": cfg.weight_decay}]
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of each group's ``base_lr`` at ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then cosine from 1 down to ``min_lr_ratio`` at the last step.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
