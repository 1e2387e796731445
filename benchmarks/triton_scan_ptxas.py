"""Static resource use of the Triton scan kernels for a GPU target, with no GPU: registers per thread
and spill bytes as ptxas reports them. A check on block sizes and ``num_warps``, not a timing.

    PYTHONPATH=src python benchmarks/triton_scan_ptxas.py --arch 90
"""
import argparse
import os
import re
import subprocess
import tempfile
import warnings

from matrec.ops.mru_scan.triton import compile_for_target, launch_config

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
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(args.arch).path
    print("| io dtype | d | kernel | sequences/program | num_warps | stages | registers/thread | spill stores (bytes) |")
    print("|---|---|---|---|---|---|---|---|")
    for io in args.dtypes.split(","):
        for d in map(int, args.dims.split(",")):
            for name, flags in KERNELS:
                kernel = compile_for_target(name, d=d, io_dtype=io, arch=args.arch, **flags)
                with tempfile.TemporaryDirectory() as tmp:
                    ptx = os.path.join(tmp, "k.ptx")
                    with open(ptx, "w") as f:
                        f.write(kernel.asm["ptx"])
                    sm = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
                    cmd = [ptxas, "--gpu-name", sm, "-v", ptx, "-o", os.path.join(tmp, "k.cubin")]
                    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
                report = run.stdout + run.stderr
                regs = re.search(r"Used (\d+) registers", report).group(1)
                spills = re.search(r"(\d+) bytes spill stores", report).group(1)
                cfg = launch_config(d)
                warps = cfg.warps_bwd if name.startswith("mru_bwd") else cfg.warps_fwd
                print(f"| {io} | {d} | {name} | {cfg.seq} | {warps} | {cfg.stages} | {regs} | {spills} |")


if __name__ == "__main__":
    main()
