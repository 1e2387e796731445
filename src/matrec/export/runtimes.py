"""Write an :class:`~matrec.export.forms.ExportForm` as an ONNX model or an ExecuTorch program, and
run either from Python with the same calling convention as the form itself.

Both need the ``export`` extra (onnx, onnxscript, onnxruntime, executorch); nothing here is imported
by ``import matrec``. Each written model gets a sidecar ``<path>.json`` with the input/output names
and the state layout (:meth:`ExportForm.state_spec`), which is all a runtime needs to stream, and,
given the run's vocabulary, ``tokenizer.json`` beside it (a ``tokenizers`` file, named in the
sidecar) to turn text into ids and back.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import Tensor

from .forms import ExportForm, initial_tensor

FORMATS = ("onnx", "executorch")
# what each format imports; the extra that provides them is named in the error
_NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "executorch": ("executorch",)}


def check_format(fmt: str) -> None:
    """``fmt`` is a known format whose packages are installed, else ValueError / ImportError."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    missing = [m for m in _NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"exporting to {fmt} needs the export extra (missing: {', '.join(missing)}): "
                          f"pip install 'matrec[export]'")


# the traced example is 8 tokens long (a length-1 example would fix T at 1); positions past 2**24
# are no longer exact in float32, which the attention's position encodings compute in
MIN_LENGTH, MAX_LENGTH = 8, 2 ** 24
# ExecuTorch plans every buffer for the bounds, in the program itself: past this it is no edge program
EXECUTORCH_PLAN_LIMIT = 2 ** 32


def planned_bytes(form: ExportForm, max_length: int, batch_size: int = 1) -> int:
    """A lower bound on the memory ExecuTorch plans for ``form`` at ``max_length``: the tokens in
    and the outputs at ``T = max_length`` (sequence mode), the attention caches at ``max_length + 1``
    slots in and out, and one head's attention scores ``T x (max_length + 1)`` in float32."""
    length = MIN_LENGTH if form.mode == "sequence" else 1
    args = form.example_inputs(batch_size, length)
    with torch.no_grad():
        out = form(*args)
    T = max_length if form.mode == "sequence" else 1
    per_token = sum(t.numel() * t.element_size() for t in (args[0], args[1], out[0])) // length
    caches = [s for spec, s in zip(form.state_spec(batch_size), args[2:]) if "grows" in spec]
    per_slot = sum(s.numel() * s.element_size() for s in caches) // 2   # the example has two slots
    scores = 4 * batch_size * T * (max_length + 1) if caches else 0
    return per_token * T + 2 * per_slot * (max_length + 1) + scores


def check_max_length(form: ExportForm, fmt: str, max_length, argument: str = "max_length") -> int:
    """``max_length`` if ``form`` can be exported to ``fmt`` with that bound, else a ValueError naming
    ``argument``: an int in [8, 2**24], and for ExecuTorch one whose planned memory stays under 4 GiB."""
    from ..checks import check_int
    max_length = check_int(argument, max_length, MIN_LENGTH, maximum=MAX_LENGTH)
    if fmt == "executorch":
        need = planned_bytes(form, max_length)
        if need > EXECUTORCH_PLAN_LIMIT:
            raise ValueError(f"{argument} {max_length:,} makes ExecuTorch plan at least {need / 2 ** 30:,.1f} "
                             f"GiB for this model (inputs, outputs, attention cache and scores sized for "
                             f"{max_length:,} tokens; the limit is {EXECUTORCH_PLAN_LIMIT / 2 ** 30:.0f} GiB); "
                             f"lower it")
    return max_length


def io_names(form: ExportForm) -> tuple[list[str], list[str]]:
    """Input names ``x, mask, state.<name>...`` and output names ``out, new_state.<name>...``."""
    return (["x", "mask"] + [f"state.{n}" for n in form.state_names],
            ["out"] + [f"new_state.{n}" for n in form.state_names])


TOKENIZER_FILE = "tokenizer.json"


def _sidecar(form: ExportForm, path: Path, fmt: str, batch_size: int, max_length: int, extra=None,
             tokenizer_json: str | None = None) -> dict:
    inputs, outputs = io_names(form)
    # a step graph takes exactly one token per call; max_length still bounds attention caches
    T = "T" if form.mode == "sequence" else 1
    meta = {"format": fmt, "mode": form.mode, "batch_size": batch_size, "max_length": max_length,
            "x": ({"dtype": "int64", "shape": [batch_size, T], "vocab_size": form.vocab_size}
                  if form.vocab_size is not None else
                  {"dtype": "float32", "shape": [batch_size, T, form.input_size]}),
            "inputs": inputs, "outputs": outputs, "state": form.state_spec(batch_size), **(extra or {})}
    if tokenizer_json is not None:
        target = path.parent / TOKENIZER_FILE
        if not target.exists():   # checked by _check_out: absent, or this very vocabulary
            target.write_text(tokenizer_json)
        meta["tokenizer"] = TOKENIZER_FILE
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _check_out(path, tokenizer_json: str | None = None) -> Path:
    path = Path(path)
    for p in (path, Path(str(path) + ".json")):
        if p.exists():
            raise FileExistsError(f"out path {str(p)!r} exists; choose another (nothing is overwritten)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"out path's folder {str(path.parent)!r} does not exist")
    tok = path.parent / TOKENIZER_FILE
    # graphs of one run share its tokenizer file; another vocabulary's is never replaced
    if tokenizer_json is not None and tok.exists() and tok.read_text() != tokenizer_json:
        raise FileExistsError(f"{str(tok)!r} exists and holds another vocabulary; export into another "
                              f"folder (nothing is overwritten)")
    return path


def export_onnx(form: ExportForm, path, *, batch_size: int = 1, example_length: int = 8,
                max_length: int = 4096, tokenizer_json: str | None = None) -> dict:
    """Write ``form`` to ``path`` through ``torch.onnx.export(dynamo=True)``; returns the sidecar
    metadata. ``T`` (sequence mode) and attention caches are dynamic axes. ``tokenizer_json`` (a
    ``tokenizers`` JSON, e.g. a task's ``tokenizer_json()``) is written as ``tokenizer.json`` beside
    ``path`` and named in the sidecar."""
    check_format("onnx")
    path = _check_out(path, tokenizer_json)
    inputs, outputs = io_names(form)
    args = form.example_inputs(batch_size, example_length if form.mode == "sequence" else 1)
    program = torch.onnx.export(form, args, dynamic_shapes=form.dynamic_shapes(max_length), dynamo=True,
                                input_names=inputs, output_names=outputs, verbose=False)
    program.save(str(path))
    return _sidecar(form, path, "onnx", batch_size, max_length, tokenizer_json=tokenizer_json)


def lower_executorch(form: ExportForm, *, batch_size: int = 1, example_length: int = 8,
                     max_length: int = 4096):
    """``form`` exported and lowered with the XNNPACK partitioner: an ExecuTorch program manager."""
    check_format("executorch")
    args = form.example_inputs(batch_size, example_length if form.mode == "sequence" else 1)
    return lower_program(torch.export.export(form, args, dynamic_shapes=form.dynamic_shapes(max_length)))


def lower_program(exported_program):
    """Any ``torch.export`` program lowered with the XNNPACK partitioner (an ExecuTorch program manager)."""
    check_format("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    return to_edge_transform_and_lower(exported_program, partitioner=[XnnpackPartitioner()]).to_executorch()


def delegation(program) -> dict:
    """XNNPACK delegate calls per forward (those inside a scan body count once per step) and the
    operators left to ExecuTorch's portable kernels, from a lowered program."""
    calls, per_step, portable = 0, 0, {}

    def walk(gm, in_loop):
        nonlocal calls, per_step
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = str(getattr(node.target, "__name__", node.target))
            if "executorch_call_delegate" in name:
                if in_loop:
                    per_step += 1
                else:
                    calls += 1
            elif "scan" in name or "cond" in name or "while_loop" in name:
                for arg in node.args:
                    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                        walk(getattr(gm, arg.target), True)
            elif not any(k in name for k in ("getitem", "sym_", "alloc", "executorch_prim")):
                key = name.replace("aten::", "").split(".")[0]
                portable[key] = portable.get(key, 0) + 1

    walk(program.exported_program().graph_module, False)
    return {"delegate_calls": calls, "delegate_calls_per_scan_step": per_step, "portable_ops": portable}


def export_executorch(form: ExportForm, path, *, batch_size: int = 1, example_length: int = 8,
                      max_length: int = 4096, tokenizer_json: str | None = None) -> dict:
    """Write ``form`` to ``path`` (a ``.pte`` program, XNNPACK-delegated where the ops allow);
    returns the sidecar metadata, which includes :func:`delegation`. ExecuTorch plans memory for
    the upper bounds, so ``max_length`` bounds ``T`` and the attention cache. ``tokenizer_json``: as
    :func:`export_onnx`."""
    path = _check_out(path, tokenizer_json)
    program = lower_executorch(form, batch_size=batch_size, example_length=example_length,
                               max_length=max_length)
    path.write_bytes(program.buffer)
    return _sidecar(form, path, "executorch", batch_size, max_length, {"delegation": delegation(program)},
                    tokenizer_json=tokenizer_json)


def export(form: ExportForm, path, fmt: str, **kwargs) -> dict:
    """:func:`export_onnx` or :func:`export_executorch` by ``fmt``."""
    check_format(fmt)
    return (export_onnx if fmt == "onnx" else export_executorch)(form, path, **kwargs)


class Runner:
    """An exported model loaded for inference: ``out, state = runner(x, mask, state)`` with torch
    tensors in and out, ``state`` a list (:meth:`initial_state` starts it)."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.meta = json.loads(Path(str(path) + ".json").read_text())

    def initial_state(self) -> list[Tensor]:
        return [initial_tensor(s) for s in self.meta["state"]]

    def __call__(self, x: Tensor, mask: Tensor | None = None, state: list[Tensor] | None = None):
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
        outs = self._run([x, mask, *(self.initial_state() if state is None else state)])
        return outs[0], list(outs[1:])


class OnnxRunner(Runner):
    """ONNX Runtime, CPU provider, ``threads`` intra-op threads (0: its default)."""

    def __init__(self, path, threads: int = 0) -> None:
        super().__init__(path)
        check_format("onnx")
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = threads or opts.inter_op_num_threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _run(self, args):
        feed = {name: a.numpy() for name, a in zip(self.inputs, args)}
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]


class ExecuTorchRunner(Runner):
    """The ExecuTorch Python runtime (``executorch.runtime``) on a ``.pte`` program; ``threads`` > 0
    resizes the process-wide XNNPACK thread pool (its default is one thread per core)."""

    def __init__(self, path, threads: int = 0) -> None:
        super().__init__(path)
        check_format("executorch")
        from executorch.runtime import Runtime
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
            _unsafe_reset_threadpool(threads)
        self.method = Runtime.get().load_program(str(path)).load_method("forward")

    def _run(self, args):
        return [o.clone() for o in self.method.execute([a.contiguous() for a in args])]


def load(path, threads: int = 0) -> Runner:
    """The runner for an exported model, by the format its sidecar names."""
    fmt = json.loads(Path(str(path) + ".json").read_text())["format"]
    return OnnxRunner(path, threads) if fmt == "onnx" else ExecuTorchRunner(path, threads)
