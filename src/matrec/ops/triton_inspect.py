"""Static facts about a Triton kernel compiled ahead of time (:func:`.triton_support.compile_ahead`), with
no GPU: what ptxas allocates for it, and whether its loops load synchronously. Used by the kernel tests
and ``benchmarks/triton_scan_ptxas.py``; imports triton only when called.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile


def ptxas_usage(kernel, arch: int = 90) -> dict:
    """``{"registers": int, "spill_stores": bytes, "spill_loads": bytes}`` of a compiled kernel, as the
    ptxas bundled with Triton reports them for ``sm_<arch>`` (``-v``) on the kernel's own PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        run = subprocess.run([ptxas, "--gpu-name", sm, "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    report = run.stdout + run.stderr
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_stores": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
            "spill_loads": int(re.search(r"(\d+) bytes spill loads", report).group(1))}


def loop_loads(ttgir: str) -> list[dict]:
    """For every ``scf.for`` of a kernel's TritonGPU IR (``kernel.asm["ttgir"]``): how many global loads
    its body issues synchronously (``tt.load``: the step waits for memory) and how many as
    asynchronous copies into shared memory (``ttg.async_copy_global_to_local``: Triton's software
    pipeliner issued them for a later iteration). Nested loops count in their own entry and their
    parent's."""
    lines = ttgir.splitlines()
    loops = []
    for k, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, body = 0, []
        for inner in lines[k:]:
            depth += inner.count("{") - inner.count("}")
            body.append(inner)
            if depth <= 0:
                break
        text = "\n".join(body[1:])
        loops.append({"sync": len(re.findall(r"\btt\.load\b", text)),
                      "async": len(re.findall(r"\bttg\.async_copy_global_to_local\b", text))})
    return loops
