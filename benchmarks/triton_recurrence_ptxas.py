"""Compile the Triton recurrence kernels for a GPU target without a GPU and print ptxas's report.

    PYTHONPATH=src python benchmarks/triton_recurrence_ptxas.py --hidden 64,128,256

Shows what the interpreter cannot: registers per thread, spill stores and shared memory per
program for each hidden size (an H100 allows 228 KiB of shared memory per block).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import warnings


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--hidden", default="64,128,256")
    p.add_argument("--nonlinearity", default="modrelu")
    a = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.runtime.jit import JITFunction

    from matrec.ops import triton_recurrence as tr

    ptxas = get_ptxas(a.arch).path
    print(f"sm_{a.arch}, nonlinearity {a.nonlinearity}, BLOCK_B 16, num_warps 4\n")
    print("| H | kernel | registers/thread | spill stores (bytes) | shared memory (KiB) |")
    print("|---|---|---|---|---|")
    for H in map(int, a.hidden.split(",")):
        BB, BH = tr._blocks(16, H)
        for fn in (tr._fwd_kernel, tr._bwd_kernel):
            jf = JITFunction(fn)
            consts = {"NL": tr._CODES[a.nonlinearity], "BLOCK_B": BB, "BLOCK_H": BH, "HAS_H0": True}
            sig = {arg: "constexpr" if arg in consts else "i32" if arg in ("T", "B", "H") else "*fp32"
                   for arg in jf.arg_names}
            source = triton.compiler.ASTSource(fn=jf, signature=sig,
                                               constexprs={k: v for k, v in consts.items() if k in sig})
            kernel = triton.compile(source, target=GPUTarget("cuda", a.arch, 32), options={"num_warps": 4})
            with tempfile.TemporaryDirectory() as tmp:
                ptx = os.path.join(tmp, "k.ptx")
                with open(ptx, "w") as f:
                    f.write(kernel.asm["ptx"])
                sm = f"sm_{a.arch}a" if a.arch >= 90 else f"sm_{a.arch}"
                run = subprocess.run([ptxas, "--gpu-name", sm, "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                     capture_output=True, text=True, check=True)
            report = run.stdout + run.stderr
            regs = re.search(r"Used (\d+) registers", report).group(1)
            spills = re.search(r"(\d+) bytes spill stores", report).group(1)
            print(f"| {H} | {fn.__name__} | {regs} | {spills} | {kernel.metadata.shared / 1024:.0f} |")


if __name__ == "__main__":
    main()
