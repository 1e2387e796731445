"""Time every mru_scan backend, forward and forward+backward, after checking it against the reference.

    PYTHONPATH=src python benchmarks/scan.py                       # docs/design.md §7 shapes, auto device
    PYTHONPATH=src python benchmarks/scan.py --device cpu --batch-scale 0.125
    PYTHONPATH=src python benchmarks/scan.py --quick               # small smoke run

Shapes are ``batch,heads,T,d``. On CUDA the default shapes add the kernel issue's two extra
records: a very long sequence (T = 65536) and a small batch x heads (1 x 1, T = 8192), where the
parallelism has to come from the sequence. Inputs are rotations (``make_states``), so even T = 65536
products stay bounded. Each backend is first run on one sequence of the shape
and compared (outputs and gradients) with the float64 autograd-through-loop reference; a backend that
fails is reported as FAILED, never timed. On CUDA the table also gives the fraction of the copy
bandwidth floor (bytes of reading M and writing H for the forward; plus reading M, H, dH and
writing dM for the backward), with the device copy bandwidth measured here.
"""
from __future__ import annotations

import argparse

import torch
from _harness import Table, add_json_argument, add_quick_argument, best_ms, check_close, sync, write_json  # noqa: F401 (sync: re-export)

from matrec.ops.mru_scan import SCAN_BACKENDS, mru_scan, naive_mru_scan
from matrec.ops.orthogonal import skew

REFERENCE_SHAPES = ["64,6,256,8", "80,3,512,16", "8,4,4096,16", "8,6,1024,8"]
CUDA_EXTRA_SHAPES = ["1,1,65536,16", "1,1,8192,16"]
QUICK = "small shapes, 2 repeats"   # what --quick does (matrec bench --quick reads it)
QUICK_SHAPES = ["4,2,64,4", "2,2,1024,8"]


def default_shapes(device: torch.device, quick: bool = False) -> list[str]:
    """The shapes timed when ``--shapes`` is not given: the reference shapes of docs/design.md §7
    (+ the kernel records on CUDA)."""
    if quick:
        return QUICK_SHAPES
    return REFERENCE_SHAPES + (CUDA_EXTRA_SHAPES if device.type == "cuda" else [])


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be batch,heads,T,d (positive ints), got {text!r}")
    return parts


def make_states(shape, device, dtype=torch.float32, seed=0):
    """Random rotations near the identity: products of thousands stay bounded (no overflow)."""
    g = torch.Generator().manual_seed(seed)
    B, h, T, d = shape
    A = skew(torch.randn(B, h, T, d, d, generator=g, dtype=torch.float64)) * (0.3 / d**0.5)
    return torch.linalg.matrix_exp(A).to(device=device, dtype=dtype)  # [B, h, T, d, d]


def timeit(fn, device, repeats: int) -> float:
    """Best wall time of ``fn`` in milliseconds, after one warm-up call (:func:`_harness.best_ms`)."""
    return best_ms(fn, device, repeats)


def reference(states):
    """``(M, G, H, dL/dM)`` of one sequence from the float64 autograd-through-loop definition.

    One (batch, head) sequence at the full T and d: the reference loop is slow, and the backends
    treat every sequence alike.
    """
    M = states[:1, :1].detach()
    G = torch.randn(M.shape, generator=torch.Generator().manual_seed(1)).to(M)
    ref_in = M.double().requires_grad_()
    ref = naive_mru_scan(ref_in)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, G.double())
    return M, G, ref.detach(), ref_grad


def check(backend: str, states, tol: float = 1e-4, ref=None) -> str | None:
    """None if ``backend`` matches the float64 loop on one sequence (output and gradient).

    ``ref``: :func:`reference` of ``states``, computed here when not given (once per shape in main).
    """
    M, G, ref, ref_grad = ref if ref is not None else reference(states)
    x = M.clone().requires_grad_()
    out = mru_scan(x, backend=backend)
    (grad,) = torch.autograd.grad(out, x, G)
    return check_close([("output", out, ref), ("gradient", grad, ref_grad)], tol)


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    ms = timeit(lambda: y.copy_(x), device, repeats=10)
    return 2 * x.numel() * 4 / (ms / 1e3)


def main(argv=None) -> Table:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", type=parse_shape, help="batch,heads,T,d (default: docs/design.md §7 shapes)")
    p.add_argument("--backends", nargs="+", default=None, help="default: every registered backend")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply every batch (CPU runs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    add_quick_argument(p, QUICK)
    add_json_argument(p)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or [parse_shape(s) for s in default_shapes(device, args.quick)]
    repeats = 2 if args.quick else args.repeats
    shapes = [(max(1, round(B * args.batch_scale)), h, T, d) for B, h, T, d in shapes]
    backends = args.backends or SCAN_BACKENDS.names()
    for b in backends:
        SCAN_BACKENDS.check(b)  # unknown name -> ValueError listing the choices

    bw = copy_bandwidth(device) if device.type == "cuda" else None
    title = f"mru_scan on {device}"
    if device.type == "cuda":
        title += f" ({torch.cuda.get_device_name(device)}, copy bandwidth {bw / 1e12:.2f} TB/s)"
    else:
        title += f" ({torch.get_num_threads()} threads)"
    if args.batch_scale != 1.0:
        title += f", batch scaled by {args.batch_scale:g} from the named shapes"
    columns = {"shape": "batch, heads, T, d", "backend": "backend", "forward_ms": "forward",
               "fwd_bwd_ms": "fwd+bwd", "speedup": "fwd+bwd vs sequential"}
    if bw:
        columns.update(floor_fwd_pct="fwd % of floor", floor_fwd_bwd_pct="fwd+bwd % of floor")
    columns["status"] = "status"
    table = Table(columns, title=f"{title}, float32, best of {repeats}, milliseconds", stream=True,
                  formats={"forward_ms": "{:.2f}", "fwd_bwd_ms": "{:.2f}", "speedup": "{:.2f}x",
                           "floor_fwd_pct": "{:.1f}%", "floor_fwd_bwd_pct": "{:.1f}%"})
    for shape in shapes:
        states = make_states(shape, device)
        nbytes = states.numel() * states.element_size()
        seq_ms, ref = None, None
        for b in backends:
            ok, reason = SCAN_BACKENDS.available(b, device)
            label = ", ".join(map(str, shape))
            if not ok:
                table.add(shape=label, backend=b, status=f"unavailable: {reason}")
                continue
            ref = ref if ref is not None else reference(states)
            failure = check(b, states, ref=ref)
            if failure:
                table.add(shape=label, backend=b, status=f"FAILED check: {failure}")
                continue
            G = torch.randn_like(states)
            x = states.clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    mru_scan(states, backend=b)

            def fwd_bwd():
                mru_scan(x, backend=b).backward(G)
                x.grad = None

            f_ms, fb_ms = best_ms(fwd, device, repeats), best_ms(fwd_bwd, device, repeats)
            if b == "sequential":
                seq_ms = fb_ms
            row = dict(shape=label, backend=b, forward_ms=f_ms, fwd_bwd_ms=fb_ms,
                       speedup=seq_ms / fb_ms if seq_ms else None, status="ok")
            if bw:
                floor_f, floor_fb = 2 * nbytes / bw * 1e3, 6 * nbytes / bw * 1e3
                row.update(floor_fwd_pct=100 * floor_f / f_ms, floor_fwd_bwd_pct=100 * floor_fb / fb_ms)
            table.add(**row)
        states = ref = None  # free this shape's tensors before the next one is made
    write_json(args.json, [table], device=str(device), repeats=repeats)
    return table


if __name__ == "__main__":
    main()
