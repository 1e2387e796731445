"""Training helpers for models that contain MORNN / MORNNCell modules: optimiser parameter groups
with the orthogonal parameters at their own learning rate, and an orthogonality report for logs.

They read modules through :class:`~matrec.nn.orthogonal.OrthogonalRecurrent`'s public surface
(``orthogonal_parameters``, ``orthogonal_weight``), so they work on any module built on it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_positive
from ..ops.orthogonal import orthogonality_error
from .orthogonal import OrthogonalRecurrent

__all__ = ["mornn_param_groups", "orthogonality_report"]


def mornn_param_groups(model: nn.Module, lr: float, *, orthogonal_lr: float | None = None,
                       orthogonal_scale: float = 0.1, **group_kwargs) -> list[dict]:
    """Optimiser param groups: every orthogonal parameter (``*_A``) at ``orthogonal_lr`` (default
    ``orthogonal_scale * lr``, 1/10 as in the orthogonal-RNN literature) with no weight decay, all
    other trainable parameters at ``lr`` with ``group_kwargs`` (e.g. weight_decay). Empty groups are
    left out. Each group has a ``"name"`` ("orthogonal" / "other") for logging.

    Example::

        opt = torch.optim.RMSprop(mornn_param_groups(model, 1e-3))
    """
    lr = check_positive("lr", lr)   # NaN and inf refused too: they would train nothing, silently
    orth_lr = check_positive("orthogonal_lr", lr * check_positive("orthogonal_scale", orthogonal_scale)
                             if orthogonal_lr is None else orthogonal_lr)
    orth_ids = {id(A) for m in model.modules() if isinstance(m, OrthogonalRecurrent)
                for A in m.orthogonal_parameters().values()}
    orth, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (orth if id(p) in orth_ids else other).append(p)
    groups = []
    if other:
        groups.append({"params": other, "lr": lr, "name": "other", **group_kwargs})
    if orth:
        groups.append({"params": orth, "lr": orth_lr, "name": "orthogonal", "weight_decay": 0.0})
    return groups


@torch.no_grad()
def orthogonality_report(model: nn.Module) -> dict[str, float]:
    """Flat ``{key: float}`` for training logs, per MORNN layer and direction of ``model``:
    ``"{module}.{weight_hh_lK}/orth_error"`` (max ``|W^T W - I|``), ``.../grad_norm`` (of its ``A``)
    and ``"{module}.{param}/grad_norm"`` for its other parameters (where a gradient exists)."""
    report: dict[str, float] = {}
    for mname, m in model.named_modules():
        if not isinstance(m, OrthogonalRecurrent):
            continue
        prefix = f"{mname}." if mname else ""
        matrices = m.orthogonal_parameters()
        # an orthogonal matrix's gradient is reported under the matrix's name, not its parameter's
        matrix_of = {id(A): name for name, A in matrices.items()}
        for name in matrices:
            report[f"{prefix}{name}/orth_error"] = float(orthogonality_error(m.orthogonal_weight(name).double()))
        for pname, p in m.named_parameters(recurse=False):
            if p.grad is not None:
                report[f"{prefix}{matrix_of.get(id(p), pname)}/grad_norm"] = float(p.grad.norm())
    return report
