"""Forward+backward time of MORNN (each nonlinearity) against nn.RNN / nn.LSTM / nn.GRU.

    PYTHONPATH=src python benchmarks/mornn.py         # (128, 1000, 256) and (128, 1000, 512), cuda if available
    PYTHONPATH=src python benchmarks/mornn.py --device cpu --batch 32 --seq 200 --hidden 128 --large-hidden 256

Rows "modrelu (autograd loop)" time the plain Python loop that ops.rnn_recurrence replaces (the
reference), so the fused op's gain is measured, not claimed. "MORNN identity" runs what
recurrence_backend="auto" picks; the "(torch op)" and "(chunked)" rows force each identity backend
(benchmarks/recurrence_crossover.py maps where each wins). Prints a markdown table (milliseconds,
best of --repeats, models interleaved, after --warmup).
"""
from __future__ import annotations

import argparse

import torch
from _harness import Table, add_json_argument, best_ms, best_ms_each, module_fwd_bwd, write_json
from torch import nn

from matrec.nn.mornn import MORNN
from matrec.ops.orthogonal import ORTHOGONAL_MAPS


def fwd_bwd_once(module, x) -> float:
    """Seconds of one forward+backward of ``module`` on ``x`` (benchmarks/gpu_check.py times with it)."""
    return best_ms(module_fwd_bwd(module, x), x.device, repeats=1, warmup=0) / 1e3


def rows(B, T, H, device, repeats, warmup, skip_loop) -> dict[str, float]:
    """Forward+backward milliseconds of every candidate at ``(B, T, H)``, run round-robin."""
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
    fns = {name: module_fwd_bwd(mod.to(device), x) for name, mod in candidates.items()}
    return best_ms_each(fns, device, repeats, warmup)


def map_rows(H, device, repeats, warmup) -> dict[str, float]:
    """Building W_hh = base @ f(A) and back-propagating through it, per orthogonal map."""
    out = {}
    for name in ORTHOGONAL_MAPS.names():
        m = MORNN(H, H, orthogonal_map=name).to(device)
        out[name] = best_ms(lambda: m.weight_hh_l0.sum().backward(), device, repeats, warmup)
    return out


def main(argv=None) -> list[Table]:
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
    add_json_argument(p)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shapes = [(a.batch, a.seq, a.hidden)] + ([(a.batch, a.seq, a.large_hidden)] if a.large_hidden else [])
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu, {torch.get_num_threads()} threads")
    print(f"device: {dev_name}; torch {torch.__version__}; forward+backward, ms (best of {a.repeats}, round-robin)\n")
    keys = {f"B={b}, T={t}, H={h}": (b, t, h) for b, t, h in shapes}
    results = {key: rows(*s, device, a.repeats, a.warmup, a.skip_loop) for key, s in keys.items()}
    speed = Table({"model": "model", **{k: k for k in keys}, **{f"{k} ratio": f"{k}, vs nn.RNN" for k in keys}},
                  formats={**{k: "{:.1f}" for k in keys}, **{f"{k} ratio": "{:.2f}x" for k in keys}})
    for name in next(iter(results.values())):
        speed.add(model=name, **{k: results[k][name] for k in keys},
                  **{f"{k} ratio": results[k][name] / results[k]["nn.RNN tanh"] for k in keys})
    speed.print()
    maps = {k: map_rows(s[2], device, a.repeats, a.warmup) for k, s in keys.items()}
    map_table = Table({"map": "orthogonal map", **{k: f"W_hh fwd+bwd, H={s[2]}" for k, s in keys.items()}},
                      formats={k: "{:.1f}" for k in keys})
    for name in ORTHOGONAL_MAPS.names():
        map_table.add(map=name, **{k: maps[k][name] for k in keys})
    map_table.print()
    write_json(a.json, [speed, map_table], device=dev_name, repeats=a.repeats)
    return [speed, map_table]


if __name__ == "__main__":
    main()
