"""Per-token decode latency against context length, batch 1, one thread: eager PyTorch,
torch.compile, ONNX Runtime and ExecuTorch (XNNPACK), for MORNN and nn.RNN, an MRU-LM, a linear
attention LM and a softmax-attention LM with a KV cache (docs/deploy.md).

    PYTHONPATH=src python benchmarks/inference.py --threads 1

Each cell is the median over --repeats timed calls of one token from the state at that context
length (the state is not carried between timed calls, so every call sees the same context); each
round times every cell once, in a random order. The
recurrent models' state comes from running a random prompt of that length; the attention LM's
cache is filled with random keys and values (its cost does not depend on their values). Runtimes
run the ``mode="step"`` export of each model (matrec.export); torch.compile compiles the same form.
nn.RNN is also exported through its own forward at T = 1 ("native export", no matrec form): the
reference for the exported MORNN step.
State memory is the bytes of the state tensors at the longest context; file sizes are those of
the exported step graphs.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _harness import Table, add_json_argument, add_quick_argument, write_json

from matrec.export import (ExecuTorchRunner, OnnxRunner, delegation, export, export_state, exportable,
                           lower_program)
from matrec.models import build_model
from matrec.nn.attention import CausalSelfAttention

QUICK = "one tiny MORNN, contexts 8 and 32, 3 calls per cell"
VOCAB = 256
RUNTIMES = ("eager", "torch.compile", "onnxruntime", "executorch")


def models(quick: bool) -> dict[str, callable]:
    """name -> builder of the model (eval mode). LMs: width 128, 2 x (mixer + MLP), 4 heads."""
    if quick:
        return {"MORNN H=8": lambda: build_model("mornn", vocab_size=16, output_size=16, hidden_size=8)}
    out = {}
    for H in (64, 256):
        out[f"MORNN modReLU H={H}"] = lambda H=H: build_model("mornn", vocab_size=VOCAB, output_size=VOCAB,
                                                             hidden_size=H)
        out[f"MORNN tanh H={H}"] = lambda H=H: build_model("mornn", vocab_size=VOCAB, output_size=VOCAB,
                                                          hidden_size=H, nonlinearity="tanh")
        out[f"nn.RNN tanh H={H}"] = lambda H=H: build_model("rnn", vocab_size=VOCAB, output_size=VOCAB,
                                                           hidden_size=H)
    for label, mixer in (("MRU-LM", "mru"), ("linear-attention LM", "linear_attn"), ("attention LM", "attn")):
        out[label] = lambda mixer=mixer: build_model(mixer, vocab_size=VOCAB, output_size=VOCAB, d_model=128,
                                                     n_layers=2, n_heads=4)
    return out


def state_at(model, L: int):
    """The model's own state after ``L`` tokens (random prompt; random cache for attention)."""
    g = torch.Generator().manual_seed(L)
    layers = getattr(model, "layers", None)
    if layers is not None and any(isinstance(layer.mixer, CausalSelfAttention) for layer in layers):
        state = []
        for layer in layers:
            a = layer.mixer
            if isinstance(a, CausalSelfAttention):
                k, v = (torch.randn(1, a.n_heads, L, a.head_dim, generator=g) for _ in range(2))
                state.append((k, v, torch.tensor(L)))
            else:
                state.append(None)
        return state
    with torch.no_grad():
        return model(torch.randint(0, model.vocab_size, (1, L), generator=g))[1]


class _Step(torch.nn.Module):
    """A RecurrentModel's own forward ``(x, h) -> (out, h)``: what exporting nn.RNN directly gives."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, h):
        return self.model(x, h)


def native_rnn(model, x, h, tmp: Path, slug: str, runtimes) -> dict:
    """runtime -> (run(args), file bytes, delegation or None) for nn.RNN exported through its own
    forward at T = 1 (no matrec form): the reference for the exported MORNN step."""
    out = {}
    step = _Step(model).eval()
    if "onnxruntime" in runtimes:
        path = tmp / f"{slug}-native.onnx"
        torch.onnx.export(step, (x, h), dynamo=True, verbose=False).save(str(path))
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        out["onnxruntime"] = (lambda args, s=session, n=names: s.run(None, {k: a.numpy() for k, a in zip(n, args)}),
                              path.stat().st_size, None)
    if "executorch" in runtimes:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime
        path = tmp / f"{slug}-native.pte"
        program = lower_program(torch.export.export(step, (x, h)))
        path.write_bytes(program.buffer)
        _unsafe_reset_threadpool(1)
        method = Runtime.get().load_program(str(path)).load_method("forward")
        out["executorch"] = (method.execute, path.stat().st_size, delegation(program))
    return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(quick: bool, contexts: list[int], repeats: int, runtimes=RUNTIMES, out_dir=None) -> dict:
    """{"latency": {(model, runtime, L): us per token}, "state_bytes": {(model, L): bytes},
    "file_bytes": {(model, runtime): bytes}, "delegation": {model: ...}, "skipped": {(model, runtime): why}}."""
    have = {"onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
            "executorch": importlib.util.find_spec("executorch") is not None}
    result = {"latency": {}, "state_bytes": {}, "file_bytes": {}, "delegation": {}, "skipped": {},
              "compile_s": {}}
    fns = {}
    if out_dir is None:  # the exported files live as long as this call
        with tempfile.TemporaryDirectory(prefix="matrec-inference-") as d:
            return measure(quick, contexts, repeats, runtimes, d)
    tmp = Path(out_dir)
    for name, build in models(quick).items():
        torch.manual_seed(0)
        model = build().eval()
        form = exportable(model, "step")
        slug = name.replace(" ", "_").replace("=", "")
        runners = {}
        for runtime in runtimes:
            if runtime in have and not have[runtime]:
                result["skipped"][name, runtime] = f"{runtime} not installed (the export extra)"
            elif runtime in ("onnxruntime", "executorch"):
                fmt = "onnx" if runtime == "onnxruntime" else "executorch"
                path = tmp / f"{slug}.{'onnx' if fmt == 'onnx' else 'pte'}"
                meta = export(form, path, fmt, max_length=max(contexts) + 8)
                result["file_bytes"][name, runtime] = path.stat().st_size
                if fmt == "executorch":
                    result["delegation"][name] = meta["delegation"]
                    runners[runtime] = ExecuTorchRunner(path, threads=1).method.execute
                else:
                    session = OnnxRunner(path, threads=1).session
                    names = [i.name for i in session.get_inputs()]
                    runners[runtime] = lambda args, s=session, n=names: s.run(
                        None, {k: a.numpy() for k, a in zip(n, args)})
        x = torch.randint(0, model.vocab_size, (1, 1))
        mask = torch.ones(1, 1, dtype=torch.bool)
        compiled = torch.compile(form) if "torch.compile" in runtimes else None
        native = (native_rnn(model, x, torch.zeros(1, 1, model.rnn.hidden_size), tmp, slug,
                             [r for r in ("onnxruntime", "executorch") if r in runtimes and have[r]])
                  if type(getattr(model, "rnn", None)) is torch.nn.RNN else {})
        for runtime, (_, size, deleg) in native.items():
            result["file_bytes"][f"{name} (native export)", runtime] = size
            if deleg is not None:
                result["delegation"][f"{name} (native export)"] = deleg
        for L in contexts:
            own = state_at(model, L)
            for runtime, (run, _, _) in native.items():
                result["state_bytes"][f"{name} (native export)", L] = _nbytes([own])
                fns[f"{name} (native export)", runtime, L] = lambda r=run, args=[x, own]: r(args)
            flat = [t.contiguous() for t in export_state(form, own)]
            result["state_bytes"][name, L] = _nbytes(flat)
            args = [x, mask, *flat]
            for runtime in runtimes:
                if runtime == "eager":
                    fns[name, runtime, L] = lambda model=model, x=x, own=own: model(x, own)
                elif runtime == "torch.compile":
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        compiled(*args)  # compiles (again for a new cache length)
                    result["compile_s"][name, L] = time.perf_counter() - t0
                    fns[name, runtime, L] = lambda c=compiled, args=args: c(*args)
                elif runtime in runners:
                    fns[name, runtime, L] = lambda r=runners[runtime], args=args: r(args)
    # The single-RNN models and the LMs are timed as two groups, each cell once per round in a fresh
    # random order: load bursts on the shared machine hit every cell alike, and the caches a 16k-token
    # attention step evicts do not always land on the same next cell (a fixed order measured the
    # first cell of each round up to 2.8x slow).
    rng = random.Random(0)
    for group in (lambda k: "LM" not in k[0], lambda k: "LM" in k[0]):
        cells = [k for k in fns if group(k)]
        times = {k: [] for k in cells}
        with torch.no_grad():
            for r in range(3 + repeats):
                rng.shuffle(cells)
                for k in cells:
                    t0 = time.perf_counter()
                    fns[k]()
                    if r >= 3:
                        times[k].append(time.perf_counter() - t0)
        for k, t in times.items():
            result["latency"][k] = statistics.median(t) * 1e6
    return result


def _fmt_ctx(L: int) -> str:
    return f"{L // 1024}k" if L >= 1024 and L % 1024 == 0 else str(L)


def tables(result: dict, contexts: list[int]) -> list[Table]:
    lat = result["latency"]
    cols = {"model": "model", "runtime": "runtime"}
    cols.update({f"c{L}": f"{_fmt_ctx(L)} (us)" for L in contexts})
    cols.update({"flat": f"{_fmt_ctx(contexts[-1])} / {_fmt_ctx(contexts[0])}", "state": "state @ longest (KiB)"})
    t1 = Table(cols, title="Per-token latency (median, batch 1, one thread)",
               formats={**{f"c{L}": "{:.1f}" for L in contexts}, "flat": "{:.2f}x", "state": "{:.2f}"})
    names = list(dict.fromkeys(k[0] for k in lat))
    for name in names:
        for runtime in RUNTIMES:
            if (name, runtime, contexts[0]) not in lat:
                continue
            row = {"model": name, "runtime": runtime,
                   "flat": lat[name, runtime, contexts[-1]] / lat[name, runtime, contexts[0]],
                   "state": result["state_bytes"][name, contexts[-1]] / 1024}
            row.update({f"c{L}": lat[name, runtime, L] for L in contexts})
            t1.add(**row)
    t2 = Table({"model": "model", "onnx": "ONNX file (KiB)", "pte": "ExecuTorch file (KiB)",
                "calls": "XNNPACK delegate calls per step", "portable": "ops left to portable kernels"},
               title="Exported step graphs", formats={"onnx": "{:.0f}", "pte": "{:.0f}"})
    for name in names:
        d = result["delegation"].get(name)
        t2.add(model=name, onnx=(result["file_bytes"].get((name, "onnxruntime")) or 0) / 1024 or None,
               pte=(result["file_bytes"].get((name, "executorch")) or 0) / 1024 or None,
               calls=None if d is None else d["delegate_calls"],
               portable=None if d is None else sum(d["portable_ops"].values()))
    return [t1, t2]


def targets(result: dict, contexts: list[int]) -> list[str]:
    """The three claims of docs/deploy.md, each with its numbers and whether it holds."""
    lat, lines = result["latency"], []
    lo, hi = contexts[0], contexts[-1]
    names = list(dict.fromkeys(k[0] for k in lat))
    for runtime in RUNTIMES:
        rec = [(n, lat[n, runtime, hi] / lat[n, runtime, lo]) for n in names
               if "attention LM" != n and (n, runtime, lo) in lat]
        if rec:
            worst = max(rec, key=lambda r: abs(r[1] - 1))
            lines.append(f"recurrent flat within 10% ({runtime}): worst {worst[0]} {worst[1]:.2f}x -> "
                         f"{'holds' if all(abs(r - 1) <= 0.10 for _, r in rec) else 'does not hold'}")
        if ("MRU-LM", runtime, hi) in lat and ("attention LM", runtime, hi) in lat:
            s = lat["attention LM", runtime, hi] / lat["MRU-LM", runtime, hi]
            lines.append(f"MRU-LM vs attention LM at {_fmt_ctx(hi)} ({runtime}): {s:.1f}x faster -> "
                         f"{'holds' if s >= 10 else 'does not hold'} (target 10x)")
        for H in (64, 256):
            for ref in (f"nn.RNN tanh H={H}", f"nn.RNN tanh H={H} (native export)"):
                a, b = (f"MORNN tanh H={H}", runtime, hi), (ref, runtime, hi)
                if a in lat and b in lat and runtime in ("onnxruntime", "executorch"):
                    for m in ("tanh", "modReLU"):
                        r = lat[f"MORNN {m} H={H}", runtime, hi] / lat[b]
                        lines.append(f"exported MORNN {m} H={H} / {ref} ({runtime}): {r:.2f}x -> "
                                     f"{'holds' if r <= 1.2 else 'does not hold'} (target 1.2x)")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="256,1024,4096,16384", help="comma-separated context lengths")
    ap.add_argument("--repeats", type=int, default=100, help="timed calls per cell (the median is reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile (it compiles "
                    "each model once, and the attention LM once per context length)")
    add_quick_argument(ap, QUICK)
    add_json_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [8, 32] if args.quick else [int(c) for c in args.contexts.split(",")]
    repeats = 3 if args.quick else args.repeats
    runtimes = tuple(r for r in RUNTIMES if not (args.no_compile and r == "torch.compile"))
    result = measure(args.quick, contexts, repeats, runtimes)
    print(f"cpu, {args.threads} thread(s); torch {torch.__version__}; batch 1; us per token, median of "
          f"{repeats} calls\n")
    out = tables(result, contexts)
    for t in out:
        t.print()
    for line in targets(result, contexts):
        print("-", line)
    for (name, runtime), why in result["skipped"].items():
        print(f"- skipped {runtime} for {name}: {why}")
    if result["compile_s"]:
        print(f"- torch.compile time per compile: {min(result['compile_s'].values()):.0f}-"
              f"{max(result['compile_s'].values()):.0f} s")
    for name, d in result["delegation"].items():
        print(f"- {name}: portable ops {d['portable_ops']}")
    write_json(args.json, out, threads=args.threads, torch=torch.__version__)
    return result


if __name__ == "__main__":
    main()
