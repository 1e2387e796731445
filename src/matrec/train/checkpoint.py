"""Checkpoints: safetensors for tensors, JSON for everything else, committed atomically.

Layout of ``<run>/checkpoints/``::

    latest.json               {"step": 200, "dir": "step-00000200"}   (replaced atomically)
    step-00000200/
        model.safetensors     the model's weights (loadable on their own)
        state.safetensors     optimiser tensors, RNG states, the carried stream state
        state.json            step, config, optimiser/schedule settings, task cursor, file hashes

A checkpoint directory is written under a temporary name and renamed into place, then
``latest.json`` is swapped with ``os.replace``: a run killed at any moment leaves the previous
checkpoint complete and pointed to. ``state.json`` records the SHA-256 of both tensor files, so a
truncated or altered file is reported as corrupt instead of loading garbage.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.tasks import build_task
from ..data.tasks.lm import StoredVocabulary
from ..models import build_model
from .config import TrainConfig

FORMAT = "matrec-checkpoint"
VERSION = 1
# the fields of state.json that loading relies on, and their JSON types
REQUIRED = {"step": int, "config": dict, "optimizer": dict, "files": dict, "stream_states": dict}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt."""


# ---------------------------------------------------------------------------------------------
# nested tensors (an LSTM's (h, c), a list of per-layer states, ...) <-> flat dict + JSON spec


def flatten_tensors(obj, prefix: str, out: dict[str, Tensor]):
    """Move every tensor in a nested tuple/list/dict ``obj`` into ``out`` under ``prefix.<path>``
    and return a JSON-able spec that :func:`unflatten_tensors` turns back into ``obj``."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        out[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": prefix}
    if isinstance(obj, (tuple, list)):
        return {"seq": [flatten_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if isinstance(obj, dict):
        return {"map": {str(k): flatten_tensors(v, f"{prefix}.{k}", out) for k, v in obj.items()}}
    if isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def unflatten_tensors(spec, tensors: dict[str, Tensor], device=None):
    if spec is None:
        return None
    if "tensor" in spec:
        t = tensors[spec["tensor"]]
        return t if device is None else t.to(device)
    if "seq" in spec:
        items = [unflatten_tensors(s, tensors, device) for s in spec["seq"]]
        return tuple(items) if spec["tuple"] else items
    if "map" in spec:
        return {k: unflatten_tensors(s, tensors, device) for k, s in spec["map"].items()}
    return spec["value"]


# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file``, its refused writes (disk full, file too large) as the OSError
    they are: safetensors reports them as its own error type, which names no file."""
    from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:   # noqa: BLE001 - SafetensorError is not importable by a stable name
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def save_checkpoint(root: str | Path, *, model: nn.Module, tensors: dict[str, Tensor], meta: dict,
                    keep: int = 1) -> Path:
    """Write one checkpoint under ``root`` atomically and point ``latest.json`` at it.

    Args:
        model: the bare module (not DDP/compiled wrappers); its weights go to model.safetensors.
        tensors: every other tensor (optimiser, RNG, stream state), flat names -> tensors.
        meta: JSON-able state; must hold ``step``.
        keep: how many step directories to keep (older ones are removed after the switch).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        _save_tensors(_weights_to_save(model), tmp / "model.safetensors", metadata={"format": "pt"})
        _save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        files = {f: _sha256(tmp / f) for f in ("model.safetensors", "state.safetensors")}
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta,
                                                    "files": files}, indent=1))
        for f in ("model.safetensors", "state.safetensors", "state.json"):
            _fsync(tmp / f)
        final = root / name
        if final.exists():  # left by a run killed before it could point latest.json at it
            os.replace(final, Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".old")) / name)
        os.replace(tmp, final)
    except OSError as e:   # the disk refused: the last checkpoint (latest.json's) is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"{e.strerror} while writing a checkpoint (the previous checkpoint "
                               f"is intact)", e.filename) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)  # the rename itself must survive a crash before latest.json points at it
    write_json_atomic(root / "latest.json", {"step": step, "dir": name})
    _fsync(root)
    # one writer (rank 0): any hidden .step-* folder left now is debris of a killed save
    for debris in root.glob(".step-*"):
        shutil.rmtree(debris, ignore_errors=True)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def confined(root: Path, name, source: Path) -> Path:
    """``root / name`` if that is a folder directly inside ``root`` once every link is resolved,
    else :class:`CheckpointError`: a pointer read from a run's files (``source``) must never lead
    into another run or anywhere else on disk."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"checkpoint pointer {str(source)!r} names {name!r}, not a checkpoint "
                              f"folder of {str(root)!r} (a step-* name); refusing to follow it")
    target = (root / name).resolve()
    if target.parent != root.resolve():
        raise CheckpointError(f"checkpoint pointer {str(source)!r} leads to {str(target)!r}, outside "
                              f"{str(root)!r} (a link?); refusing to follow it")
    return root / name


def latest_step(root: str | Path) -> int | None:
    """The step ``root/latest.json`` points at (None when there is no checkpoint yet)."""
    latest = Path(root) / "latest.json"
    if not latest.is_file():
        return None
    try:
        return int(json.loads(latest.read_text())["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint pointer {str(latest)!r}: {e}") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names: a run directory, its ``checkpoints/`` folder
    (both via ``latest.json``), or one ``step-*`` directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    for root in (path, path / "checkpoints"):
        latest = root / "latest.json"
        if latest.is_file():
            try:
                name = json.loads(latest.read_text())["dir"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"corrupt checkpoint pointer {str(latest)!r}: {e}") from None
            return confined(root, name, latest)
    if (path / "state.json").is_file():
        return path
    raise CheckpointError(f"no checkpoint found at {str(path)!r}: expected a run directory, its "
                          f"checkpoints/ folder, or a step-* directory holding state.json")


def load_checkpoint(path: str | Path) -> tuple[dict, Path, dict[str, Tensor]]:
    """Read and verify a checkpoint: ``(meta, checkpoint_dir, other_tensors)`` (tensors on CPU).

    Load the weights with :func:`load_model_weights`. Raises :class:`CheckpointError` naming the
    file when anything is missing or corrupt.
    """
    for attempt in range(3):
        ckpt = resolve_checkpoint(path)
        try:
            return _read_checkpoint(ckpt)
        except (CheckpointError, FileNotFoundError):
            # a reader (eval, sample) runs beside the run's writer, which may have replaced the
            # checkpoint between our reading latest.json and its files: read the new one then
            if attempt == 2 or resolve_checkpoint(path) == ckpt:
                raise
    raise AssertionError("unreachable")


def _read_checkpoint(ckpt: Path) -> tuple[dict, Path, dict[str, Tensor]]:
    from safetensors.torch import load_file

    state_json = ckpt / "state.json"
    if not state_json.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: state.json is missing")
    try:
        meta = json.loads(state_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is corrupt: state.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(state_json)!r} is not a matrec checkpoint (format {FORMAT!r} expected)")
    missing = [k for k, kind in REQUIRED.items() if not isinstance(meta.get(k), kind)]
    if missing:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is corrupt: state.json lacks field(s) "
                              f"{missing} or they have the wrong type")
    for name in ("model.safetensors", "state.safetensors"):
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: {name} is missing")
        if _sha256(f) != meta.get("files", {}).get(name):
            raise CheckpointError(f"checkpoint {str(ckpt)!r} is corrupt: {name} does not match the "
                                  f"SHA-256 recorded in state.json (truncated or modified file)")
    try:
        tensors = load_file(str(ckpt / "state.safetensors"))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is corrupt: cannot read state.safetensors ({e})") from None
    return meta, ckpt, tensors


def _tie_key(t: Tensor):
    """Tensors with equal keys are one tensor under two names (tied weights)."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None


def _weights_to_save(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each tied group stored once (its first name) and every tensor its own copy.

    safetensors' ``save_model`` refuses tensors that are views into a larger buffer, which is how
    cuDNN keeps nn.RNN/LSTM/GRU weights on CUDA (one flat buffer), so the workbench writes its own.
    """
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = _tie_key(t)
        if key is not None and key in seen:
            continue  # the tie is the model's structure, restored from the model when loading
        seen.add(key)
        out[name] = t.detach().contiguous().clone()  # clone: never a view into a shared buffer
    return out


def load_model_weights(model: nn.Module, ckpt_dir: str | Path) -> None:
    """Load ``<ckpt_dir>/model.safetensors`` into ``model`` strictly (tied weights restored)."""
    from safetensors.torch import load_file

    path = str(Path(ckpt_dir) / "model.safetensors")
    try:
        stored = load_file(path)
    except Exception as e:   # noqa: BLE001 - safetensors' own error type: a file that matches its
        # recorded SHA-256 yet is no safetensors file was written so (forged), not cut by a crash
        raise CheckpointError(f"checkpoint weights {path!r} cannot be read as safetensors "
                              f"({str(e)[:160]})") from None
    try:
        want = model.state_dict()
        # a name missing from the file is fine when it is tied to one that is there (stored once)
        by_key = {_tie_key(t): name for name, t in want.items() if name in stored}
        for name, t in want.items():
            if name not in stored and _tie_key(t) in by_key:
                stored[name] = stored[by_key[_tie_key(t)]]
        model.load_state_dict(stored, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        why = " ".join(str(e).split())   # torch's message spans lines: one line for the user
        raise CheckpointError(f"checkpoint weights in {str(ckpt_dir)!r} do not fit the model: "
                              f"{why[:400]}{'...' if len(why) > 400 else ''}") from None


# ---------------------------------------------------------------------------------------------
# optimiser state: tensors to safetensors, the rest to JSON


def optimizer_to_flat(optimizer: torch.optim.Optimizer, out: dict[str, Tensor]) -> dict:
    sd = optimizer.state_dict()
    state_spec = {str(idx): flatten_tensors(s, f"optim.{idx}", out) for idx, s in sd["state"].items()}
    return {"state": state_spec, "param_groups": sd["param_groups"]}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, spec: dict, tensors: dict[str, Tensor]) -> None:
    state = {int(idx): unflatten_tensors(s, tensors) for idx, s in spec["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": spec["param_groups"]})


def stored_vocabulary(meta: dict, ckpt_dir: Path) -> StoredVocabulary:
    """The vocabulary a checkpoint keeps (its ``tokenizer`` field), or :class:`CheckpointError`
    naming the checkpoint when that field is no tokenizer (edited, or written by something else)."""
    try:
        return StoredVocabulary(meta["tokenizer"])
    except Exception as e:   # noqa: BLE001 - tokenizers raises a bare Exception for bad JSON
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r}: the tokenizer in state.json cannot be read "
                              f"({type(e).__name__}: {str(e)[:160]})") from None


def load_for_inference(path: str | Path, *, vocabulary_only: bool = False):
    """``(config, task, model, meta)`` of the checkpoint at ``path`` (a run or checkpoint folder):
    the model with its weights, in eval mode, on the CPU.

    ``vocabulary_only``: a checkpoint that keeps its tokenizer (text tasks) gives that vocabulary
    instead of the task, so the data file it was trained on need not exist any more (enough to
    sample; evaluating needs the task's data).
    """
    meta, ckpt_dir, _ = load_checkpoint(path)
    cfg = TrainConfig.from_dict(meta["config"])
    if vocabulary_only and meta.get("tokenizer"):
        task = stored_vocabulary(meta, ckpt_dir)
    else:
        task = build_task(cfg.task, **cfg.task_args)
    model = build_model(cfg.model, **task.model_io(), **cfg.model_args)
    load_model_weights(model, ckpt_dir)
    return cfg, task, model.eval(), meta
