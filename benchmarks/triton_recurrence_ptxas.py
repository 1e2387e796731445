"""Compile the Triton recurrence kernels for a GPU target without a GPU and print ptxas's report.

    PYTHONPATH=src python benchmarks/triton_recurrence_ptxas.py --hidden 64,128,256,384,512
    PYTHONPATH=src python benchmarks/triton_recurrence_ptxas.py --split --hidden 64,256,512

For each hidden size and weight dtype, the kernels the module picks (``config_for``: on-chip or
tiled, block sizes, warps), forward and backward; ``--compare-up-to`` H adds the module's
configuration of the other kernel shape at the same H. Shows what the interpreter cannot: registers per thread, spill
stores and shared memory per program (an H100 allows 227 KiB of shared memory per block, 228 per SM).
``--split``: the column-split persistent kernels (``matrec.ops.rnn_recurrence.triton_split``) instead,
every column-slice width ``plan`` may pick at each H, float32 ``W``.
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch


def describe(consts: dict, num_warps: int) -> str:
    if "BLOCK_N" in consts:
        return f"tiled B{consts['BLOCK_B']} N{consts['BLOCK_N']} K{consts['BLOCK_K']}, {num_warps} warps"
    return f"on-chip B{consts['BLOCK_B']} H{consts['BLOCK_H']}, {num_warps} warps"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--hidden", default="64,128,256,384,512")
    p.add_argument("--weight-dtypes", default="float32,bfloat16")
    p.add_argument("--nonlinearity", default="modrelu")
    p.add_argument("--split", action="store_true", help="the column-split persistent kernels instead")
    p.add_argument("--compare-up-to", type=int, default=256,
                   help="also compile the kernel shape not chosen for H up to this (on-chip at H=512 takes minutes)")
    a = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
    warnings.filterwarnings("ignore")
    from matrec.ops.rnn_recurrence import triton as tr

    if a.split:
        return split_table(a)
    print(f"sm_{a.arch}, nonlinearity {a.nonlinearity}; chosen: the configuration `config_for` picks\n")
    print("| H | W dtype | pass | kernel | chosen | registers/thread | spill stores (bytes) | shared memory (KiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for H in map(int, a.hidden.split(",")):
        for wname in a.weight_dtypes.split(","):
            wdt = getattr(torch, wname)
            for backward in (False, True):
                chosen = tr.config_for(H, wdt, backward)
                other = tr.ON_CHIP_CONFIG if chosen.tiled else tr.TILED_CONFIG
                configs = [chosen] + ([other] if H <= a.compare_up_to else [])
                for cfg in configs:
                    r = tr.compile_report(H, wdt, backward, a.nonlinearity, config=cfg, arch=a.arch)
                    kernel = describe(r["constexprs"], r["num_warps"])
                    print(f"| {H} | {wname} | {'bwd' if backward else 'fwd'} | {kernel} "
                          f"| {'yes' if cfg is chosen else 'no'} | {r['registers']} | {r['spills']} | "
                          f"{r['shared_kib']:.0f} |", flush=True)


def split_table(a) -> None:
    from matrec.ops.rnn_recurrence import triton_split as ts

    print(f"sm_{a.arch}, nonlinearity {a.nonlinearity}, float32 W, {ts.NUM_WARPS} warps, persistent kernel\n")
    print("| H | pass | column slice | registers/thread | spill stores (bytes) | shared memory (KiB) |")
    print("|---|---|---|---|---|---|")
    for H in map(int, a.hidden.split(",")):
        for width in ts.widths_for(H):
            for backward in (False, True):
                r = ts.compile_report(H, backward, a.nonlinearity, block_h=width, arch=a.arch)
                print(f"| {H} | {'bwd' if backward else 'fwd'} | {width} | {r['registers']} | {r['spills']} | "
                      f"{r['shared_kib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
