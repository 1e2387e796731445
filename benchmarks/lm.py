"""Training throughput and peak memory of the shakespeare-char presets (mixer = mru | attn | linear_attn).

One training step = forward, cross-entropy, backward, AdamW step on random tokens (vocab 65).
Each (model, T) runs in its own subprocess so peak memory is that configuration's alone: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the process's peak resident set (which includes the
~0.3 GB of the Python + torch runtime).

    # CUDA (the target of docs/design.md §7: 40.2 ms/step at batch 64 x T 256 on an H100)
    python benchmarks/lm.py --device cuda --dtype bf16
    # a small CPU run
    OMP_NUM_THREADS=1 python benchmarks/lm.py --device cpu --batch 1 --lengths 256 2048 --steps 2 --warmup 1

By default the batch keeps ``--tokens`` tokens per step (64 x 256), so longer T means fewer rows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _harness import Table, add_json_argument, sync, write_json

MODELS = ("mru", "attn", "linear_attn")
DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def run_one(args) -> dict:
    import torch

    from matrec.models import build_model, num_parameters

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(f"shakespeare-{args.model}", vocab_size=65, output_size=65).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = args.batch or max(1, args.tokens // args.T)
    x = torch.randint(0, 65, (batch, args.T + 1), device=device)
    amp_dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=getattr(torch, amp_dtype or "bfloat16"),
                              enabled=amp_dtype is not None)

    def step():
        with autocast:
            out, _ = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # the mean over consecutive steps, not the best one: a training step's cost includes the
    # allocator and optimizer work that a single best run can dodge
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": args.model, "T": args.T, "batch": batch, "ms": ms,
            "tokens_per_s": batch * args.T / ms * 1e3, "peak_mib": peak,
            "params": num_parameters(model)}


def main(argv=None) -> Table | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help="sequence lengths (default 256 2048 8192, plus 16384 32768 on CUDA)")
    p.add_argument("--tokens", type=int, default=64 * 256, help="tokens per step when --batch is not given")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size (overrides --tokens)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="autocast dtype (the MRU scan stays fp32)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    add_json_argument(p)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return None
    lengths = args.lengths or ([256, 2048, 8192] + ([16384, 32768] if args.device == "cuda" else []))
    print(f"device {args.device}, dtype {args.dtype}, steps {args.steps} (+{args.warmup} warm-up), "
          f"AdamW, shakespeare presets (6 x (mixer + MLP), width 384, 6 heads)\n")
    table = Table({"model": "model", "T": "T", "batch": "batch", "ms": "ms / step", "tokens_per_s": "tokens / s",
                   "peak_mib": "peak memory (MiB)", "params": "parameters", "status": "status"},
                  formats={"ms": "{:.1f}", "tokens_per_s": "{:,.0f}", "peak_mib": "{:,.0f}", "params": "{:,}"},
                  stream=True)
    for model in args.models:
        for T in lengths:
            cmd = [sys.executable, __file__, "--one", "--model", model, "--T", str(T),
                   "--device", args.device, "--tokens", str(args.tokens), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--dtype", args.dtype]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            batch = args.batch or max(1, args.tokens // T)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "PYTHONPATH": _src_path()})
            except subprocess.TimeoutExpired:
                table.add(model=model, T=T, batch=batch, status=f"timeout (> {args.timeout:.0f} s)")
                continue
            if proc.returncode < 0:  # no Python error to show: the OS ended it (SIGKILL: the OOM killer)
                why = f"killed by signal {-proc.returncode}"
                why += " (out of memory?)" if proc.returncode == -9 else ""
                table.add(model=model, T=T, batch=batch, status=why)
                continue
            if proc.returncode != 0:
                err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
                why = "out of memory" if "out of memory" in proc.stderr.lower() else err[:80]
                table.add(model=model, T=T, batch=batch, status=why)
                continue
            table.add(**json.loads(proc.stdout.strip().splitlines()[-1]), status="ok")
    write_json(args.json, [table], device=args.device, dtype=args.dtype, steps=args.steps)
    return table


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _src_path() -> str:
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    return os.pathsep.join(filter(None, [os.path.abspath(src), os.environ.get("PYTHONPATH")]))


if __name__ == "__main__":
    main()
