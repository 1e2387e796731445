"""Eager latency of one recurrent step (batch 1, token-by-token decoding): a frozen MORNN against
nn.RNN, and MORNNCell against nn.RNNCell.

    PYTHONPATH=src python benchmarks/mornn_step.py --hidden 64,256 --threads 1

On CPU a MORNN whose forward needs no gradient runs as one C++ call (the "cpp" recurrence backend,
docs/mornn.md); the "torch backend" rows force the previous path. A frozen MORNN (``.freeze()``, or
any forward under ``torch.no_grad``) reuses its built orthogonal
matrix while its parameters are unchanged; the "rebuilt every step" row is the same module with its
matrices trainable and autograd on, i.e. what each step cost before the matrix was kept. Every row
runs under ``torch.no_grad`` except that one. Microseconds per step, best of --repeats rounds of
--steps steps each, models interleaved round-robin.
"""
from __future__ import annotations

import argparse

import torch
from _harness import Table, best_ms_each
from torch import nn

from matrec.nn.mornn import MORNN, MORNNCell

REFERENCES = {"MORNN": "nn.RNN tanh", "MORNNCell": "nn.RNNCell tanh"}


def candidates(H: int) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module in eval mode, whether it steps with autograd on)."""
    return {
        "nn.RNN tanh": (nn.RNN(H, H), False),
        "MORNN tanh, frozen": (MORNN(H, H).freeze(), False),
        "MORNN modrelu, frozen": (MORNN(H, H, nonlinearity="modrelu").freeze(), False),
        # the same on the "torch" backend: the path every step took before the compiled CPU loop
        "MORNN tanh, frozen, torch backend": (MORNN(H, H, recurrence_backend="torch").freeze(), False),
        "MORNN modrelu, frozen, torch backend": (MORNN(H, H, nonlinearity="modrelu",
                                                       recurrence_backend="torch").freeze(), False),
        "MORNN tanh, rebuilt every step": (MORNN(H, H), True),
        "nn.RNNCell tanh": (nn.RNNCell(H, H), False),
        "MORNNCell tanh, frozen": (MORNNCell(H, H).freeze(), False),
    }


def step_fn(module: nn.Module, H: int):
    """One decoding step: a [1, 1, H] token through an RNN (state [1, 1, H]) or [1, H] through a cell."""
    if isinstance(module, (nn.RNNCell, MORNNCell)):
        x, h = torch.randn(1, H), torch.zeros(1, H)
        return lambda: module(x, h)
    x, h = torch.randn(1, 1, H), torch.zeros(1, 1, H)
    return lambda: module(x, h)


def measure(hidden: list[int], steps: int, repeats: int) -> dict[tuple[str, int], float]:
    """{(row, H): microseconds per step}."""
    result = {}
    for H in hidden:
        mods = candidates(H)
        fns, calls = {}, {}
        for name, (mod, grad) in mods.items():
            mod.eval()
            calls[name] = max(1, steps // 100) if grad else steps  # the rebuilding row is ~100x slower
            fns[name] = _rounds(step_fn(mod, H), calls[name], grad)
        best_ms = best_ms_each(fns, "cpu", repeats, warmup=1)
        result.update({(name, H): best_ms[name] / calls[name] * 1e3 for name in mods})
    return result


def _rounds(fn, n: int, grad: bool):
    """``n`` calls of ``fn`` (one timed round) with autograd on or off."""
    def run():
        with torch.set_grad_enabled(grad):
            for _ in range(n):
                fn()
    return run


def ratio_to_reference(name: str) -> str:
    return REFERENCES["MORNNCell" if "Cell" in name else "MORNN"]


def main(argv=None) -> dict[tuple[str, int], float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="64,256", help="comma-separated hidden sizes")
    ap.add_argument("--steps", type=int, default=2000, help="steps per timed round")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden = [int(h) for h in args.hidden.split(",")]
    result = measure(hidden, args.steps, args.repeats)
    print(f"cpu, {args.threads} thread(s); torch {torch.__version__}; batch 1, one step, eager; "
          f"us per step (best of {args.repeats} x {args.steps} steps); x: relative to "
          f"nn.RNN (nn.RNNCell for the cells)\n")
    table = Table({"model": "model", **{f"H = {H}": f"H = {H}" for H in hidden}})
    for name in candidates(2):
        table.add(model=name, **{f"H = {H}": f"{result[name, H]:.1f} "
                                 f"({result[name, H] / result[ratio_to_reference(name), H]:.2f}x)" for H in hidden})
    table.print()
    return result


if __name__ == "__main__":
    main()
