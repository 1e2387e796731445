"""A run directory's state, read from its files alone, and what a damaged file or a changed
setting means for it (``matrec experiment run`` and ``report`` both read runs through here).

States: ``new`` (no directory), ``partial`` (no final status: interrupted, or running now),
``done``, ``failed``, ``retry`` (failed for a reason of the machine, not of the run: a rerun tries
it again) and ``damaged`` (one of its bookkeeping files cannot be read: left alone, the file named).
"""
from __future__ import annotations

import errno
import json
import math
from pathlib import Path

from ..checks import is_int, is_real
from ..train.config import TrainConfig
from ..train.rundir import RunDirError, read_metrics
from ..train.trainer import DeviceUnavailableError
from .spec import ExperimentError

STATES = ("new", "partial", "done", "failed", "retry", "damaged")
# a full disk or quota, a file-size limit: the machine's state, not the run's; a rerun retries
ENVIRONMENTAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# settings that change how a run is shown or how fast it goes, never what it computes
UNCOMPARED = {"threads", "progress", "out_dir", "tensorboard", "plot"}
# cell.json keys that decide when a run stops or what is evaluated at its end
CELL_SETTINGS = ("target", "stop_at_target", "seconds", "eval_at")


class DamagedRun(Exception):
    """A bookkeeping file of a run cannot be read; the message names it and says what is wrong."""


def environmental(e: BaseException) -> bool:
    """Whether ``e`` comes from the machine (no CUDA here, disk full) rather than from the run."""
    return isinstance(e, DeviceUnavailableError) or (
        isinstance(e, OSError) and e.errno in ENVIRONMENTAL_ERRNOS)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when there is no such file; :class:`DamagedRun` when
    it holds anything but a JSON object (binary, cut, a list, nested past the parser's depth)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DamagedRun(f"{str(path)!r} is not valid JSON ({type(e).__name__})") from None
    except OSError as e:
        raise DamagedRun(f"{str(path)!r} cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise DamagedRun(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object")
    return data


def read_status(run_dir: str | Path) -> dict | None:
    """``status.json`` (None without one); :class:`DamagedRun` when it is not a status."""
    path = Path(run_dir) / "status.json"
    status = read_json(path)
    if status is not None and status.get("state") not in ("done", "failed"):
        raise DamagedRun(f"{str(path)!r} has no state 'done' or 'failed' (state {status.get('state')!r})")
    return status


def read_cell(run_dir: str | Path) -> dict | None:
    """``cell.json`` (None without one); :class:`DamagedRun` when it places the run nowhere."""
    path = Path(run_dir) / "cell.json"
    cell = read_json(path)
    if cell is not None and not (isinstance(cell.get("experiment"), str) and isinstance(cell.get("label"), str)):
        raise DamagedRun(f"{str(path)!r} lacks the experiment's name or the run's label")
    return cell


def read_timing(path: Path, upto: int | None = None) -> list[dict]:
    """The rows of ``timing.jsonl`` (up to step ``upto``); a cut last line (a kill mid-write) is
    dropped, any other line that is not ``{"step": int, "train_seconds": number}`` is damage."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise DamagedRun(f"{str(path)!r} is not UTF-8 text") from None
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if i == len(lines):
                break
            row = None
        if not (isinstance(row, dict) and is_int(row.get("step")) and is_real(row.get("train_seconds"))):
            raise DamagedRun(f"{str(path)!r} line {i} is not a timing record "
                             f"({{\"step\": int, \"train_seconds\": number}}): {line[:60]!r}")
        if upto is None or row["step"] <= upto:
            rows.append(row)
    return rows


def read_records(run_dir: Path) -> list[dict]:
    """``metrics.jsonl``'s records, every value beside ``kind`` a number (a loss of "x" is damage)."""
    path = run_dir / "metrics.jsonl"
    try:
        records = read_metrics(path, partial_last=True) if path.exists() else []
    except (RunDirError, RecursionError) as e:
        raise DamagedRun(str(e) if isinstance(e, RunDirError) else f"{str(path)!r} is nested too deeply") from None
    for i, r in enumerate(records, 1):
        bad = sorted(k for k, v in r.items() if k != "kind" and not is_real(v))
        if bad:
            raise DamagedRun(f"{str(path)!r} record {i} (step {r['step']}) has non-numeric {bad}")
    return records


def check_finished(run_dir: Path, records: list[dict]) -> None:
    """A done run has evaluations and a finite last one; else :class:`DamagedRun`."""
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        raise DamagedRun(f"{str(run_dir / 'metrics.jsonl')!r} holds no evaluation, yet status.json says done")
    bad = sorted(k for k, v in evals[-1].items() if k != "kind" and not math.isfinite(v))
    if bad:
        raise DamagedRun(f"{str(run_dir / 'metrics.jsonl')!r}: the last evaluation (step "
                         f"{evals[-1]['step']}) has non-finite {bad}, yet status.json says done")


def inspect(run_dir: str | Path) -> tuple[str, str]:
    """``(state, detail)``: detail is the damage (``damaged``) or the earlier failure (``retry``)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "new", ""
    try:
        status = read_status(run_dir)
        read_cell(run_dir)
        read_json(run_dir / "summary.json")
        read_timing(run_dir / "timing.jsonl")
        if status is not None and status["state"] == "done":
            check_finished(run_dir, read_records(run_dir))
    except DamagedRun as e:
        return "damaged", str(e)
    if status is None:
        return "partial", ""
    if status["state"] == "failed" and status.get("environmental"):
        return "retry", status.get("reason", "")
    return status["state"], ""


def run_state(run_dir: str | Path) -> str:
    return inspect(run_dir)[0]


# ------------------------------------------------------------------------------------ settings


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def changed_settings(spec: dict) -> list[str]:
    """The settings of the run at ``spec["run_dir"]`` that differ from the experiment file's now
    (``"key: <run's> in the run, <file's> in the file"``), for a run that holds a result or a
    checkpoint; [] for any other (it starts afresh from the file)."""
    run_dir = Path(spec["run_dir"])
    if not run_dir.exists():
        return []
    state = inspect(run_dir)[0]
    checkpoint = (run_dir / "checkpoints" / "latest.json").is_file()
    if not (state in ("done", "failed") or (state in ("partial", "retry") and checkpoint)):
        return []     # nothing of it is reused: it starts afresh from the file
    try:
        recorded = read_json(run_dir / "config.json")
        cell = read_cell(run_dir) or {}
    except DamagedRun:
        return []    # the state says damaged, and the run is left alone
    diffs = []
    if recorded is not None:   # a run that failed before it wrote its config has none to compare
        wanted = _flat(json.loads(json.dumps(TrainConfig.from_dict(spec["config"]).to_dict())))
        have = _flat(recorded)
        diffs = [(k, have.get(k, "unset"), wanted.get(k, "unset")) for k in sorted(set(wanted) | set(have))
                 if k not in UNCOMPARED and have.get(k, "unset") != wanted.get(k, "unset")]
    if cell:   # runs from before cell.json was written at the start may lack it: nothing to compare
        diffs += [(k, cell.get(k), spec["cell"].get(k)) for k in CELL_SETTINGS
                  if cell.get(k) != spec["cell"].get(k)]
    return [f"{k}: {old!r} in the run, {new!r} in the file" for k, old, new in diffs]


def check_settings(specs: list[dict], where: str) -> None:
    """Refuse (:class:`ExperimentError`, every changed run and key named) when a run that holds a
    result or a checkpoint was made from other settings than the file's: reusing it would mix old
    and new settings in one report, rerunning it would throw a finished run away."""
    changed = [(Path(s["run_dir"]), c) for s in specs for c in [changed_settings(s)] if c]
    if changed:
        shown = "; ".join(f"{d.name} ({', '.join(c)})" for d, c in changed[:5])
        more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ExperimentError(
            f"{where}: {len(changed)} run(s) in {str(changed[0][0].parent)!r} were made with other "
            f"settings than the file's now: {shown}{more}. Nothing was run: move those run folders "
            f"away (or delete them) to run them again, restore the settings, or give the experiment "
            f"another name")
