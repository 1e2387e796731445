"""Does a torch.compile'd Python loop beat the fused "torch" op for modReLU on CPU?

    PYTHONPATH=src python benchmarks/recurrence_compiled_loop.py --shapes 32x300x256,4x100x64

Times forward+backward (ms, best of --repeats, interleaved, after the compile and one warm-up) of
recurrence_reference compiled with torch.compile (inductor, the loop unrolled over T) against
recurrence(..., backend="torch"); prints the compile time too, and the largest norm-wise relative
difference between the two over output and gradients (they compute the same thing). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import time

import torch
from _harness import Table, best_ms_each

from matrec.ops.orthogonal import project_orthogonal
from matrec.ops.rnn_recurrence import recurrence, recurrence_reference


def shape(s):
    return tuple(int(v) for v in s.split("x"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda s: [shape(v) for v in s.split(",")], default=[(32, 300, 256), (4, 100, 64)],
                   help="comma-separated BxTxH")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"cpu, {torch.get_num_threads()} thread(s); torch {torch.__version__}; modrelu, float32, "
          f"forward+backward ms (best of {a.repeats})\n")
    table = Table({"shape": "B, T, H", "op": "fused op (torch)", "compiled": "compiled loop",
                   "compile_s": "compile time (s)", "diff": "max relative diff"},
                  formats={"op": "{:.1f}", "compiled": "{:.1f}", "compile_s": "{:.0f}", "diff": "{:.1e}"},
                  stream=True)
    g = torch.Generator().manual_seed(0)
    for B, T, H in a.shapes:
        x = torch.randn(T, B, H, generator=g, requires_grad=True)
        W = project_orthogonal(torch.randn(H, H, generator=g, dtype=torch.float64)).float().requires_grad_()
        h0 = torch.randn(B, H, generator=g, requires_grad=True)
        b = (0.1 * torch.randn(H, generator=g)).requires_grad_()
        compiled = torch.compile(lambda x, W, h0, b: recurrence_reference(x, W, h0, b, "modrelu"))
        fns = {"op": lambda x, W, h0, b: recurrence(x, W, h0, b, "modrelu", backend="torch"), "compiled": compiled}

        def run(f):
            out = f(x, W, h0, b)
            return out, torch.autograd.grad(out.sum(), [x, W, h0, b])

        t0 = time.perf_counter()
        out_c, grads_c = run(compiled)
        compile_s = time.perf_counter() - t0
        out_o, grads_o = run(fns["op"])
        diff = max(((u - v).norm() / v.norm()).item() for u, v in zip((out_c, *grads_c), (out_o, *grads_o)))
        # both already ran once above (the compile run is the compiled loop's warm-up)
        ms = best_ms_each({k: (lambda f=f: run(f)) for k, f in fns.items()}, "cpu", a.repeats, warmup=0)
        table.add(shape=f"{B}, {T}, {H}", op=ms["op"], compiled=ms["compiled"], compile_s=compile_s, diff=diff)


if __name__ == "__main__":
    main()
