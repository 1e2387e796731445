"""The ``matrec`` command: train, eval, sample, compare, bench.

``matrec train`` with no arguments runs the embedded default experiment (MORNN vs LSTM on the copy
task); every other use is ``matrec <command> --help``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .checks import check_int
from .bench import add_parser as _add_bench, declares_quick, find_benchmarks  # noqa: F401 (importable here)
from .experiment.cli import add_parser as add_experiment_parser

if TYPE_CHECKING:
    from .train.config import TrainConfig

# The default experiment (``matrec train`` with no arguments, the README's ``make demo``): the copy
# task with a delay long enough that a model must carry 10 symbols through many steps, MORNN with its
# recipe (RMSprop, orthogonal weights at 1/10 lr, clipping, modReLU, Henaff init) against an LSTM
# of the usual setup on the same batches and the same number of steps.
DEFAULT_BASE = dict(task="copy", task_args={"delay": 300}, steps=400, batch_size=32, eval_every=25,
                    eval_batches=4, log_every=10, ckpt_every=100, warmup_steps=0, threads=1)
DEFAULT_VARIANTS = [
    {"label": "mornn", "model": "mornn",
     "model_args": {"hidden_size": 128, "nonlinearity": "modrelu", "init": "henaff"},
     "optimizer": "rmsprop", "lr": 1e-3, "orthogonal_lr_scale": 0.1, "grad_clip": 1.0},
    {"label": "lstm", "model": "lstm", "model_args": {"hidden_size": 128},
     "optimizer": "rmsprop", "lr": 1e-3, "grad_clip": 1.0},
]

# what each TrainConfig field does; the defaults are appended from the dataclass (_with_default)
HELP = {
    "task": "task name",
    "task_args": "task option KEY=VALUE, repeatable (e.g. --task-arg delay=100); values are JSON, "
                 "else converted to the option's type (periods=50,400 is a list)",
    "model": "model name",
    "model_args": "model option KEY=VALUE, repeatable (e.g. --model-arg num_layers=2); values are JSON",
    "steps": "optimiser steps in total",
    "batch_size": "global batch size, split across torchrun processes",
    "optimizer": "optimiser",
    "lr": "peak learning rate",
    "weight_decay": "weight decay",
    "orthogonal_lr_scale": "MORNN's orthogonal parameters train at lr times this",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "the cosine ends at lr times this",
    "grad_clip": "clip the global gradient norm to this; 0 turns clipping off",
    "eval_every": "evaluate every N steps and at the end",
    "eval_batches": "validation batches per evaluation",
    "log_every": "log training metrics every N steps",
    "ckpt_every": "checkpoint every N steps and at the end",
    "seed": "random seed for initialisation and data",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "amp": "bf16 autocast on CUDA; CPU always runs fp32",
    "compile": "torch.compile the model",
    "threads": "CPU threads for torch; 0 keeps torch's default",
    "out_dir": "parent folder of run directories",
    "run_name": "run directory name (unset: <task>-<model>-<timestamp>)",
    "tensorboard": "write TensorBoard events to <run>/tb",
    "plot": "write <run>/plot.png at the end",
    "progress": "show a progress bar",
}


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value   # a bare string such as a path


def _with_default(text: str, f: dataclasses.Field) -> str:
    """``text`` plus the field's default as TrainConfig defines it (fields without a plain default,
    such as dicts or None, say in ``text`` what happens)."""
    default = f.default
    if default is dataclasses.MISSING or default is None:
        return text
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return f"{text} (default {shown})"


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (defaults None: only what the user gives overrides)."""
    from .data.tasks import TASKS
    from .models import MODELS
    from .train.optim import OPTIMIZERS
    names = {"task": TASKS.names(), "model": MODELS.names(), "optimizer": OPTIMIZERS.names()}
    p.add_argument("--config", metavar="FILE", help="JSON file of TrainConfig fields; options given "
                   "on the command line override it")
    p.add_argument("--hidden-size", type=int, metavar="N", help="shortcut for --model-arg hidden_size=N")
    p.add_argument("--num-layers", type=int, metavar="N", help="shortcut for --model-arg num_layers=N")
    for f in dataclasses.fields(TrainConfigRef()):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("task_args", "model_args"):
            p.add_argument("--" + f.name[:-1].replace("_", "-"), dest=f.name, action="append",
                           type=_key_value, metavar="KEY=VALUE", help=HELP[f.name])
        elif f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=_with_default(HELP[f.name], f))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            text = _with_default(HELP[f.name], f) + (f"; one of {', '.join(names[f.name])}"
                                                     if f.name in names else "")
            p.add_argument(flag, dest=f.name, type=kind, metavar=f.name.upper().split("_")[-1],
                           help=text)


def TrainConfigRef():
    from .train.config import TrainConfig
    return TrainConfig


def _config_from_args(args) -> "TrainConfig":
    TrainConfig = TrainConfigRef()
    data = TrainConfig.from_json(args.config).to_dict() if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in ("task_args", "model_args"):
            data[f.name] = {**data.get(f.name, {}), **dict(value)}
        else:
            data[f.name] = value
    for flag in ("hidden_size", "num_layers"):
        if getattr(args, flag, None) is not None:
            data.setdefault("model_args", {})[flag] = getattr(args, flag)
    # a --task-arg value that is not JSON (periods=50,400 or echo=.5) takes the type of the
    # option's default, so the task gets a tuple or a float rather than the raw string
    texts = {k: v for k, v in dict(args.task_args or []).items() if isinstance(v, str)}
    if texts:
        from .data.tasks import parse_task_options
        data["task_args"].update(parse_task_options(data.get("task", TrainConfig.task), texts))
    return TrainConfig.from_dict(data)


# ------------------------------------------------------------------------------------ commands


def cmd_train(args) -> int:
    from .train import Trainer
    if args.resume:
        # progress only changes the display, not the run
        given = [f.name for f in dataclasses.fields(TrainConfigRef())
                 if f.name not in ("steps", "progress") and getattr(args, f.name, None) is not None]
        given += [n for n in ("config", "hidden_size", "num_layers") if getattr(args, n, None) is not None]
        if given:
            raise ValueError(f"--resume continues the run with its saved config; only --steps and "
                             f"--[no-]progress may be given with it, got "
                             f"{['--' + g.replace('_', '-') for g in given]}")
        trainer = Trainer.resume(args.resume, steps=args.steps)
        if args.progress is not None:
            trainer.cfg.progress = args.progress
    else:
        trainer = Trainer(_config_from_args(args))
    summary = trainer.train()
    if trainer.dist.is_main:
        print(json.dumps({k: summary[k] for k in ("status", "step", "eval", "train_seconds", "run_dir")}))
    return 0


def cmd_import_hf(args) -> int:
    # the model and its arguments are the directory's: a flag that would change them is refused
    model_flags = [flag for flag, dest in (("--model", "model"), ("--model-arg", "model_args"),
                                           ("--hidden-size", "hidden_size"), ("--num-layers", "num_layers"))
                   if getattr(args, dest, None) is not None]
    if model_flags:
        raise ValueError(f"the model and its arguments come from HF_DIR's config.json; drop {model_flags}")
    if not (Path(args.hf_dir) / "config.json").is_file():
        raise FileNotFoundError(f"HF_DIR {args.hf_dir!r} has no config.json: not a transformers directory "
                                f"(matrec export-hf writes one)")
    config = {k: v for k, v in _config_from_args(args).to_dict().items() if k not in ("model", "model_args")}
    from .quiet import known_noise
    with known_noise():   # importing transformers brings torchao's known log lines with it
        export = __import__("matrec.hf.export", fromlist=["workbench_run_from_hf"])  # transformers: only here
    with export.quiet_cli():
        run = export.workbench_run_from_hf(args.hf_dir, args.run_dir, **config)
    # --steps given: the run already has its length; else say how to set it
    print(f"wrote {run} (step 0: the weights of {args.hf_dir}); train it with: "
          f"matrec train --resume {run}{'' if args.steps is not None else ' --steps N'}")
    return 0


def cmd_export_hf(args) -> int:
    from .train.rundir import check_new_output
    check_new_output(args.out_dir, "OUT_DIR")   # before transformers' import: a refusal is instant
    from .quiet import known_noise
    with known_noise():   # importing transformers brings torchao's known log lines with it
        export = __import__("matrec.hf.export", fromlist=["cmd_export_hf"])
    return export.cmd_export_hf(args)


def _single_process() -> bool:
    """Not under torchrun (whose ranks must compute the same folder name, not each make one)."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1


def _is_main() -> bool:
    """Rank 0 under torchrun (after the trainer joined the process group), else True."""
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def default_experiment(out_dir: str = "runs", steps: int | None = None) -> int:
    """``matrec train`` with no arguments: MORNN vs LSTM on the copy task, table + plot."""
    from .train import TrainConfig
    from .train.compare import format_table, run_compare

    variants = [dict(v) for v in DEFAULT_VARIANTS]
    base = TrainConfig.from_dict({**DEFAULT_BASE, **({"steps": steps} if steps else {})})
    from .train.rundir import fresh_name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = fresh_name(out_dir, f"default-{stamp}", create=_single_process())   # same second: -2
    print(f"matrec default experiment: {' vs '.join(v['label'] for v in variants)} on copy "
          f"(delay {base.task_args['delay']}), {base.steps} steps of batch {base.batch_size} "
          f"-> {out}", flush=True)
    t0 = time.perf_counter()
    results = run_compare(base, variants, out)
    if not _is_main():
        return 0
    print(format_table(results))
    print(f"plot: {out / 'compare.png'}   table: {out / 'results.md'}   "
          f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_compare(args) -> int:
    from .train.compare import format_table, run_compare
    base = _config_from_args(args)
    models = [m for m in args.models.split(",") if m]
    if not models:
        raise ValueError("--models must name at least one model, e.g. --models lstm,gru")
    from .models import MODELS
    for m in models:   # a typo in the last name must not surface after the others have trained
        MODELS.get(m)
    from .train.rundir import fresh_name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (Path(args.out) if args.out else
           fresh_name(base.out_dir, f"compare-{base.task}-{stamp}", create=_single_process()))
    results = run_compare(base, [{"model": m} for m in models], out)
    if not _is_main():
        return 0
    print(format_table(results))
    print(f"plot: {out / 'compare.png'}   results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def _load_for_inference(path):
    """Config, task (its stored vocabulary where the checkpoint keeps one), model and meta."""
    from .train.checkpoint import load_for_inference
    return load_for_inference(path, vocabulary_only=True)


def cmd_export(args) -> int:
    from .export import export, exportable
    from .export.runtimes import MAX_LENGTH, MIN_LENGTH, check_format, check_max_length
    check_int("--max-length", args.max_length, MIN_LENGTH, maximum=MAX_LENGTH)   # before any loading
    check_format(args.format)   # the extra before any work
    root = Path(args.run_dir)   # the default file goes to the run's top folder, not into checkpoints/
    root = root.parent.parent if root.name.startswith("step-") else root.parent if root.name == "checkpoints" else root
    out = Path(args.out) if args.out else root / f"model-{args.mode}.{'onnx' if args.format == 'onnx' else 'pte'}"
    for p in (out, Path(str(out) + ".json")):
        if p.exists():
            raise ValueError(f"--out {str(p)!r} exists; nothing was overwritten (choose another path)")
    cfg, task, model, meta = _load_for_inference(args.run_dir)
    try:
        form = exportable(model, args.mode)
    except ValueError as e:
        raise ValueError(f"RUN_DIR {args.run_dir!r} (model {cfg.model!r}): {e}") from None
    check_max_length(form, args.format, args.max_length, "--max-length")
    # the run's vocabulary travels with the graph (tokenizer.json beside it, named in the sidecar)
    tokenizer_json = meta.get("tokenizer") or getattr(task, "tokenizer_json", lambda: None)()
    from .quiet import known_noise
    with known_noise():
        info = export(form, out, args.format, max_length=args.max_length, tokenizer_json=tokenizer_json)
    print(json.dumps({"out": str(out), "metadata": str(out) + ".json", "step": meta["step"],
                      **({"tokenizer": str(out.parent / info["tokenizer"])} if "tokenizer" in info else {}),
                      "model": cfg.model, "format": args.format, "mode": args.mode,
                      "bytes": out.stat().st_size, **({"delegation": info["delegation"]}
                                                      if "delegation" in info else {})}))
    return 0


def cmd_eval(args) -> int:
    from .train import Trainer
    from .train.checkpoint import load_checkpoint, load_model_weights
    meta, ckpt_dir, _ = load_checkpoint(args.checkpoint)
    cfg = TrainConfigRef().from_dict({**meta["config"], "progress": False,
                                      **({"device": args.device} if args.device else {})})
    trainer = Trainer(cfg, run_dir=Path(args.checkpoint))
    load_model_weights(trainer.model, ckpt_dir)   # evaluation needs the weights only
    overrides = dict(args.task_args or [])
    texts = {k: v for k, v in overrides.items() if isinstance(v, str)}
    if texts:
        from .data.tasks import parse_task_options
        overrides.update(parse_task_options(cfg.task, texts))
    metrics = trainer.evaluate(args.batches, task_args=overrides or None)
    print(json.dumps({"step": meta["step"], "task": cfg.task, "model": cfg.model,
                      **({"task_args": overrides} if overrides else {}), **metrics}))
    return 0


def cmd_sample(args) -> int:
    import torch
    # checked here so errors name the flags the user typed, not generate()'s keywords
    check_int("--tokens", args.tokens, 0)
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None:   # unset: no limit
        check_int("--top-k", args.top_k)
    check_int("--seed", args.seed, 0, maximum=2 ** 63 - 1)
    cfg, task, model, _ = _load_for_inference(args.checkpoint)
    if not task.has_vocabulary:
        raise ValueError(f"sample needs a text task (one with a vocabulary to decode); this checkpoint "
                         f"was trained on {cfg.task!r}")
    ids = task.encode(args.prompt)
    if len(ids) == 0:
        raise ValueError("--prompt must encode to at least one token")
    import itertools

    from .models.generate import generate_stream
    gen = torch.Generator().manual_seed(args.seed)
    tokens = generate_stream(model, torch.as_tensor(ids), args.tokens, args.temperature, args.top_k,
                             generator=gen)
    first = next(tokens, None)   # the first token before any output: a failing model prints nothing
    sys.stdout.write(args.prompt)

    # Tokens are decoded together and only the new text is printed: a byte-level BPE token alone
    # can be half a character, and decoders join tokens with the right spacing.
    new, shown = [], ""
    for token in itertools.chain([first] if first is not None else [], tokens):
        new.append(int(token))
        text = task.decode(new)
        if not text.endswith("\ufffd") and text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    text = task.decode(new)
    sys.stdout.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
    sys.stdout.write("\n")
    return 0


# ------------------------------------------------------------------------------------ parser


def _describe_tasks() -> str:
    from .data.tasks import describe_tasks
    return describe_tasks()


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one model on one task (no arguments: the default experiment)",
                       description="Train one model on one task into a run directory (config.json, "
                       "metrics.jsonl, tb/, plot.png, checkpoints/, summary.json). With no arguments "
                       "at all, runs the default experiment (MORNN vs LSTM on copy). Under torchrun "
                       "the same command trains with DistributedDataParallel.",
                       epilog="Tasks and their --task-arg options:\n\n" + _describe_tasks(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_options(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest "
                   "checkpoint, exactly (its config is used; --steps may extend it, "
                   "--no-progress hides the bar)")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint", description="Evaluate a checkpoint "
                       "on its task's validation batches and print the metrics as JSON.")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ folder, or a step-* folder")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    p.add_argument("--device", default=None, help="device to evaluate on (default: the run's)")
    p.add_argument("--task-arg", dest="task_args", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="evaluate with this task option changed (repeatable), e.g. --task-arg seq_len=1024 "
                        "for a model trained at 256: length extrapolation")
    p.set_defaults(func=cmd_eval)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint of a text task",
                       description="Generate text from a language-model checkpoint, streaming the "
                       "recurrent state token by token (memory stays constant).")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ folder, or a step-* folder")
    p.add_argument("--prompt", default="\n", help="text to start from (default a newline)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(func=cmd_sample)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="train several models on one task: one table and one plot",
                       description="Train each of --models with the same settings and data, then "
                       "print one table and write compare.png, results.json and results.md.")
    p.add_argument("--models", required=True, help="comma-separated model names, e.g. lstm,gru,mornn")
    p.add_argument("--out", default=None, help="output folder (default <out-dir>/compare-<task>-<time>)")
    _add_config_options(p)
    p.set_defaults(func=cmd_compare)


def _add_export_hf(sub) -> None:
    p = sub.add_parser("export-hf", help="convert a language-model checkpoint for Hugging Face transformers",
                       description="Write a run's latest checkpoint as a transformers directory "
                       "(config.json, model.safetensors, tokenizer); needs the hf extra.")
    p.add_argument("run_dir", help="run directory, its checkpoints/ folder, or a step-* folder")
    p.add_argument("out_dir", help="output directory: a new or empty folder outside every run")
    # matrec.hf imports transformers: only when this command runs, never for the others
    p.set_defaults(func=cmd_export_hf)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX or ExecuTorch for edge inference",
                       description="Write a run's latest checkpoint as one ONNX model or ExecuTorch "
                       "program that takes and returns the recurrent state as plain tensors "
                       "(docs/deploy.md), plus PATH.json describing its inputs and state. Needs the "
                       "export extra.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory, its checkpoints/ folder, or a step-* folder")
    p.add_argument("--format", required=True, choices=["onnx", "executorch"], help="onnx (.onnx) or "
                   "executorch (.pte, XNNPACK-delegated)")
    p.add_argument("--mode", default="sequence", choices=["sequence", "step"], help="sequence: one graph "
                   "for any length T (a prompt and single steps; default); step: T = 1 only, smaller")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/model-MODE.onnx|pte); must not exist")
    p.add_argument("--max-length", type=int, default=4096, help="longest T (and attention cache) the "
                   "graph accepts, 8 to 2^24; ExecuTorch plans memory for it, at most 4 GiB (default 4096)")
    p.set_defaults(func=cmd_export)


def _add_import_hf(sub) -> None:
    p = sub.add_parser("import-hf", help="start a run from a transformers directory (to fine-tune it)",
                       description="Write RUN_DIR with a step-0 checkpoint holding HF_DIR's weights; "
                       "`matrec train --resume RUN_DIR --steps N` then trains it. The model comes "
                       "from HF_DIR's config.json; the options below set the rest of the run (the "
                       "task's vocabulary must match the model's). Needs the hf extra.")
    p.add_argument("hf_dir", help="a transformers directory written by matrec export-hf")
    p.add_argument("run_dir", help="the run directory to create")
    _add_config_options(p)
    p.set_defaults(func=cmd_import_hf)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matrec", description="Train, evaluate, sample, compare and benchmark matrix "
        "recurrences (MORNN, MRU) against LSTM/GRU/transformers. `matrec train` with no arguments "
        "runs the default experiment: MORNN vs LSTM on the copy task (a table and a plot).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # one function per command, in the order `matrec --help` lists them
    for add in (_add_train, _add_eval, _add_sample, _add_compare, _add_bench, _add_export_hf, _add_export,
                _add_import_hf, add_experiment_parser):
        add(sub)
    return parser


# the modules each command needs beyond torch + numpy (the `workbench` extra); tensorboard is
# optional (metrics.jsonl is written without it) and tokenizers is checked by the text tasks
EXTRAS = {"train": ["safetensors", "tqdm", "matplotlib"], "compare": ["safetensors", "tqdm", "matplotlib"],
          "eval": ["safetensors"], "sample": ["safetensors"], "bench": [],
          "export-hf": ["safetensors"],   # and transformers: matrec.hf names the hf extra itself
          "export": ["safetensors"],   # and the export extra: matrec.export names it itself
          "experiment": ["safetensors", "tqdm", "matplotlib"],
          "import-hf": ["safetensors", "tqdm", "matplotlib"]}


def check_extras(command: str) -> None:
    """Fail before any work when the workbench extra is not installed (a core-only install)."""
    missing = []
    for name in EXTRAS[command]:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(f"`matrec {command}` needs the workbench extra, which is not "
                                  f"installed (missing: {', '.join(missing)}): "
                                  f"pip install 'matrec[workbench]'")


def _out_of_memory(e: BaseException) -> bool:
    import torch
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv == ["train"]:
        args = argparse.Namespace(command="train", func=lambda _: default_experiment())
    else:
        args = parser.parse_args(argv)
    from .data.download import DataFileError
    from .train import CheckpointError, NonFiniteError
    from .train.distributed import mark_failed
    from .train.rundir import RunDirError

    def fail(status: int, message: str) -> None:
        mark_failed()  # under torchrun this rank may fail alone: leave the group to torchrun
        parser.exit(status, f"matrec {args.command}: error: {message}\n")

    try:
        check_extras(args.command)
        return args.func(args)
    except NonFiniteError as e:
        mark_failed()
        print(f"matrec: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, CheckpointError, DataFileError,
            RunDirError) as e:
        fail(2, str(e))
    except KeyboardInterrupt:
        fail(130, "interrupted (the last checkpoint, if any, is intact: --resume continues from it)")
    except Exception as e:
        if _out_of_memory(e):
            fail(1, f"out of memory ({str(e).splitlines()[0][:200]}); lower --batch-size or the "
                    f"model's size")
        if isinstance(e, OSError):   # the disk or the system refused (full, read-only, no permission)
            fail(1, f"{e.strerror or e}" + (f": {e.filename!r}" if e.filename else ""))
        raise


if __name__ == "__main__":
    sys.exit(main())
