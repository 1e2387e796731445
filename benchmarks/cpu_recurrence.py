"""Long recurrences on one CPU thread: the compiled loop ("cpp" backend) against nn.RNN / LSTM / GRU
and against the GEMMs it cannot avoid.

    PYTHONPATH=src python benchmarks/cpu_recurrence.py --seq 10000 --grid-seq 1000 --threads 1

Table 1, forward+backward per time step at one shape (default B 16, H 128, T 10,000): nn.RNN tanh,
MORNN tanh / modReLU on "auto" (the compiled loop where it builds) and on the previous "torch"
backend (MORNN tanh's previous path is nn.RNN's kernel itself), and the GEMM limit: the three GEMMs
a step needs, timed on their own at the same shapes (forward ``h W^T`` and backward ``g W`` as a
batched GEMM over T independent [B, H] x [H, H] products, so no per-step call overhead is
counted, plus ``dW`` as one [H, T B] x [T B, H] GEMM divided by T). "GEMM share" is the limit over
the row's time: the fraction of the GEMM limit reached.

Table 2, the grid (B 1/16/64 x H 64/128/256, T = --grid-seq): microseconds per step of forward +
backward, and each row relative to nn.RNN tanh on the same shape. Best of --repeats, candidates
run round-robin (benchmarks/_harness.py).
"""
from __future__ import annotations

import argparse

import torch
from _harness import Table, add_json_argument, best_ms_each, module_fwd_bwd, write_json
from torch import nn

from matrec.nn.mornn import MORNN
from matrec.ops.rnn_recurrence import RECURRENCE_BACKENDS


def gemm_limit(B: int, T: int, H: int, repeats: int) -> dict[str, float]:
    """Milliseconds for the whole sequence of: the forward step GEMMs, the backward step GEMMs and
    the one dW GEMM, each at BLAS speed (no per-step call)."""
    a = torch.randn(T, B, H)
    W = torch.randn(H, H)
    Wf = W.t().contiguous().expand(T, H, H)  # both operands laid out as the loop reads them
    Wb = W.expand(T, H, H)
    g = torch.randn(T * B, H)
    o = torch.empty(T, B, H)
    fns = {"forward GEMMs": lambda: torch.bmm(a, Wf, out=o),
           "backward GEMMs": lambda: torch.bmm(a, Wb, out=o),
           "dW GEMM": lambda: g.t() @ g}
    return best_ms_each(fns, "cpu", repeats, warmup=1)


def candidates_long(H: int) -> dict[str, nn.Module]:
    return {
        "nn.RNN tanh": nn.RNN(H, H),
        "MORNN tanh (auto)": MORNN(H, H),
        "MORNN modrelu (auto)": MORNN(H, H, nonlinearity="modrelu"),
        "MORNN tanh (before: nn.RNN's kernel)": MORNN(H, H, recurrence_backend="torch"),
        "MORNN modrelu (before: torch op)": MORNN(H, H, nonlinearity="modrelu", recurrence_backend="torch"),
    }


def candidates_grid(H: int) -> dict[str, nn.Module]:
    return {
        "nn.RNN tanh": nn.RNN(H, H),
        "nn.LSTM": nn.LSTM(H, H),
        "nn.GRU": nn.GRU(H, H),
        "MORNN tanh": MORNN(H, H),
        "MORNN modrelu": MORNN(H, H, nonlinearity="modrelu"),
    }


def per_step_us(candidates: dict[str, nn.Module], B: int, T: int, H: int, repeats: int) -> dict[str, float]:
    x = torch.randn(T, B, H)
    fns = {name: module_fwd_bwd(mod, x) for name, mod in candidates.items()}
    return {name: ms * 1e3 / T for name, ms in best_ms_each(fns, "cpu", repeats, warmup=1).items()}


def long_table(B: int, T: int, H: int, repeats: int) -> Table:
    times = per_step_us(candidates_long(H), B, T, H, repeats)
    limit_parts = {k: v * 1e3 / T for k, v in gemm_limit(B, T, H, repeats).items()}
    limit = sum(limit_parts.values())
    table = Table({"row": "row", "us": "us per step", "ratio": "vs nn.RNN tanh", "share": "GEMM share"},
                  formats={"us": "{:.1f}", "ratio": "{:.2f}x", "share": "{:.0%}"})
    ref = times["nn.RNN tanh"]
    for name, us in times.items():
        table.add(row=name, us=us, ratio=us / ref, share=limit / us)
    for name, us in limit_parts.items():
        table.add(row=f"({name})", us=us, ratio=us / ref, share=None)
    table.add(row="GEMM limit (sum of the three)", us=limit, ratio=limit / ref, share=1.0)
    return table


def grid_table(batches: list[int], hidden: list[int], T: int, repeats: int) -> Table:
    keys = [(B, H) for H in hidden for B in batches]
    results = {(B, H): per_step_us(candidates_grid(H), B, T, H, repeats) for B, H in keys}
    cols = {f"B{B} H{H}": f"B={B}, H={H}" for B, H in keys}
    table = Table({"model": "model", **cols})
    for name in candidates_grid(2):
        table.add(model=name, **{f"B{B} H{H}": f"{results[B, H][name]:.1f} "
                                 f"({results[B, H][name] / results[B, H]['nn.RNN tanh']:.2f}x)" for B, H in keys})
    return table


def main(argv=None) -> list[Table]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=10_000)
    p.add_argument("--grid-batch", default="1,16,64")
    p.add_argument("--grid-hidden", default="64,128,256")
    p.add_argument("--grid-seq", type=int, default=1000, help="T of the grid (0: skip the grid)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    add_json_argument(p)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ok, reason = RECURRENCE_BACKENDS.available("cpp", torch.device("cpu"))
    print(f"cpu, {torch.get_num_threads()} thread(s); torch {torch.__version__}; 'cpp' backend: "
          f"{'available' if ok else 'NOT available'} ({reason})\n")
    print(f"forward+backward per time step, B={a.batch}, H={a.hidden}, T={a.seq} (best of {a.repeats})\n")
    tables = [long_table(a.batch, a.seq, a.hidden, a.repeats)]
    tables[0].print()
    if a.grid_seq:
        batches = [int(b) for b in a.grid_batch.split(",")]
        hidden = [int(h) for h in a.grid_hidden.split(",")]
        print(f"\nforward+backward, us per time step (x: vs nn.RNN tanh, same shape), T={a.grid_seq}\n")
        tables.append(grid_table(batches, hidden, a.grid_seq, a.repeats))
        tables[1].print()
    write_json(a.json, tables, threads=a.threads, cpp=reason)
    return tables


if __name__ == "__main__":
    main()
