"""One command that proves matrec's GPU paths and measures them: a markdown report and a JSON.

    make gpu-check                                                  # = the line below
    PYTHONPATH=src python benchmarks/gpu_check.py --out benchmarks/results/gpu_check
    PYTHONPATH=src python benchmarks/gpu_check.py --only scan mornn  # some parts
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gc  # toy sizes (tests)

Parts, correctness first (each in its own process with its own time cap, so a hang, a crashed CUDA
context or an out-of-memory in one part is recorded as such and the others still run):

  tests  ``pytest -m cuda``: every GPU test of the suite; failures listed with their reason.
  scan   mru_scan: the Triton kernel's targets and its analytic bytes and FMAs per shape, then the
         kernel compiled and warmed at every shape, then every backend against the float64 loop
         (output and gradient), then forward and forward+backward times of each on the shapes of
         benchmarks/scan.py, as multiples of the memory floor (bytes that must move / measured copy
         bandwidth); for the kernel also its GPU time, the wall time per call of 20 back-to-back
         calls, and the time per replay of a CUDA graph of one forward+backward.
  guard  the cost of the first-use kernel check (matrec.ops.kernel_guard) per order d.
  mornn  MORNN against nn.RNN (cuDNN), LSTM, GRU at B = 128, T = 1000, H = 256: tanh/relu (cuDNN on
         the materialised W), modReLU/identity through each recurrence backend and auto, after checking
         each backend against the autograd loop and the column-split kernel against the torch op at
         that shape; every model compiled and warmed, then timed with TF32 off and on; then the
         recurrence kernels alone (split, rows, torch op). Analytic GFMA and HBM MB beside each time.
  copy   the copy task at delay 1000 with MORNN's recipe: wall-clock time to recall >= 0.99.
  lm     ms per training step (bf16 autocast) of the shakespeare presets, and the sequence mixers
         alone (forward+backward) against causal SDPA at T = 1k, 4k, 16k, 64k.

Needs no network and no install step: a checkout with ``PYTHONPATH=src`` on a Python that has torch
(and Triton for the kernels), or the project installed as usual.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# part -> cap in seconds at full size (upper bounds: a part ends when done). The caps add up to 8.5 minutes.
CAPS = {"tests": 150, "scan": 100, "guard": 30, "mornn": 90, "copy": 70, "lm": 70}
QUICK = "toy sizes: exercises every part (the test suite runs it)"  # read by matrec bench --quick
QUICK_CAP = 90  # per part in --quick mode (toy sizes on a shared CPU)
CUT_SHORT = "cut short"  # what a part returns when it stopped itself at its cap


# ------------------------------------------------------------------------------------------------
# Records: every figure a part measures is one JSON line ``{"table": ..., "row": {...}}`` appended to
# the part's records file as soon as it exists, so a part that is cut off keeps what it measured.


class Recorder:
    def __init__(self, path: Path, part: str):
        self.path, self.part = path, part

    def __call__(self, table: str, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"part": self.part, "table": table, "row": row}, default=str) + "\n")
        print(f"[{self.part}] {table}: {row}", flush=True)


@functools.lru_cache(maxsize=None)
def _load_bench(name: str):
    """A sibling benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_matrec_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:200]


# ------------------------------------------------------------------------------------------------
# Parts. Each is ``part(record, device, quick)``.


def part_tests(record, device, quick, deadline=None):
    """``pytest -m cuda`` over the suite, each test's outcome read as pytest prints it.

    Stops pytest itself shortly before ``deadline`` (``time.monotonic()``), so that the counts of
    what did run are still recorded when the suite is slower than the part's cap.
    """
    # quick mode (CPU, toy sizes) proves the part's machinery on one file: collecting the whole suite
    # imports TensorFlow, ExecuTorch and transformers, over a minute of a shared CPU for skips only
    where = HERE.parent / "tests" / ("test_cuda.py" if quick else "")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rfE", "-p", "no:cacheprovider",
           "--color=no", "--continue-on-collection-errors", str(where)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "COLUMNS": "300"}  # pytest cuts the failure reasons to the terminal's width
    counts: dict[str, int] = {}
    outcome = re.compile(r"^(\S+::\S+(?: \S+)?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
    summary = re.compile(r"^(FAILED|ERROR) (\S+::\S+)(?: - (.*))?$")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=HERE.parent)
    stopped = False
    if deadline is not None:
        def stop():
            nonlocal stopped
            stopped = True
            proc.kill()

        timer = threading.Timer(max(1.0, deadline - time.monotonic() - 5), stop)
        timer.daemon = True
        timer.start()
    tail = []
    for line in proc.stdout:
        print(line, end="", flush=True)  # into the part's log
        line = line.rstrip("\n")
        tail = (tail + [line])[-15:]
        m = outcome.match(line)
        if m:
            counts[m.group(2)] = counts.get(m.group(2), 0) + 1
            continue
        m = summary.match(line)
        if m:
            record("CUDA test failures", test=m.group(2), outcome=m.group(1), reason=(m.group(3) or "")[:300])
    rc = proc.wait()
    record("CUDA tests", passed=counts.get("PASSED", 0), failed=counts.get("FAILED", 0),
           errors=counts.get("ERROR", 0), skipped=counts.get("SKIPPED", 0), pytest_exit=rc,
           last_line="stopped at the part's time cap" if stopped else (tail[-1] if tail else ""))
    if stopped:
        record("CUDA test failures", test="(remaining tests)", outcome="not run",
               reason=f"pytest stopped at the time cap; last line: {tail[-1] if tail else ''}")
        return CUT_SHORT
    if rc not in (0, 1, 5):  # 1: tests failed (listed above); 5: none selected
        record("CUDA test failures", test="(pytest itself)", outcome=f"exit {rc}", reason=" | ".join(tail[-5:]))


def _bandwidth(device, quick) -> float:
    """Bytes per second of a large device copy (read + write): the memory floor's denominator."""
    import torch

    n = (4 if quick else 256) * 2**20  # floats: 16 MiB quick, 1 GiB otherwise
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = _load_bench("_harness").best_ms(lambda: y.copy_(x), device, repeats=3 if quick else 10)
    return 2 * n * 4 / (ms / 1e3)


def _kernel_ms(fn, device):
    """Milliseconds the GPU spent in kernels during one call of ``fn`` (torch.profiler): against the
    wall time it shows how much of a call is launch and Python overhead. None off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    events = prof.key_averages()
    total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    return total / 1e3  # microseconds -> ms


# The Triton scan's targets on one H200 (issue 25): forward+backward kernel time in microseconds per
# shape, and the wall time of a call at most SCAN_WALL_OVER_KERNEL x its kernel time.
SCAN_TARGETS_US = {"64,6,256,8": 75, "80,3,512,16": 330, "8,4,4096,16": 350}
SCAN_WALL_OVER_KERNEL = 1.3
SCAN_CALLS = 20  # back-to-back calls per timed run of the per-call wall time (one sync at the end)


def _per_call_ms(fn, device, repeats, calls=SCAN_CALLS):
    """Wall milliseconds per call of ``calls`` back-to-back calls and one sync (best of ``repeats``):
    what a training loop sees, without a sync's latency on every call."""
    def many():
        for _ in range(calls):
            fn()

    return _load_bench("_harness").best_ms(many, device, repeats) / calls


def _scan_ops(states, G):
    """One forward+backward of the Triton scan through its two ops, no autograd: what a CUDA graph
    captures."""
    import torch

    from matrec.ops.mru_scan import triton as _registers_the_ops  # noqa: F401

    ops = torch.ops.matrec
    T, d = states.shape[-3], states.shape[-1]
    M, dH = states.reshape(-1, T, d, d), G.reshape(-1, T, d, d)

    def run():
        H, P = ops.triton_mru_scan_fwd(M, None, 0)
        ops.triton_mru_scan_bwd(dH, M, H, P, None, 0)

    return run


def _graph_ms(states, G, device, repeats):
    """Wall milliseconds per replay of a CUDA graph holding one Triton scan forward+backward (so no
    host work at all), or the reason it could not be captured."""
    import torch

    run = _scan_ops(states, G)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph requires
        run()
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return _per_call_ms(graph.replay, device, repeats)


def _scan_targets(record, bench, bw):
    """The Triton scan's targets (SCAN_TARGETS_US) beside this device's memory floor at each shape."""
    for label, us in SCAN_TARGETS_US.items():
        B, h, T, d = bench.parse_shape(label)
        floor_us = 6 * B * h * T * d * d * 4 / bw * 1e6
        record("scan: targets (Triton, one H200)", shape=label, fwd_bwd_kernel_us_max=us,
               wall_over_kernel_max=SCAN_WALL_OVER_KERNEL, floor_fwd_bwd_us_here=round(floor_us, 1),
               target_x_floor_here=round(us / floor_us, 2))


def _scan_cost_records(record, shapes, cost, device):
    """The analytic cost of every shape, as this device's launch plan runs it (no kernel needed)."""
    for shape in shapes if cost else []:
        B, h, T, d = shape
        c = cost(B * h, T, d, 4, device)
        record("scan: Triton kernel model", shape=",".join(map(str, shape)), n_chunks=c["n_chunks"],
               chunk=c["chunk"], seq_per_program=c["seq_per_program"], programs=c["programs"],
               floor_MB=round((c["floor_bytes"]["fwd"] + c["floor_bytes"]["bwd"]) / 1e6, 2),
               kernel_MB_fwd=round(c["bytes"]["fwd"] / 1e6, 2), kernel_MB_bwd=round(c["bytes"]["bwd"] / 1e6, 2),
               bytes_x_floor=round((c["bytes"]["fwd"] + c["bytes"]["bwd"])
                                   / (c["floor_bytes"]["fwd"] + c["floor_bytes"]["bwd"]), 2),
               GFMA_fwd=round(c["fmas"]["fwd"] / 1e9, 3), GFMA_bwd=round(c["fmas"]["bwd"] / 1e9, 3),
               useful_GFMA=round((c["useful_fmas"]["fwd"] + c["useful_fmas"]["bwd"]) / 1e9, 3))


def _scan_warm_up(record, shapes, device):
    """Compile and warm the Triton kernel at every shape, so that no timing includes a compilation."""
    import torch

    from matrec.ops.mru_scan import mru_scan

    for shape in shapes:
        t0 = time.perf_counter()
        try:
            B, h, T, d = shape  # the values do not matter to a compilation: identities, no CPU work
            x = torch.eye(d, device=device).expand(B, h, T, d, d).clone().requires_grad_()
            mru_scan(x, backend="triton").backward(torch.ones_like(x))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            note = "ok"
        except Exception as err:
            note = _short(err)
        record("scan: warm-up (Triton compile)", shape=",".join(map(str, shape)),
               seconds=round(time.perf_counter() - t0, 2), result=note)
        x = None


def _scan_correctness(record, bench, label, states, ref, device) -> list:
    """Every scan backend against the float64 reference at one shape: the backends that passed."""
    from matrec.ops.mru_scan import SCAN_BACKENDS

    passed = []
    for b in SCAN_BACKENDS.names():
        ok, reason = SCAN_BACKENDS.get(b).available(device)
        if not ok:
            record("scan: correctness", shape=label, backend=b, result=f"unavailable: {reason}")
            continue
        try:
            failure = bench.check(b, states, ref=ref)
        except Exception as err:  # a kernel that does not compile or launch
            failure = _short(err)
        record("scan: correctness", shape=label, backend=b, result=failure or "ok")
        if failure is None:
            passed.append(b)
    return passed


def _scan_triton_extras(fwd_bwd, states, G, shape, device, repeats, cost, gpu_ms):
    """The Triton kernel's per-call and CUDA-graph times and its analytic throughput at one shape:
    ``(tri, extra)``, the figures the summary reads and the extra fields of its time record."""
    extra = {}
    tri = {"kernel_ms": gpu_ms, "call_ms": None, "graph_ms": None}
    try:
        tri["call_ms"] = _per_call_ms(fwd_bwd, device, repeats)
        if device.type == "cuda":
            tri["graph_ms"] = _graph_ms(states, G, device, repeats)
    except Exception as err:  # recorded, never fatal: the plain timing above stands
        extra["note"] = _short(err)
    c = cost(shape[0] * shape[1], shape[2], shape[3], 4, device) if cost else None
    extra.update(
        call_ms=None if tri["call_ms"] is None else round(tri["call_ms"], 4),
        graph_ms=None if tri["graph_ms"] is None else round(tri["graph_ms"], 4),
        kernel_MB=None if c is None else round((c["bytes"]["fwd"] + c["bytes"]["bwd"]) / 1e6, 2),
        kernel_TFMA_per_s=None if (c is None or not gpu_ms)
        else round((c["fmas"]["fwd"] + c["fmas"]["bwd"]) / (gpu_ms / 1e3) / 1e12, 2),
        kernel_GBps=None if (c is None or not gpu_ms)
        else round((c["bytes"]["fwd"] + c["bytes"]["bwd"]) / (gpu_ms / 1e3) / 1e9, 1))
    return tri, extra


def _scan_time_backend(record, b, shape, label, states, G, device, repeats, cost, floors):
    """Forward and forward+backward times of one backend at one shape, recorded: ``None`` if it was not
    timed, else ``((fwd_ms, fwd_bwd_ms), tri)`` with ``tri`` the Triton figures (None for the others)."""
    import torch

    from matrec.ops.mru_scan import mru_scan

    floor_f, floor_fb = floors
    if b == "sequential" and device.type == "cuda" and shape[2] > 1024:  # 0.3-0.6 s a call
        record("scan: time", shape=label, backend=b, fwd_ms=None, fwd_bwd_ms=None,
               note="not timed: one launch per step, > 1024 steps")
        return None
    x = states.clone().requires_grad_()

    def fwd(b=b):
        with torch.no_grad():
            mru_scan(states, backend=b)

    def fwd_bwd(b=b, x=x):
        mru_scan(x, backend=b).backward(G)
        x.grad = None

    try:
        best_ms = _load_bench("_harness").best_ms
        f_ms, fb_ms = best_ms(fwd, device, repeats), best_ms(fwd_bwd, device, repeats)
    except Exception as err:
        record("scan: time", shape=label, backend=b, fwd_ms=None, fwd_bwd_ms=None, note=_short(err))
        return None
    try:
        gpu_ms = _kernel_ms(fwd_bwd, device)
    except Exception:  # the profiler is a nicety here, never a failure of the part
        gpu_ms = None
    tri, extra = None, {}
    if b == "triton":
        tri, extra = _scan_triton_extras(fwd_bwd, states, G, shape, device, repeats, cost, gpu_ms)
    record("scan: time", shape=label, backend=b, fwd_ms=round(f_ms, 3), fwd_bwd_ms=round(fb_ms, 3),
           fwd_x_floor=round(f_ms / floor_f, 2), fwd_bwd_x_floor=round(fb_ms / floor_fb, 2),
           fwd_bwd_kernel_ms=None if gpu_ms is None else round(gpu_ms, 3), **extra)
    return (f_ms, fb_ms), tri


def _scan_summary(record, label, times, tri, floor_f, floor_fb):
    """One shape's summary: the Triton kernel against the floor, its target and the best PyTorch backend."""
    torch_times = {b: t for b, t in times.items() if b != "triton"}
    best = min(torch_times, key=lambda b: torch_times[b][1]) if torch_times else None
    tri_t = times.get("triton")
    kernel_ms, call_ms = tri.get("kernel_ms"), tri.get("call_ms")
    target = SCAN_TARGETS_US.get(label)
    met = None
    if target is not None and kernel_ms and call_ms:
        met = kernel_ms * 1e3 <= target and call_ms <= SCAN_WALL_OVER_KERNEL * kernel_ms
    record("scan: summary", shape=label, floor_fwd_ms=round(floor_f, 4), floor_fwd_bwd_ms=round(floor_fb, 4),
           triton_fwd_bwd_ms=round(tri_t[1], 3) if tri_t else None,
           triton_x_floor=round(tri_t[1] / floor_fb, 2) if tri_t else None,
           triton_kernel_us=None if not kernel_ms else round(kernel_ms * 1e3, 1),
           triton_kernel_x_floor=None if not kernel_ms else round(kernel_ms / floor_fb, 2),
           triton_call_over_kernel=None if not (kernel_ms and call_ms) else round(call_ms / kernel_ms, 2),
           triton_graph_ms=None if tri.get("graph_ms") is None else round(tri["graph_ms"], 4),
           target_kernel_us=target, target_met=met,
           best_pytorch=best, best_pytorch_fwd_bwd_ms=round(torch_times[best][1], 3) if best else None,
           best_pytorch_x_floor=round(torch_times[best][1] / floor_fb, 2) if best else None,
           triton_speedup=round(torch_times[best][1] / tri_t[1], 2) if (tri_t and best) else None)


def part_scan(record, device, quick):
    import torch

    from matrec.ops.mru_scan import SCAN_BACKENDS

    bench = _load_bench("scan")
    bw = _bandwidth(device, quick)
    record("scan: device", copy_bandwidth_GBps=round(bw / 1e9, 1))
    shapes = [bench.parse_shape(s) for s in bench.default_shapes(device, quick)]
    repeats = 2 if quick else 3
    tri_ok, tri_reason = SCAN_BACKENDS.get("triton").available(device)
    cost = None
    try:
        from matrec.ops.mru_scan.triton import scan_cost as cost
    except ImportError as err:  # triton missing: no kernel, no model
        tri_reason = tri_reason or _short(err)
    _scan_targets(record, bench, bw)
    _scan_cost_records(record, shapes, cost, device)
    if tri_ok:  # compile and warm the kernel at every shape first, so no timing below includes a compilation
        _scan_warm_up(record, shapes, device)
    for shape in shapes:
        label = ",".join(map(str, shape))
        states = bench.make_states(shape, device)
        nbytes = states.numel() * states.element_size()
        floor_f, floor_fb = 2 * nbytes / bw * 1e3, 6 * nbytes / bw * 1e3
        ref = bench.reference(states)
        passed = _scan_correctness(record, bench, label, states, ref, device)
        G = torch.randn_like(states)
        times, tri = {}, {}
        for b in passed:
            timed = _scan_time_backend(record, b, shape, label, states, G, device, repeats, cost,
                                       (floor_f, floor_fb))
            if timed is None:
                continue
            times[b], tri_b = timed
            if tri_b is not None:
                tri = tri_b
        _scan_summary(record, label, times, tri, floor_f, floor_fb)
        states = ref = G = None  # free this shape's tensors before the next shape's are made


def part_guard(record, device, quick):
    import torch

    from matrec.ops import kernel_guard
    from matrec.ops.mru_scan import SCAN_BACKENDS

    ok, reason = SCAN_BACKENDS.get("triton").available(device)
    if not ok:
        record("guard: first-use check", d=None, dtype=None, ms=None, verdict=f"triton unavailable: {reason}")
        return
    kernel_guard.reset()
    keys = [(torch.float32, 3)] if quick else [(torch.float32, d) for d in (8, 16, 64)] + [(torch.bfloat16, 16)]
    for dtype, d in keys:
        t0 = time.perf_counter()
        ok = kernel_guard.proven("mru_scan", device, dtype, d)
        ms = (time.perf_counter() - t0) * 1e3
        verdict = list(kernel_guard.verdicts().values())[-1][1]
        # the first call includes Triton's compilation for this d; the second is the check alone
        kernel_guard.reset()
        t0 = time.perf_counter()
        kernel_guard.proven("mru_scan", device, dtype, d)
        warm_ms = (time.perf_counter() - t0) * 1e3
        record("guard: first-use check", d=d, dtype=str(dtype).replace("torch.", ""), passed=ok,
               first_ms=round(ms, 1), compiled_ms=round(warm_ms, 1), verdict=verdict[:200])


def _recurrence_check(device, nonlinearity, backend, H):
    """None if ``backend`` agrees with the autograd loop on a small problem (outputs, every grad)."""
    import torch

    from matrec.ops.rnn_recurrence import recurrence

    g = torch.Generator().manual_seed(0)
    T, B = 37, 3
    Q = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))[0]
    xp = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    bias = -0.1 * torch.rand(H, generator=g, dtype=torch.float64) if nonlinearity == "modrelu" else None
    args = [xp, Q, h0] + ([bias] if bias is not None else [])
    ref_in = [a.clone().requires_grad_() for a in args]
    ref = recurrence(*ref_in[:3], ref_in[3] if bias is not None else None, nonlinearity, backend="loop")
    G = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_in, G)
    dev_in = [a.float().to(device).requires_grad_() for a in args]
    out = recurrence(*dev_in[:3], dev_in[3] if bias is not None else None, nonlinearity, backend=backend)
    grads = torch.autograd.grad(out, dev_in, G.float().to(device))
    names = ["output", "d xproj", "d weight", "d h0", "d bias"]
    pairs = [(name, a.cpu(), b) for name, a, b in zip(names, (out, *grads), (ref, *ref_grads))]
    return _load_bench("_harness").check_close(pairs, 1e-3)


TARGET_VS_RNN = 1.6  # MORNN modReLU forward+backward against cuDNN nn.RNN tanh at B 128, T 1000, H 256


def layer_costs(B, T, H, gates=1):
    """Analytic forward+backward cost of one recurrent layer (input size H, float32): ``(GFMA, HBM MB)``.

    FMAs: the forward's input and recurrent products, ``gates * T*B*H*(H + H)``, three times (the
    backward's two products per weight: d input/state, d weight). Bytes: every ``[T, B, .]`` tensor moved
    once: forward reads x, writes the pre-activations and outputs; backward reads the output gradient,
    pre-activations, outputs and x, writes d pre-activations and dx; the weights are negligible here.
    A floor, not a model of any kernel: a recurrence is bound by its T dependent steps, so ``us_step``
    (time per dependent step, forward and backward) is printed beside it.
    """
    fma = 3 * gates * T * B * H * 2 * H
    floats = T * B * (H + 2 * gates * H + H) + T * B * (H + 2 * gates * H + H + 2 * H)
    return _sig(fma / 1e9), _sig(4 * floats / 1e6)


def recurrence_costs(B, T, H):
    """Analytic cost of the recurrence op alone (``xproj`` given), forward+backward: ``(GFMA, HBM MB)``.
    FMAs: ``h @ W^T`` forward, ``dz @ W`` backward, ``dW`` GEMM: ``3 T*B*H^2``. Bytes (float32): the
    forward reads xproj, writes out and z; the backward kernel reads g and z, writes dz; the dW GEMM reads
    dz and out: ``8 T*B*H`` floats (W and the [B, H] states are noise beside it)."""
    return _sig(3 * T * B * H * H / 1e9), _sig(4 * 8 * T * B * H / 1e6)


def _sig(v: float) -> float:
    return float(f"{v:.3g}")


def _tf32(on: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on  # matmuls (MORNN's input projection, the dW GEMMs)
    torch.backends.cudnn.allow_tf32 = on        # cuDNN's RNN/LSTM/GRU kernels (torch's default: on)


def _mornn_check_backends(record, device, quick) -> dict:
    """Each recurrence backend against the autograd loop on a small problem: ``{(nonlinearity, backend):
    passed}``."""
    backends = {"modrelu": ["torch", "triton"], "identity": ["torch", "chunked", "triton"]}
    usable = {}
    for nl, names in backends.items():
        for b in names:
            try:
                failure = _recurrence_check(device, nl, b, 32 if not quick else 8)
            except Exception as err:
                failure = _short(err)
            record("mornn: recurrence correctness", nonlinearity=nl, backend=b, result=failure or "ok")
            usable[(nl, b)] = failure is None
    return usable


def _mornn_split_check(record, tr, ts, W, xp, h0, bias, shape):
    """The column-split kernel at the timed shape (its real grid and barrier) against the torch op."""
    import torch

    from matrec.ops.rnn_recurrence import recurrence

    for nl in ("modrelu", "identity") if ts is not None else ():
        b = bias if nl == "modrelu" else None
        try:
            ins = [t.clone().requires_grad_() for t in (xp, h0)]
            ref = recurrence(ins[0], W, ins[1], b, nl, backend="torch")
            ref_g = torch.autograd.grad(ref.square().sum(), ins)
            ins2 = [t.clone().requires_grad_() for t in (xp, h0)]
            out = tr.triton_recurrence(ins2[0], W, ins2[1], b, nl, kernel="split")
            got_g = torch.autograd.grad(out.square().sum(), ins2)
            pairs = [("output", out, ref), ("d xproj", got_g[0], ref_g[0]), ("d h0", got_g[1], ref_g[1])]
            errs = {n: f"{_load_bench('_harness').relative_error(a, r):.1e}" for n, a, r in pairs}
            record("mornn: split kernel at the timed shape", nonlinearity=nl, shape=shape, **errs,
                   forward=" / ".join(ts.LAST_RUN["forward"]), backward=" / ".join(ts.LAST_RUN["backward"]))
        except Exception as err:
            record("mornn: split kernel at the timed shape", nonlinearity=nl, shape=shape, output=_short(err))


def _mornn_candidates(H, usable, quick) -> dict:
    """The models to time: ``{name: (make, gates)}``, cuDNN's and MORNN's, and MORNN on every backend that
    passed its check."""
    from torch import nn

    from matrec.nn.mornn import MORNN

    candidates = {"nn.RNN tanh": (lambda: nn.RNN(H, H), 1), "nn.LSTM": (lambda: nn.LSTM(H, H), 4),
                  "nn.GRU": (lambda: nn.GRU(H, H), 3), "MORNN tanh": (lambda: MORNN(H, H), 1),
                  "MORNN relu": (lambda: MORNN(H, H, nonlinearity="relu"), 1),
                  "MORNN modrelu (auto)": (lambda: MORNN(H, H, nonlinearity="modrelu"), 1),
                  "MORNN identity (auto)": (lambda: MORNN(H, H, nonlinearity="identity"), 1)}
    for (nl, b), ok in usable.items():
        if ok and not (quick and b == "triton"):  # interpreted on CPU: the recurrence op rows below time it
            candidates[f"MORNN {nl} ({b})"] = (lambda nl=nl, b=b: MORNN(H, H, nonlinearity=nl, recurrence_backend=b), 1)
    return candidates


def _mornn_warm(record, bench, candidates, x, device, quick, shape):
    """Build, compile and warm every candidate (auto's first-use check included): ``(runs, gates)``, the
    modules that ran and their gate counts."""
    runs, gates = {}, {}
    for name, (make, k) in candidates.items():
        try:
            mod = make().to(device)
            for _ in range(1 if quick else 2):  # compiles kernels, builds plans, runs auto's first-use check
                bench.fwd_bwd_once(mod, x)
            runs[name], gates[name] = mod, k
        except Exception as err:
            record("mornn: fwd+bwd", model=name, shape=shape, tf32=None, ms=None, note=_short(err))
    return runs, gates


def _mornn_auto(record, x, shape):
    """The backend ``auto`` picked per nonlinearity, and the first-use checks behind it."""
    from matrec.ops import kernel_guard
    from matrec.ops.rnn_recurrence import dispatch

    for nl in ("modrelu", "identity"):
        picked = dispatch._resolve("auto", x, nl)[0]
        verdicts = {k: v for k, v in kernel_guard.verdicts().items() if k[0] == "rnn_recurrence"}
        record("mornn: auto", nonlinearity=nl, shape=shape, backend=picked,
               check="; ".join(f"H={k[3]} {k[2]}: {v[1]}" for k, v in verdicts.items())[:200] or None)


def _mornn_time_models(record, bench, runs, gates, x, device, reps, dims, shape):
    """Every warmed model timed round-robin with TF32 off (and on, on CUDA), against cuDNN nn.RNN tanh."""
    B, T, H = dims
    for tf32 in (False, True) if device.type == "cuda" else (False,):
        _tf32(tf32)
        best = {name: bench.fwd_bwd_once(mod, x) for name, mod in runs.items()}
        for _ in range(reps - 1):  # round-robin: every model sees the same clocks and neighbours
            for name, mod in runs.items():
                best[name] = min(best[name], bench.fwd_bwd_once(mod, x))
        base = 1e3 * best.get("nn.RNN tanh", float("nan"))
        for name, sec in best.items():
            gfma, mb = layer_costs(B, T, H, gates[name])
            ms = 1e3 * sec
            record("mornn: fwd+bwd", model=name, shape=shape, tf32=tf32, ms=round(ms, 2),
                   vs_rnn=round(ms / base, 2), us_step=round(1e3 * ms / (2 * T), 2), gfma=gfma, hbm_mb=mb)
        if "MORNN modrelu (auto)" in best:  # the target: at most TARGET_VS_RNN x cuDNN nn.RNN tanh
            ratio = 1e3 * best["MORNN modrelu (auto)"] / base
            record("mornn: target", shape=shape, tf32=tf32, rnn_tanh_ms=round(base, 2),
                   mornn_modrelu_auto_ms=round(1e3 * best["MORNN modrelu (auto)"], 2), ratio=round(ratio, 2),
                   target=TARGET_VS_RNN,  # judged only where the target is set: that shape on a GPU
                   met=bool(ratio <= TARGET_VS_RNN) if (B, T, H) == (128, 1000, 256) and device.type == "cuda"
                   else None)
    _tf32(False)


def _mornn_recurrence_ops(record, tr, ts, W, xp, h0, bias, device, quick, reps, dims, shape):
    """The recurrence kernels alone (xproj given), timed: what the issue's kernel targets are about."""
    import torch

    from matrec.ops.rnn_recurrence import recurrence

    B, T, H = dims
    gfma, mb = recurrence_costs(B, T, H)
    ops = {"triton split": lambda x, nl, b: tr.triton_recurrence(x, W, h0, b, nl, kernel="split"),
           "triton rows": lambda x, nl, b: tr.triton_recurrence(x, W, h0, b, nl, kernel="rows"),
           "torch op": lambda x, nl, b: recurrence(x, W, h0, b, nl, backend="torch")}
    if quick:  # interpreted on CPU: the rows kernel is timed by the full-size run only
        del ops["triton rows"]
    harness = _load_bench("_harness")
    for nl in ("modrelu",) if quick else ("modrelu", "identity"):
        b = bias if nl == "modrelu" else None
        xg = xp.clone().requires_grad_()
        for name, op in ops.items():
            def fwd(op=op):
                with torch.no_grad():
                    op(xp, nl, b)

            def fwd_bwd(op=op):
                op(xg, nl, b).sum().backward()
                xg.grad = None

            try:
                fwd_bwd()  # compile and warm
                f_ms = harness.best_ms(fwd, device, repeats=reps, warmup=0 if quick else 1)
                fb_ms = harness.best_ms(fwd_bwd, device, repeats=reps, warmup=0 if quick else 1)
                k_ms = _kernel_ms(fwd_bwd, device)
            except Exception as err:
                record("mornn: recurrence op", nonlinearity=nl, kernel=name, shape=shape, fwd_ms=None, note=_short(err))
                continue
            ran = " / ".join(ts.LAST_RUN.get("forward", ("-", ""))) if name == "triton split" else None
            record("mornn: recurrence op", nonlinearity=nl, kernel=name, shape=shape, fwd_ms=round(f_ms, 2),
                   fwd_bwd_ms=round(fb_ms, 2), kernel_ms=None if k_ms is None else round(k_ms, 2),
                   us_step=round(1e3 * fb_ms / (2 * T), 2), gfma=gfma, hbm_mb=mb, ran=ran)


def part_mornn(record, device, quick, shape=None):
    """MORNN against cuDNN, then the recurrence kernels alone. Correctness first (each backend against the
    autograd loop on a small problem; the column-split kernel against the torch op at the timed shape),
    then every candidate compiled and warmed (auto's first-use check included), then timed round-robin
    with TF32 off and on; analytic GFMA / HBM MB beside every time."""
    import torch

    from matrec.ops import kernel_guard
    from matrec.ops.rnn_recurrence import triton as tr

    bench = _load_bench("mornn")
    B, T, H = shape or ((4, 20, 16) if quick else (128, 1000, 256))  # shape: (B, T, H), for a dry run
    reps = 2 if quick else 5
    shape = f"B={B}, T={T}, H={H}"
    usable = _mornn_check_backends(record, device, quick)
    ts = None
    if usable.get(("modrelu", "triton")):
        from matrec.ops.rnn_recurrence import triton_split as ts
    # the timed shape's problem: the split kernel's check below and the recurrence op timings use it
    g = torch.Generator().manual_seed(0)
    W = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))[0].float().to(device)
    xp = torch.randn(T, B, H, generator=g).to(device)
    h0 = torch.randn(B, H, generator=g).to(device)
    bias = (-0.1 * torch.rand(H, generator=g)).to(device)
    _mornn_split_check(record, tr, ts, W, xp, h0, bias, shape)

    # MORNN and cuDNN: build, compile and warm everything, then time
    candidates = _mornn_candidates(H, usable, quick)
    x = torch.randn(T, B, H, device=device)
    kernel_guard.reset()
    runs, gates = _mornn_warm(record, bench, candidates, x, device, quick, shape)
    _mornn_auto(record, x, shape)
    _mornn_time_models(record, bench, runs, gates, x, device, reps, (B, T, H), shape)

    # the recurrence kernels alone (xproj given): what the kernel targets are about
    if ts is None:
        return
    _mornn_recurrence_ops(record, tr, ts, W, xp, h0, bias, device, quick, reps, (B, T, H), shape)


def part_copy(record, device, quick, deadline=None, budget=None):
    import torch

    from matrec.data.tasks import build_task
    from matrec.models.recurrent import RecurrentModel
    from matrec.nn.mornn import MORNN

    delay, hidden, batch, lr = (10, 32, 16, 1e-3) if quick else (1000, 128, 128, 1e-3)
    budget = budget or (5 if quick else CAPS["copy"] - 15)
    if deadline is not None:  # leave time to record the result
        budget = min(budget, deadline - time.monotonic() - 10)
    task = build_task("copy", delay=delay)
    torch.manual_seed(0)
    model = RecurrentModel(MORNN(10, hidden, batch_first=True, nonlinearity="modrelu", init="henaff"),
                           hidden_size=hidden, output_size=task.output_size, vocab_size=task.vocab_size,
                           embed_dim=10).to(device)
    record("copy: setup", delay=delay, length=task.length, hidden=hidden, batch=batch, lr=lr,
           params=sum(p.numel() for p in model.parameters()), baseline_loss=round(task.baseline, 4),
           budget_s=budget)

    def report(step, seconds, loss, recall):
        if step % 100 == 0 or recall >= 0.99:
            record("copy: curve", step=step, seconds=round(seconds, 1), val_loss=round(loss, 5),
                   recall=round(recall, 4))

    last = _load_bench("mornn_copy").train(model, task, 10**9, lr, batch, 25, 0, report, budget_s=budget,
                                           target_recall=0.99)
    record("copy: result", delay=delay, target="recall >= 0.99", reached=last["recall"] >= 0.99,
           steps=last["step"], seconds=round(last["seconds"], 1), final_recall=round(last["recall"], 4))


def part_lm(record, device, quick):
    import types

    import torch
    import torch.nn.functional as F

    from matrec.models import MIXERS

    lm = _load_bench("lm")
    dtype = "bf16" if device.type == "cuda" else "fp32"
    for model in ("mru", "attn", "linear_attn"):
        args = types.SimpleNamespace(device=str(device), model=model, T=16 if quick else 256, batch=None,
                                     tokens=32 if quick else 64 * 256, steps=1 if quick else 10,
                                     warmup=1 if quick else 3, dtype=dtype)
        try:
            r = lm.run_one(args)
        except Exception as err:
            record("lm: preset training step", preset=f"shakespeare-{model}", ms=None, note=_short(err))
            continue
        record("lm: preset training step", preset=f"shakespeare-{model}", batch=r["batch"], T=r["T"],
               dtype=dtype, ms=round(r["ms"], 2), tokens_per_s=round(r["tokens_per_s"]),
               peak_mib=round(r["peak_mib"]), params=r["params"])
    d_model, heads = (32, 2) if quick else (384, 6)
    lengths = (16, 64) if quick else (1024, 4096, 16384, 65536)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for T in lengths:
        x = torch.randn(1, T, d_model, device=device, requires_grad=True)
        q, k, v = (torch.randn(1, heads, T, d_model // heads, device=device, requires_grad=True)
                   for _ in range(3))

        def sdpa():
            with amp:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.float().sum().backward()

        rows = {"causal SDPA (no projections)": sdpa}
        for name in ("mru", "linear_attn", "attn"):
            try:
                mixer = MIXERS.get(name)(d_model, n_heads=heads).to(device)
            except Exception as err:
                record("lm: mixer fwd+bwd", mixer=name, T=T, ms=None, note=_short(err))
                continue

            def run(mixer=mixer):
                with amp:
                    out = mixer(x)[0]
                out.float().sum().backward()

            rows[name] = run
        for name, fn in rows.items():
            try:
                ms = _load_bench("_harness").best_ms(fn, device, 1 if quick else 3)
            except Exception as err:  # out of memory at the longest T, most likely
                record("lm: mixer fwd+bwd", mixer=name, T=T, ms=None, note=_short(err))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            record("lm: mixer fwd+bwd", mixer=name, T=T, batch=1, d_model=d_model, ms=round(ms, 3))


PARTS = {"tests": part_tests, "scan": part_scan, "guard": part_guard, "mornn": part_mornn,
         "copy": part_copy, "lm": part_lm}


# ------------------------------------------------------------------------------------------------
# The driver: one subprocess per part, a cap each, then the report.


def _worker(part: str, records: Path, device: str, quick: bool, cap: float) -> None:
    import inspect

    import torch

    deadline = time.monotonic() + cap
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    fn = PARTS[part]
    extra = {"deadline": deadline} if "deadline" in inspect.signature(fn).parameters else {}
    if part == "copy" and os.environ.get("MATREC_GPU_CHECK_COPY_SECONDS"):
        extra["budget"] = float(os.environ["MATREC_GPU_CHECK_COPY_SECONDS"])
    if fn(Recorder(records, part), dev, quick, **extra) == CUT_SHORT:
        sys.exit(3)


def _run_part(part: str, out: Path, device: str, quick: bool, cap: float, copy_seconds=None) -> dict:
    records = out / f"records-{part}.jsonl"
    records.unlink(missing_ok=True)
    log = out / f"log-{part}.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--records", str(records),
           "--device", device, "--cap", str(cap)] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    if copy_seconds:
        env["MATREC_GPU_CHECK_COPY_SECONDS"] = str(copy_seconds)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
            status = {0: "ok", 3: f"timed out after {cap:.0f} s (stopped itself)"}.get(rc, f"error (exit {rc})")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started (pytest)
            proc.wait()
            status = f"timed out after {cap:.0f} s"
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    tail = log.read_text(errors="replace").strip().splitlines()[-8:]
    print(f"== {part}: {status} in {seconds:.0f} s, {len(rows)} records", flush=True)
    return {"part": part, "status": status, "seconds": round(seconds, 1), "records": rows,
            "log_tail": tail if status != "ok" else []}


def environment(device: str) -> dict:
    import torch

    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "device": device,
           "cuda_runtime": torch.version.cuda, "host_cpus": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    return env


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("|", "/")


def render(report: dict) -> str:
    env = report["environment"]
    lines = [f"# matrec GPU check, {env['date']}", "", "```", report["command"], "```", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in env.items()] + [""]
    lines += ["| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {p['seconds']} |" for p in report["parts"]] + [""]
    for p in report["parts"]:
        lines += [f"## {p['part']}", ""]
        tables: dict[str, list[dict]] = {}
        for r in p["records"]:
            tables.setdefault(r["table"], []).append(r["row"])
        for title, rows in tables.items():
            cols = list(dict.fromkeys(k for row in rows for k in row))
            lines += [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in rows] + [""]
        if not tables:
            lines += ["(no records)", ""]
        if p["log_tail"]:
            lines += ["Last lines of its log:", "", "```"] + p["log_tail"] + ["```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu_check", help="folder for gpu_check.md/.json")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    _load_bench("_harness").add_quick_argument(p, QUICK)
    p.add_argument("--only", nargs="+", choices=list(PARTS), help="run just these parts")
    p.add_argument("--skip", nargs="+", choices=list(PARTS), default=[], help="leave these parts out")
    p.add_argument("--cap-scale", type=float, default=1.0, help="multiply every part's time cap")
    p.add_argument("--copy-seconds", type=float, default=None,
                   help=f"training budget of part copy (default {CAPS['copy'] - 15}); its cap follows")
    p.add_argument("--worker", choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if str(SRC) not in sys.path and SRC.is_dir():
        sys.path.insert(0, str(SRC))
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.worker:
        _worker(a.worker, a.records, device, a.quick, a.cap)
        return 0
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: torch sees no CUDA device here")
    if not a.cap_scale > 0:
        p.error(f"--cap-scale must be > 0, got {a.cap_scale}")
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        p.error(f"--out {a.out}: cannot create the folder ({err.strerror})")
    if a.copy_seconds is not None and not a.copy_seconds > 0:
        p.error(f"--copy-seconds must be > 0, got {a.copy_seconds}")
    parts = [n for n in (a.only or PARTS) if n not in a.skip]
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command.strip(), "environment": environment(device), "parts": []}
    for part in parts:
        cap = (QUICK_CAP if a.quick else CAPS[part]) * a.cap_scale
        if part == "copy" and a.copy_seconds:
            cap = max(cap, a.copy_seconds + 15)
        try:
            report["parts"].append(_run_part(part, out, device, a.quick, cap, a.copy_seconds))
        except Exception:  # the driver itself must not lose the parts already run
            report["parts"].append({"part": part, "status": "driver error", "seconds": 0, "records": [],
                                    "log_tail": traceback.format_exc().splitlines()[-8:]})
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_check.md").write_text(render(report))
    with open(out / "gpu_check.log", "w") as log:  # one log, parts in order, instead of one per part
        for part in parts:
            (out / f"records-{part}.jsonl").unlink(missing_ok=True)
            part_log = out / f"log-{part}.txt"
            if part_log.exists():
                log.write(f"===== {part}\n{part_log.read_text(errors='replace')}\n")
                part_log.unlink()
    print(f"\nreport: {out / 'gpu_check.md'}")
    bad = [p["part"] for p in report["parts"] if p["status"] != "ok"]
    print("parts not ok: " + (", ".join(bad) if bad else "none"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
