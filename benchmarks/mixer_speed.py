"""Is the MRU faster than attention? One sequence mixer, forward + backward, at width 384 (6 heads:
the MRU's order is 8), over sequence lengths and batch sizes.

Mixers, each as the models build it (``matrec.models.MIXERS``), projections included:

- ``mru``: the default construction (``ldu``), scan backend ``auto`` (its best measured choice on
  the device: docs/mru.md); the backend it picks is printed beside the time.
- ``mru-spectral``: the same with ``normalize="spectral"`` (the cost of the bounded product).
- ``mru-direction``: the same with ``normalize="direction"`` (the bounded product read out as directions).
- ``attn``: causal self-attention through ``scaled_dot_product_attention`` with its q, k, v and
  output projections and RoPE.
- ``linear_attn``: causal linear attention (its ``auto`` form).

Before timing, the MRU's output and input gradient are checked against the same layer on the
``sequential`` scan (with the backend ``auto`` picks for the full length pinned), and linear
attention's against its ``recurrent`` form, on the first ``--check-length`` tokens (relative 1e-4,
float32); a mismatch is reported instead of a time. A (mixer, batch) whose time predicted from its
previous length (``x (T/T_prev)^2`` for attention, linear for the others) exceeds
``--max-seconds`` is not run, and the table says so with the prediction.

    # CPU, one thread, CPU time of the process (benchmarks/results/mixer_speed_cpu.md)
    PYTHONPATH=src python benchmarks/mixer_speed.py --device cpu --threads 1 --clock process
    # H200 (bf16 autocast, the scan in float32 as always)
    PYTHONPATH=src python benchmarks/mixer_speed.py --device cuda --dtype bf16 --max-seconds 60
    PYTHONPATH=src python benchmarks/mixer_speed.py --quick
"""
from __future__ import annotations

import argparse
import functools
import time
import warnings

import torch
from _harness import Table, add_json_argument, add_quick_argument, best_ms, check_close, write_json

from matrec.models import MIXERS
from matrec.ops.mru_scan import auto_backend

QUICK = "toy sizes (width 24, T 16 and 64, batch 1 and 2)"
# mixer label -> (registered mixer, options, its reference options, exponent of T in its cost)
MIXER_SPECS = {
    "mru": ("mru", {}, {"backend": "sequential"}, 1),
    "mru-spectral": ("mru", {"normalize": "spectral"}, {"normalize": "spectral", "backend": "sequential"}, 1),
    "mru-direction": ("mru", {"normalize": "direction"}, {"normalize": "direction", "backend": "sequential"}, 1),
    "attn": ("attn", {}, None, 2),
    "linear_attn": ("linear_attn", {}, {"form": "recurrent"}, 1),
}


def build(label: str, width: int, heads: int, device, reference: bool = False, **overrides):
    name, options, ref_options, _ = MIXER_SPECS[label]
    torch.manual_seed(0)
    kwargs = {**(ref_options if reference else options), **({} if reference else overrides)}
    mixer = MIXERS.get(name)(width, n_heads=heads, **kwargs).to(device)
    if name == "mru":   # W_in starts at zero (every M_t = I): weights of GPT-2's init scale instead,
        with torch.no_grad():   # small enough that the plain product stays finite at 16k tokens
            mixer.in_proj.weight.normal_(0.0, 0.02)
    return mixer


def fwd_bwd(mixer, x, grad, amp):
    """The output and the input gradient (parameter gradients accumulate, as in training)."""
    x = x.detach().requires_grad_()
    with amp:
        out = mixer(x)[0]
    out.float().backward(grad)
    return out, x.grad


def best_process_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Least CPU time of this process over ``repeats`` calls of ``fn`` after ``warmup``, in ms (CPU only)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return min(times)


def _measure(a, device, amp, table: Table) -> None:
    attn_ms: dict[tuple[int, int], float] = {}
    for B in a.batches:
        last: dict[str, tuple[int, float]] = {}
        for T in a.lengths:
            g = torch.Generator().manual_seed(T)
            x = torch.randn(B, T, a.width, generator=g).to(device)
            grad = torch.randn(B, T, a.width, generator=g).to(device)
            for label in sorted(a.mixers, key=lambda m: m != "attn"):   # attention first: the ratio
                row = dict(mixer=label, batch=B, T=T)
                if label in last:
                    T0, ms0 = last[label]
                    predicted = ms0 * (T / T0) ** MIXER_SPECS[label][3] / 1e3
                    if predicted > a.max_seconds:
                        table.add(**row, note=f"not run: ~{predicted:.3g} s predicted > --max-seconds")
                        last[label] = (T, predicted * 1e3)
                        continue
                overrides, note = {}, ""
                if label.startswith("mru"):   # auto's choice for the full length, pinned for the check
                    order = MIXERS.get("mru")(a.width, n_heads=a.heads).order
                    overrides["backend"] = auto_backend(device, T, B * a.heads, order)
                    note = f"scan {overrides['backend']}"
                mixer = build(label, a.width, a.heads, device, **overrides)
                ref_options = MIXER_SPECS[label][2]
                if ref_options is not None:   # on the first --check-length tokens: the reference is slow
                    ref = build(label, a.width, a.heads, device, reference=True)
                    n = min(T, a.check_length)
                    got, want = (fwd_bwd(m, x[:, :n], grad[:, :n], amp) for m in (mixer, ref))
                    failed = check_close([("output", got[0], want[0]), ("input gradient", got[1], want[1])],
                                         3e-2 if a.dtype == "bf16" else 1e-4)
                    if failed:
                        table.add(**row, note=f"FAILED against {ref_options}: {failed}")
                        continue
                call = functools.partial(fwd_bwd, mixer, x, grad, amp)
                ms = (best_ms(call, device, a.repeats, warmup=1) if a.clock == "wall"
                      else best_process_ms(call, a.repeats, warmup=1))
                last[label] = (T, ms)
                if label == "attn":
                    attn_ms[(B, T)] = ms
                table.add(**row, ms=ms, per_token_us=ms * 1e3 / (B * T),
                          vs_attn=attn_ms[(B, T)] / ms if (B, T) in attn_ms else None, note=note)


def main(argv=None) -> Table:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (CUDA)")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--mixers", nargs="+", choices=list(MIXER_SPECS), default=list(MIXER_SPECS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: the CPU time of this process instead of wall time (CPU, one thread: other "
                        "processes' load then adds nothing but cache and memory-bandwidth contention)")
    p.add_argument("--check-length", type=int, default=1024,
                   help="tokens of the reference check (the sequential scan and recurrent form are slow)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="skip a configuration whose predicted time per call exceeds this")
    add_quick_argument(p, QUICK)
    add_json_argument(p)
    a = p.parse_args(argv)
    if a.quick:
        a.width, a.heads, a.lengths, a.batches, a.repeats = 24, 2, [16, 64], [1, 2], 1
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.clock == "process" and device.type != "cpu":
        p.error("--clock process measures the CPU: use it with --device cpu")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    table = Table({"mixer": "mixer", "batch": "batch", "T": "T", "ms": "fwd+bwd ms",
                   "per_token_us": "µs / token", "vs_attn": "attn ms / this ms", "note": "note"},
                  title=f"mixer forward+backward ({a.clock} time), width {a.width}, {a.heads} heads, {a.dtype}, "
                        f"{device.type}"
                        + (f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""),
                  formats={"ms": "{:.2f}", "per_token_us": "{:.2f}", "vs_attn": "{:.2f}"}, stream=True)
    with warnings.catch_warnings():
        # the weights above keep the plain MRU's product finite: its long-sequence warning is not news here
        warnings.filterwarnings("ignore", message="MRU with state_matrix", category=RuntimeWarning)
        _measure(a, device, amp, table)
    write_json(a.json, [table], device=str(device), threads=torch.get_num_threads(), dtype=a.dtype)
    return table


if __name__ == "__main__":
    main()
