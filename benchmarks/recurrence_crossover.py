"""Where the chunked parallel form of the identity recurrence beats the sequential op (CPU).

    PYTHONPATH=src python benchmarks/recurrence_crossover.py                      # B x H grid, T=1000
    PYTHONPATH=src python benchmarks/recurrence_crossover.py --seq 30,100,300 --batch 1,4 --hidden 64
    PYTHONPATH=src python benchmarks/recurrence_crossover.py --eigenbasis --batch 1,16 --hidden 64,256
    PYTHONPATH=src python benchmarks/recurrence_crossover.py --accuracy

Times ``recurrence(..., "identity", backend=b)`` forward+backward (ms, best of --repeats with the
backends interleaved, after one warm-up) for b = "torch" (a step per time step) and "chunked" (the
parallel form), and what "auto" picks. ``--eigenbasis`` instead times the forward alone of both and of
the eigenbasis form (``torch.linalg.eig`` per call, complex64 GEMMs, chunks of 64: the form the
chunked backend replaced), to show why it was not kept. ``--accuracy`` prints both backends' float32
error against float64 arithmetic instead. Prints markdown tables.
"""
from __future__ import annotations

import argparse

import torch
from _harness import Table, best_ms_each

from matrec.nn.mornn import _rotation_blocks
from matrec.ops.orthogonal import project_orthogonal
from matrec.ops.rnn_recurrence import recurrence
from matrec.ops.rnn_recurrence.chunked import _rnn_recurrence_chunked
from matrec.ops.rnn_recurrence.dispatch import _auto_backend
from matrec.ops.rnn_recurrence.fused import _forward_impl


def eigenbasis_forward(x, W, h0, C=64):
    """h_t = x_t + h_{t-1} W^T via y = h V^-T, y_t = u_t + lam y_{t-1} chunked (forward only)."""
    T, B, H = x.shape
    lam, V = torch.linalg.eig(W.double())
    Vi_t = torch.linalg.inv(V).t().to(torch.complex64)
    N = -(-T // C)
    u = x.new_zeros(N * C, B, H, dtype=torch.complex64)
    u[:T] = (x.reshape(-1, H).to(torch.complex64) @ Vi_t).view(T, B, H)
    u = u.view(N, C, B, H)
    lam_j = lam[None] ** torch.arange(1, C + 1, dtype=torch.float64)[:, None]  # [C, H]
    u.mul_((1 / lam_j).to(torch.complex64)[None, :, None])
    u.cumsum_(1)
    carry = u.new_zeros(B, H) if h0 is None else h0.to(torch.complex64) @ Vi_t
    lam_C = lam_j[-1].to(torch.complex64)
    for c in range(N):
        u[c] += carry
        carry = u[c, -1] * lam_C
    u.mul_(lam_j.to(torch.complex64)[None, :, None])
    return (u.view(-1, H)[:T * B] @ V.t().to(torch.complex64)).real.view(T, B, H)


def accuracy(T=1000, B=3, hidden=(33, 128)):
    """Relative error of each float32 backend against float64 arithmetic on the same float32 inputs."""
    print(f"float32 forward vs float64 truth (same float32 W, x, h0), T = {T}, B = {B}\n")
    table = Table({"W": "W", "H": "H", "torch": "torch", "chunked": "chunked"},
                  formats={"torch": "{:.1e}", "chunked": "{:.1e}"}, stream=True)
    g = torch.Generator().manual_seed(0)
    for kind in ("random orthogonal", "repeated angle"):
        for H in hidden:
            W = project_orthogonal(torch.randn(H, H, generator=g, dtype=torch.float64))
            if kind == "repeated angle":  # eigenvalues e^{+-0.7i}, each of multiplicity H/2, in a random basis
                R = _rotation_blocks(torch.full((H // 2,), 0.7, dtype=torch.float64), H)
                W = W @ R @ W.t()
            W = W.float()
            x, h0 = torch.randn(T, B, H, generator=g), torch.randn(B, H, generator=g)
            truth = recurrence(x.double(), W.double(), h0.double(), None, "identity", backend="torch")
            errs = [((recurrence(x, W, h0, None, "identity", backend=b).double() - truth).norm()
                     / truth.norm()).item() for b in ("torch", "chunked")]
            table.add(W=kind, H=H, torch=errs[0], chunked=errs[1])
    print()
    return table


def best_ms(fns, repeats):
    return best_ms_each(fns, "cpu", repeats)


def fwd_bwd(x, W, h0, backend):
    def run():
        out = recurrence(x, W, h0, None, "identity", backend=backend)
        torch.autograd.grad(out.sum(), [x, W, h0])
    return run


def ints(s):
    return [int(v) for v in s.split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=ints, default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--hidden", type=ints, default=[16, 32, 64, 128, 256])
    p.add_argument("--seq", type=ints, default=[1000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eigenbasis", action="store_true", help="forward only, with the eigenbasis form")
    p.add_argument("--accuracy", action="store_true", help="only the float32 accuracy table")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.accuracy:
        return accuracy()
    g = torch.Generator().manual_seed(0)
    mode = "forward only" if a.eigenbasis else "forward+backward"
    print(f"cpu, {torch.get_num_threads()} thread(s); torch {torch.__version__}; {mode}, float32, "
          f"ms (best of {a.repeats}); cell: torch / chunked{' / eigenbasis' if a.eigenbasis else ''}"
          f" (torch/chunked speed-up) [auto's pick]\n")
    for T in a.seq:
        print(f"T = {T}\n")
        table = Table({"B": "B \\ H", **{str(h): str(h) for h in a.hidden}}, stream=True)
        for B in a.batch:
            cells = []
            for H in a.hidden:
                W = project_orthogonal(torch.randn(H, H, generator=g, dtype=torch.float64)).float()
                x, h0 = torch.randn(T, B, H, generator=g), torch.randn(B, H, generator=g)
                if a.eigenbasis:
                    r = best_ms({"torch": lambda: _forward_impl(x, W, h0, None, "identity"),
                                 "chunked": lambda: _rnn_recurrence_chunked(x, W, h0, None, "identity"),
                                 "eigen": lambda: eigenbasis_forward(x, W, h0)}, a.repeats)
                    extra = f" / {r['eigen']:.1f}"
                else:
                    x, W, h0 = (t.requires_grad_() for t in (x, W, h0))
                    r = best_ms({b: fwd_bwd(x, W, h0, b) for b in ("torch", "chunked")}, a.repeats)
                    extra = ""
                pick = _auto_backend(x, "identity")
                cells.append(f"{r['torch']:.1f} / {r['chunked']:.1f}{extra} "
                             f"({r['torch'] / r['chunked']:.2f}x) [{pick}]")
            table.add(B=B, **dict(zip(map(str, a.hidden), cells)))
        print()


if __name__ == "__main__":
    main()
