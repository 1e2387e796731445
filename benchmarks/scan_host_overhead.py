"""Host work of one Triton-scan forward+backward with the kernels stubbed out: what a call costs the
CPU besides Triton's launcher and the GPU, for each way a call can go. No GPU needed (the stubbed
kernels never run; TRITON_INTERPRET=1 lets the CPU tensors through the availability check).

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/scan_host_overhead.py
"""
import argparse
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="384,4,8", help="N,T,d (tiny T: the allocations stay cheap)")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import matrec.ops.mru_scan.triton as ts
    from matrec.ops.mru_scan import mru_scan

    launches = []

    class Stub:  # records the grid, runs nothing
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(grid)

    ts._kernel = lambda name, device: Stub()
    N, T, d = map(int, a.shape.split(","))
    x = torch.zeros(N, T, d, d).requires_grad_()
    G = torch.ones_like(x)

    def through_op():
        H, _ = ts.triton_mru_scan_fwd(x, None, 2)  # the torch.library op and its registered autograd
        H.backward(G)

    ways = {
        "mru_scan(backend='triton')": lambda: mru_scan(x, backend="triton", chunk_size=2).backward(G),
        "mru_scan_triton (eager autograd.Function)": lambda: ts.mru_scan_triton(x, chunk_size=2).backward(G),
        "the torch.library op (what torch.compile calls)": through_op,
        "_forward + _backward alone (no autograd)": lambda: ts._backward(
            G, x.detach(), *ts._forward(x.detach(), None, 2), None, 2),
    }
    print(f"| way (N, T, d = {N}, {T}, {d}; chunks of 2) | host us per fwd+bwd, best of {a.repeats} | launches |")
    print("|---|---|---|")
    for name, fn in ways.items():
        for _ in range(20):
            fn()
        best = float("inf")
        for _ in range(a.repeats):
            launches.clear()
            t0 = time.perf_counter()
            for _ in range(a.calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / a.calls * 1e6)
        print(f"| {name} | {best:.0f} | {len(launches) // a.calls} |")


if __name__ == "__main__":
    main()
