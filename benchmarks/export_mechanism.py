"""How to export a recurrence with one graph for every length: the layers' own forward with a dynamic
``T``, a graph traced at a fixed ``T``, or the ``scan`` higher-order op (matrec.export's choice).

    PYTHONPATH=src python benchmarks/export_mechanism.py

For an MRU-LM (width 64, one MRU + one MLP) and a MORNN LM (H = 64): whether ``torch.export`` with a
dynamic ``T`` succeeds, the ONNX file size and export time, the lengths the graph runs at, its
largest error against PyTorch there, and ONNX Runtime's time for a 100-token prompt and for one step
(one thread, median of --repeats).
"""
from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _harness import Table, times_ms_each

from matrec.export import exportable
from matrec.models import build_model

LENGTHS = (1, 7, 100, 300)


class Fixed(torch.nn.Module):
    """The model's own forward from its initial state (what a direct export traces)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def _session(path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(repeats: int) -> Table:
    table = Table({"model": "model", "how": "mechanism", "dynamic": "torch.export, dynamic T",
                   "kib": "ONNX (KiB)", "s": "export (s)", "runs": "runs at T", "err": "max error",
                   "prompt": "100-token prompt (ms)", "step": "one step (ms)"},
                  formats={"kib": "{:.0f}", "s": "{:.1f}", "err": "{:.1e}", "prompt": "{:.2f}", "step": "{:.3f}"})
    tmp = Path(tempfile.mkdtemp(prefix="matrec-mechanism-"))
    g = torch.Generator().manual_seed(0)
    models = {"MRU-LM": build_model("mru", vocab_size=64, output_size=64, d_model=64, n_layers=1, n_heads=1),
              "MORNN LM": build_model("mornn", vocab_size=64, output_size=64, hidden_size=64)}
    for name, model in models.items():
        model.eval()
        xs = {T: torch.randint(0, 64, (1, T), generator=g) for T in LENGTHS}
        with torch.no_grad():
            refs = {T: model(x)[0] for T, x in xs.items()}
        try:
            T = torch.export.Dim("T", min=1, max=4096)
            torch.export.export(Fixed(model), (xs[7],), dynamic_shapes=({1: T},))
            dynamic = "yes"
        except Exception as e:  # the reason, in torch's words (first line)
            dynamic = "refused: " + str(e).strip().splitlines()[0][:90]
        rows = []
        for how in ("traced at T = 100", "scan HOP (matrec.export)"):
            path = tmp / f"{name}-{how[:4]}.onnx"
            t0 = time.perf_counter()
            try:
                if how.startswith("traced"):
                    prog = torch.onnx.export(Fixed(model), (xs[100],), dynamo=True, verbose=False)
                else:
                    form = exportable(model)
                    prog = torch.onnx.export(form, form.example_inputs(), dynamic_shapes=form.dynamic_shapes(4096),
                                             dynamo=True, verbose=False)
                prog.save(str(path))
            except Exception as e:  # the exporter's own reason, where it names the op it cannot translate
                why = re.search(r"No ONNX function found for <?OpOverload\(op='([^']+)'", str(e))
                table.add(model=name, how=how, dynamic=dynamic,
                          runs="ONNX export failed: " + (f"no translation for {why.group(1)}" if why
                                                         else str(e).strip().splitlines()[0][:80]))
                continue
            seconds = time.perf_counter() - t0
            sess = _session(path)
            names = [i.name for i in sess.get_inputs()]

            def feed(T, names=names, how=how):
                if how.startswith("traced"):
                    return {names[0]: xs[T].numpy()}
                state = form.initial_state(1)
                return dict(zip(names, [a.numpy() for a in (xs[T], torch.ones(1, T, dtype=torch.bool), *state)]))

            runs, err = [], 0.0
            for T in LENGTHS:
                try:
                    out = torch.from_numpy(sess.run(None, feed(T))[0])
                    runs.append(str(T))
                    err = max(err, (out - refs[T]).abs().max().item())
                except Exception:
                    pass
            fns = {}
            for T, key in ((100, "prompt"), (1, "step")):
                if str(T) in runs:
                    f = feed(T)
                    fns[key] = lambda s=sess, f=f: s.run(None, f)
            times = {k: statistics.median(v) for k, v in times_ms_each(fns, "cpu", repeats, warmup=2).items()}
            rows.append(table.add(model=name, how=how, dynamic=dynamic, kib=path.stat().st_size / 1024, s=seconds,
                                  runs=", ".join(runs), err=err, **times))
    return table


def main(argv=None) -> Table:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = measure(args.repeats)
    print(f"cpu, 1 thread; torch {torch.__version__}; ONNX Runtime CPU; medians of {args.repeats}\n")
    table.print()
    return table


if __name__ == "__main__":
    main()
