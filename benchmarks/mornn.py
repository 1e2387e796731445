"""Forward+backward time of MORNN (each nonlinearity) against nn.RNN / nn.LSTM / nn.GRU.

    PYTHONPATH=src python benchmarks/mornn.py         # (128, 1000, 256) and (128, 1000, 512), cuda if available
    PYTHONPATH=src python benchmarks/mornn.py --device cpu --batch 32 --seq 200 --hidden 128 --large-hidden 256

Rows "modrelu (autograd loop)" time the plain Python loop that ops.recurrence replaces (the
reference), so the fused op's gain is measured, not claimed. "MORNN identity" runs what
recurrence_backend="auto" picks; the "(torch op)" and "(chunked)" rows force each identity backend
(benchmarks/recurrence_crossover.py maps where each wins). Prints a markdown table (milliseconds,
best of --repeats, models interleaved, after --warmup).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from matrec.nn.mornn import MORNN
from matrec.ops.orthogonal import ORTHOGONAL_MAPS


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd_once(module, x):
    _sync(x.device)
    t0 = time.perf_counter()
    out, _ = module(x)
    out.sum().backward()
    _sync(x.device)
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def rows(B, T, H, device, repeats, warmup, skip_loop):
    x = torch.randn(T, B, H, device=device)
    candidates = {
        "nn.RNN tanh": nn.RNN(H, H),
        "nn.LSTM": nn.LSTM(H, H),
        "nn.GRU": nn.GRU(H, H),
    }
    for nl in ("tanh", "relu", "modrelu", "identity"):
        candidates[f"MORNN {nl}"] = MORNN(H, H, nonlinearity=nl)
    # identity's two forms, each forced ("MORNN identity" above is auto's choice between them)
    candidates["MORNN identity (torch op)"] = MORNN(H, H, nonlinearity="identity", recurrence_backend="torch")
    candidates["MORNN identity (chunked)"] = MORNN(H, H, nonlinearity="identity", recurrence_backend="chunked")
    if not skip_loop:
        candidates["MORNN modrelu (autograd loop)"] = MORNN(H, H, nonlinearity="modrelu", recurrence_backend="loop")
    mods = {name: mod.to(device) for name, mod in candidates.items()}
    for _ in range(warmup):
        for mod in mods.values():
            fwd_bwd_once(mod, x)
    # Round-robin, best of `repeats`: on a shared machine, load bursts then hit every row alike and
    # the minimum is the least disturbed run.
    times = {name: [] for name in mods}
    for _ in range(repeats):
        for name, mod in mods.items():
            times[name].append(fwd_bwd_once(mod, x))
    return [(name, 1e3 * min(t)) for name, t in times.items()]


def map_rows(H, device, repeats, warmup):
    """Building W_hh = base @ f(A) and back-propagating through it, per orthogonal map."""
    out = []
    for name in ORTHOGONAL_MAPS.names():
        m = MORNN(H, H, orthogonal_map=name).to(device)
        times = []
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            m.weight_hh_l0.sum().backward()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out.append((name, 1e3 * min(times)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--large-hidden", type=int, default=512, help="hidden size of the second shape (0: skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-loop", action="store_true", help="skip the slow autograd-loop reference row")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shapes = [(a.batch, a.seq, a.hidden)] + ([(a.batch, a.seq, a.large_hidden)] if a.large_hidden else [])
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu, {torch.get_num_threads()} threads")
    print(f"device: {dev_name}; torch {torch.__version__}; forward+backward, ms (best of {a.repeats}, round-robin)\n")
    results = {s: dict(rows(*s, device, a.repeats, a.warmup, a.skip_loop)) for s in shapes}
    names = list(next(iter(results.values())))
    header = "| model | " + " | ".join(f"B={b}, T={t}, H={h}" for b, t, h in shapes) + " |"
    print(header)
    print("|" + "---|" * (len(shapes) + 1))
    for n in names:
        cells = []
        for s in shapes:
            ms = results[s][n]
            cells.append(f"{ms:.1f} ({ms / results[s]['nn.RNN tanh']:.2f}x)")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n(x: relative to nn.RNN tanh on the same shape)\n")
    print("| orthogonal map | " + " | ".join(f"W_hh fwd+bwd, H={h}" for _, _, h in shapes) + " |")
    print("|" + "---|" * (len(shapes) + 1))
    maps = {s: dict(map_rows(s[2], device, a.repeats, a.warmup)) for s in shapes}
    for name in ORTHOGONAL_MAPS.names():
        print(f"| {name} | " + " | ".join(f"{maps[s][name]:.1f}" for s in shapes) + " |")


if __name__ == "__main__":
    main()
