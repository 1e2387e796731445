"""Workbench checkpoints <-> transformers directories.

``matrec export-hf RUN_DIR OUT_DIR`` (:func:`export_hf`) writes a checkpoint as a directory that
holds ``config.json`` (:class:`~matrec.hf.MatrecConfig`), ``model.safetensors``,
``generation_config.json``, the tokenizer files and ``modeling_matrec.py`` (named by ``auto_map`` in
``config.json``), and loads with ``import matrec.hf`` then ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``
/ ``AutoTokenizer.from_pretrained(OUT_DIR)``, or without that import, wherever matrec is installed,
with ``from_pretrained(OUT_DIR, trust_remote_code=True)``: the module only imports matrec.hf's classes.
:func:`workbench_run_from_hf` goes back: a run directory starting from a transformers directory's
weights, which ``matrec train --resume`` fine-tunes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .configuration import MatrecConfig, config_from_model_spec
from .modeling import MatrecForCausalLM
from .tokenization import check_tokenizer, task_tokenizer, tokenizer_from_json, vocab_size_without_pad

REMOTE_MODULE = "modeling_matrec"
# What transformers runs for trust_remote_code=True: matrec's own classes, from the installed matrec
# (transformers checks that `matrec` is importable and otherwise names the package to install).
_REMOTE_CODE = '''"""Loads this directory with transformers' trust_remote_code=True: the classes are matrec's own
(pip install 'matrec[hf]'); `import matrec.hf` before from_pretrained does the same without remote code."""
from matrec.hf import MatrecConfig, MatrecForCausalLM

__all__ = ["MatrecConfig", "MatrecForCausalLM"]
'''
AUTO_MAP = {"AutoConfig": f"{REMOTE_MODULE}.MatrecConfig",
            "AutoModelForCausalLM": f"{REMOTE_MODULE}.MatrecForCausalLM"}


def export_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert the latest checkpoint of ``run_dir`` (or the ``step-*`` folder it names) of a
    language-model task (``shakespeare``, ``text`` and their streams) into ``out_dir``.

    The tokenizer comes from the checkpoint; a checkpoint written before checkpoints kept it is
    converted by rebuilding its task, whose data file must then be where the run found it.
    """
    from matrec.data.tasks import build_task
    from matrec.train.checkpoint import load_checkpoint, load_model_weights

    meta, ckpt_dir, _ = load_checkpoint(run_dir)
    cfg = meta.get("config") or {}
    for key in ("task", "model"):
        if key not in cfg:
            raise ValueError(f"checkpoint {str(ckpt_dir)!r} has no {key!r} in its config: not a workbench run")
    if "tokenizer" in meta:
        from matrec.train.checkpoint import stored_vocabulary
        stored_vocabulary(meta, ckpt_dir)   # a tokenizer that cannot be read: an error naming the checkpoint
        tokenizer = tokenizer_from_json(meta["tokenizer"])
        vocab_size = vocab_size_without_pad(tokenizer)
    else:
        task = build_task(cfg["task"], **cfg.get("task_args", {}))
        io = task.model_io()
        if io["vocab_size"] is None or io["output_size"] != io["vocab_size"] or not task.has_vocabulary:
            raise ValueError(f"export-hf needs a language-model run (token ids in, next-token logits "
                             f"out); {str(run_dir)!r} was trained on the task {cfg['task']!r}")
        tokenizer, vocab_size = task_tokenizer(task), io["vocab_size"]
        check_tokenizer(tokenizer, vocab_size)
    config = config_from_model_spec(cfg["model"], vocab_size=vocab_size, **cfg.get("model_args", {}))
    config.auto_map = dict(AUTO_MAP)
    model = MatrecForCausalLM(config)
    load_model_weights(model.model, ckpt_dir)  # a tokenizer of the wrong size fails here, by name
    out = Path(out_dir)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / f"{REMOTE_MODULE}.py").write_text(_REMOTE_CODE)
    return out


def _read_hf_dir(hf_dir: Path) -> MatrecForCausalLM:
    """The model in ``hf_dir``, or a ValueError naming the file and the field that is wrong: a
    config.json that is no JSON object, weights only as a pickle (never loaded: unpickling runs
    code), a truncated model.safetensors, or tensors whose shapes the config does not give (an
    edited vocab_size or d_model: transformers would start those weights afresh, with a warning)."""
    import json

    from safetensors import safe_open
    config_path, weights = hf_dir / "config.json", hf_dir / "model.safetensors"
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{str(config_path)!r} is not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object (a transformers config), got a "
                         f"JSON {type(data).__name__}")
    try:
        config = MatrecConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(config_path)!r}: {e}") from None
    if not weights.is_file():
        pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        raise ValueError(f"HF_DIR {str(hf_dir)!r} has no model.safetensors" + (
            f"; {pickles} are pickles, which matrec never loads (unpickling can run code): save the "
            f"weights with save_pretrained(..., safe_serialization=True)" if pickles else ""))
    try:
        with safe_open(str(weights), "pt") as f:
            stored = {k: f.get_tensor(k).shape for k in f.keys()}   # reads every byte: a cut file fails
    except Exception as e:   # noqa: BLE001 - safetensors' own error type, for a cut or garbled file
        raise ValueError(f"{str(weights)!r} cannot be read as safetensors (truncated or damaged: "
                         f"{str(e)[:120]})") from None
    model = MatrecForCausalLM(config)
    want = model.state_dict()
    fields = ", ".join(f"{k}={getattr(config, k)}" for k in ("vocab_size", "d_model", "hidden_size",
                                                              "num_layers", "n_heads", "embed_dim")
                       if k in data)
    for name, shape in stored.items():
        if name in want and tuple(want[name].shape) != tuple(shape):
            raise ValueError(f"{str(weights)!r}: tensor {name!r} has shape {list(shape)}, but "
                             f"{str(config_path)!r} ({fields}) gives {list(want[name].shape)}; the config "
                             f"was edited or belongs to other weights")
    tied = {t.data_ptr() for k, t in want.items() if k in stored}
    missing = sorted(k for k, t in want.items() if k not in stored and t.data_ptr() not in tied)
    unknown = sorted(set(stored) - set(want))
    if missing or unknown:
        raise ValueError(f"{str(weights)!r} does not hold the weights {str(config_path)!r} describes: "
                         f"missing {missing[:5]}, unexpected {unknown[:5]}")
    return MatrecForCausalLM.from_pretrained(hf_dir)


def workbench_run_from_hf(hf_dir: str | Path, run_dir: str | Path, **config) -> Path:
    """Start a workbench run at ``run_dir`` from the weights in the transformers directory
    ``hf_dir``: a step-0 checkpoint that ``matrec train --resume RUN_DIR --steps N`` fine-tunes.

    ``config`` holds the other :class:`matrec.train.config.TrainConfig` fields (``task``,
    ``task_args``, ``steps``, ``lr``, ...); the model and its arguments come from ``hf_dir``, and the
    task's vocabulary must have the model's size.
    """
    from matrec.train import Trainer
    from matrec.train.config import TrainConfig

    for key in ("model", "model_args"):
        if key in config:
            raise ValueError(f"{key} comes from {str(hf_dir)!r}; do not pass it")
    source = _read_hf_dir(Path(hf_dir))
    name, model_args = source.config.model_kwargs()
    vocab_size = model_args.pop("vocab_size")
    model_args.pop("output_size")
    trainer = Trainer(TrainConfig.from_dict({**config, "model": name, "model_args": model_args}),
                      run_dir=run_dir)
    if trainer.task.model_io()["vocab_size"] != vocab_size:
        raise ValueError(f"the task {trainer.cfg.task!r} has {trainer.task.model_io()['vocab_size']} "
                         f"tokens but the model in {str(hf_dir)!r} has {vocab_size}")
    trainer.model.load_state_dict(source.model.state_dict())
    trainer.save()
    return Path(run_dir)


@contextlib.contextmanager
def quiet_cli():
    """For the CLI commands: :func:`matrec.quiet.known_noise`, and no transformers progress bars
    ("Writing model shards", "Loading weights" for a one-file model)."""
    from transformers.utils import logging as hf_logging

    from matrec.quiet import known_noise

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with known_noise():
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def cmd_export_hf(args) -> int:
    """The ``matrec export-hf`` command (``args.run_dir``, ``args.out_dir``)."""
    with quiet_cli():
        out = export_hf(args.run_dir, args.out_dir)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out}: {files}\nload it with: import matrec.hf; "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
          f"or, without importing matrec.hf: AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          f"trust_remote_code=True)")
    return 0
