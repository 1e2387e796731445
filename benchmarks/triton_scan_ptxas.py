"""Static resource use of the Triton scan kernels for a GPU target, with no GPU: registers per thread
and spill bytes as ptxas reports them, and the loads of each time loop (synchronous / pipelined).
A check on the launch configuration table (``CONFIGS``), not a timing.

    PYTHONPATH=src python benchmarks/triton_scan_ptxas.py --arch 90
"""
import argparse
import os
import warnings

from matrec.ops.mru_scan.triton import compile_for_target, launch_config
from matrec.ops.triton_inspect import loop_loads, ptxas_usage

KERNELS = [  # (body, constexpr flags) as the launches use them in the multi-chunk case
    ("mru_fwd_chunk_total", {}),
    ("mru_fwd_chunk_carry", {"HAS_H0": True}),
    ("mru_fwd_apply", {"CARRY": 2}),
    ("mru_bwd_chunk_affine", {}),
    ("mru_bwd_chunk_carry", {}),
    ("mru_bwd_apply", {"FROM_CARRY": True, "HAS_H0": True}),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--dims", default="8,16,32,64")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
    warnings.filterwarnings("ignore")
    print("| io dtype | d | kernel | sequences/program | num_warps | stages | registers/thread "
          "| spill stores (bytes) | loop loads sync/async |")
    print("|---|---|---|---|---|---|---|---|---|")
    for io in args.dtypes.split(","):
        for d in map(int, args.dims.split(",")):
            cfg = launch_config(d)
            for name, flags in KERNELS:
                kernel = compile_for_target(name, d=d, io_dtype=io, arch=args.arch, **flags)
                use = ptxas_usage(kernel, args.arch)
                loops = "; ".join(f"{x['sync']}/{x['async']}" for x in loop_loads(kernel.asm["ttgir"]))
                warps = cfg.warps_bwd if name.startswith("mru_bwd") else cfg.warps_fwd
                print(f"| {io} | {d} | {name} | {cfg.seq} | {warps} | {cfg.stages} | {use['registers']} "
                      f"| {use['spill_stores']} | {loops} |")


if __name__ == "__main__":
    main()
