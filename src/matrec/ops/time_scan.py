"""One loop over time that exports with a dynamic length: PyTorch's ``scan`` higher-order op.

Each recurrent op's export-safe backend (the ``export_safe`` entry of its registry,
:mod:`matrec.ops.backends`) runs the step of its naive reference through :func:`time_scan`. Under
``torch.export`` it becomes one ``torch.ops.higher_order.scan`` node whose length is a dynamic
dimension, which ONNX translates to a ``Scan`` node and ExecuTorch runs as a loop: one graph for a
prompt of any length and a single step. A Python loop over ``T`` instead would be unrolled at the
example's length (docs/deploy.md).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch._higher_order_ops.scan import scan
from torch.utils._pytree import tree_map

from .backends import export_unrolled, exporting


def time_scan(step: Callable, carry, xs, *, unrolled: bool | None = None):
    """``carry, y_t = step(carry, x_t)`` over dim 0 of every tensor in ``xs``; returns ``(carry, ys)``.

    ``carry`` and ``xs`` are tensors or lists/tuples of them; ``ys`` stacks every ``y_t`` on a new
    dim 0. ``unrolled=True`` runs a plain Python loop (for a static length, the one-token step
    graph, where a scan node would only add a loop around one iteration); None: the scan op inside
    :func:`matrec.ops.backends.export_safe` (unless it says unrolled), the plain loop outside it
    (eagerly the scan op only adds a trace of its step, about a second per call).
    """
    if unrolled is None:
        unrolled = export_unrolled() or not exporting()
    if unrolled:
        T = torch.utils._pytree.tree_leaves(xs)[0].shape[0]
        ys = []
        for t in range(T):
            carry, y = step(carry, tree_map(lambda x: x[t], xs))
            ys.append(y)
        return carry, tree_map(lambda *a: torch.stack(a), *ys)

    def body(c, x):
        c, y = step(c, x)
        # scan's outputs may not alias its carry (a step often returns its new state as y)
        return c, tree_map(torch.clone, y)

    return scan(body, carry, xs)


def keep_where(mask_t: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where ``mask_t [B]`` is set, else ``old`` (``[B, ...]``): padded steps leave a state unchanged."""
    return torch.where(mask_t.reshape(mask_t.shape + (1,) * (new.dim() - 1)), new, old)
