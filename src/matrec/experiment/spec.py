"""Experiment files: a grid of ordinary training runs, read from TOML or JSON and checked whole.

A file holds the shared settings at its top level and two tables ``[scales.cpu]`` and
``[scales.gpu]`` whose keys override them (deep merge: ``scales.cpu.models.lstm.model_args`` changes
one model's size at that scale only). docs/experiments.md lists every key.
"""
from __future__ import annotations

import collections
import fnmatch
import functools
import itertools
import json
import math
import operator
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checks import check_int, is_int, is_real
from ..data.tasks import TASKS, build_task
from ..models import MODELS, build_model, num_parameters
from ..train.config import TrainConfig
from ..train.context import check_bins, plan

SCALES = ("cpu", "gpu")            # every file has both
OPTIONAL_SCALES = ("gpu-full",)    # a file may add the full-size grid (hours; the Ray backend's home)
TOP_KEYS = {"name", "description", "task", "task_args", "models", "train", "grid", "seeds", "budget",
            "target", "stop_at_target", "metric", "matching", "position_eval", "eval_at", "scales"}
POSITION_KEYS = {"bins", "rows"}
MODEL_KEYS = {"model", "model_args", "train", "size", "grid", "seeds"}
BUDGET_KEYS = {"steps", "seconds"}
GRID_PREFIXES = ("task_args.", "model_args.", "train.")
# fields the experiment sets itself: a run's identity and place come from its cell
OWN_FIELDS = {"task", "task_args", "model", "model_args", "seed", "out_dir", "run_name", "steps"}
# an experiment writes many runs: per-run plots and TensorBoard files are off unless asked for
# (the report draws the plots), and no progress bars interleave from parallel runs
RUN_DEFAULTS = {"plot": False, "tensorboard": False, "progress": False}
# above this many runs `experiment run` warns (the checks stay linear: 100,000 runs list in seconds)
LARGE_GRID = 10_000
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_TARGET = re.compile(r"^\s*([A-Za-z_][\w/.-]*)\s*(>=|<=|>|<)\s*(\S+)\s*$")


class ExperimentError(ValueError):
    """A bad experiment file: the message names the file and the key."""


@dataclass(frozen=True)
class Target:
    """``metric op value``, e.g. ``recall >= 0.99``; met by an eval record holding the metric."""

    metric: str
    op: str
    value: float

    def met(self, record: dict) -> bool:
        v = record.get(self.metric)
        return v is not None and math.isfinite(v) and OPS[self.op](v, self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def parse_target(text, where: str = "target") -> Target:
    """Parse ``"recall >= 0.99"``; a ValueError names ``where`` and the expected form."""
    m = _TARGET.match(text) if isinstance(text, str) else None
    value = None
    if m:
        try:
            value = float(m.group(3))
        except ValueError:
            pass
    if value is None or not math.isfinite(value):
        raise ValueError(f"{where} must read '<metric> <op> <number>' with op one of >=, <=, >, < "
                         f"(e.g. 'recall >= 0.99'), got {text!r}")
    return Target(m.group(1), m.group(2), value)


@dataclass
class Cell:
    """One run: a model label, the swept values, a seed; its TrainConfig as a dict."""

    label: str
    swept: dict
    seed: int
    config: dict
    size: str = ""

    @functools.cached_property   # read several times per run: a 100,000-run grid feels it
    def name(self) -> str:
        parts = [self.label] + [f"{k.rsplit('.', 1)[-1]}{_token(v)}" for k, v in self.swept.items()]
        return "-".join(parts + [f"seed{self.seed}"])


@dataclass
class Experiment:
    name: str
    scale: str
    path: str
    description: str
    task: str
    metric: str
    target: Target | None
    stop_at_target: bool
    seconds: float | None
    matching: str
    eval_at: list = field(default_factory=list)   # task-option overrides each done run is also evaluated at
    position_eval: dict | None = None   # {"bins": [...], "rows": int | None}: the report's loss by position
    cells: list[Cell] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)   # label -> count, filled by check()

    def cells_matching(self, selection: list[str]) -> list[Cell]:
        """The cells ``--only`` picks: a model label, or a shell pattern of the run's name."""
        return [c for c in self.cells if any(c.label == w or fnmatch.fnmatchcase(c.name, w) for w in selection)]

    def cell_info(self, cell: Cell) -> dict:
        """What a run directory records about its place in the experiment (``cell.json``)."""
        return {"experiment": self.name, "scale": self.scale, "file": self.path, "label": cell.label,
                "swept": cell.swept, "seed": cell.seed, "size": cell.size, "metric": self.metric,
                "target": None if self.target is None else str(self.target),
                "stop_at_target": self.stop_at_target, "seconds": self.seconds, "matching": self.matching,
                "position_eval": self.position_eval, "eval_at": self.eval_at}


def _token(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_") or "_"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExperimentError(f"experiment file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExperimentError(f"experiment file {str(path)!r} cannot be read as text: {e}") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ExperimentError(f"experiment file {str(path)!r} must hold a JSON object")
            return data
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ExperimentError(f"experiment file {str(path)!r} is not valid {path.suffix[1:].upper()}: {e}") from None
    except RecursionError:   # the parsers recurse once per level
        raise ExperimentError(f"experiment file {str(path)!r} is nested too deeply for its parser "
                              f"(thousands of levels of tables or lists); no experiment needs more "
                              f"than a few") from None
    raise ExperimentError(f"experiment file {str(path)!r} must end in .toml or .json")


class _Where:
    """Error wording for one experiment file at one scale: every message names the file and the key
    (``scales.<scale>.<key>`` where the scale's table set it)."""

    def __init__(self, path: Path, scale: str, scale_table: dict | None = None) -> None:
        self.text, self.scale, self.scale_table = f"experiment file {str(path)!r}", scale, scale_table or {}

    def error(self, message: str) -> ExperimentError:
        return ExperimentError(f"{self.text}: {message}")

    def bad(self, key: str, expected: str, got) -> ExperimentError:
        return self.error(f"{key} must be {expected}, got {got!r}")

    def unknown(self, keys, allowed, prefix: str) -> None:
        extra = sorted(set(keys) - set(allowed))
        if extra:
            raise self.error(f"unknown key(s) {[prefix + k for k in extra]}; valid keys are "
                             f"{sorted(prefix + k for k in allowed)}")

    def at(self, key: str) -> str:
        return key if key not in self.scale_table else f"scales.{self.scale}.{key}"


def load_experiment(path: str | Path, scale: str, out_dir: str | Path) -> Experiment:
    """Read ``path`` at ``scale`` and expand it into cells whose run directories lie in
    ``out_dir/<name>/<scale>/``; every key is checked (nothing is built yet: see :func:`check`)."""
    path = Path(path)
    spec, w = _spec_at_scale(read_file(path), path, scale)
    name = spec.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise w.bad("name", "a folder name (letters, digits, _ . -)", name)
    task = spec.get("task")
    if task not in TASKS:
        raise w.bad(w.at("task"), f"one of {list(TASKS)}", task)
    for key in ("task_args", "train", "grid", "budget"):
        if not isinstance(spec.get(key, {}), dict):
            raise w.bad(w.at(key), "a table", spec[key])
    own = sorted(set(spec.get("train", {})) & OWN_FIELDS)
    if own:
        raise w.error(f"train must not set {own}: the experiment sets them (task, models, seeds, budget.steps)")
    steps, seconds = _budget(spec, w)
    seeds = _seeds(spec.get("seeds", [0]), w.at("seeds"), w)
    grid = _grid(spec.get("grid", {}), w)
    models = _models(spec.get("models"), grid, seeds, w)
    target, stop, metric = _target(spec, w)
    exp = Experiment(name=name, scale=scale, path=str(path), description=spec.get("description", ""),
                     task=task, metric=metric, target=target, stop_at_target=stop,
                     seconds=None if seconds is None else float(seconds), matching=spec.get("matching", ""),
                     position_eval=_position_eval(spec.get("position_eval"), w),
                     eval_at=_eval_at(spec.get("eval_at", []), w))
    exp.cells = _cells(spec, models, grid, seeds, steps, Path(out_dir) / name / scale, w)
    return exp


def _spec_at_scale(data: dict, path: Path, scale: str) -> tuple[dict, _Where]:
    """The file's top level deep-merged with its ``scales.<scale>`` table, and the wording for it."""
    w = _Where(path, scale)
    w.unknown(data, TOP_KEYS, "")
    scales = data.get("scales")
    if (not isinstance(scales, dict) or not set(SCALES) <= set(scales)
            or not set(scales) <= set(SCALES + OPTIONAL_SCALES)):
        raise w.bad("scales", f"a table with the keys {list(SCALES)} (and optionally {list(OPTIONAL_SCALES)})",
                    sorted(scales) if isinstance(scales, dict) else scales)
    if scale not in scales:
        raise w.error(f"this file has no {scale} scale; its scales are {sorted(scales)}")
    for s in scales:
        if not isinstance(scales[s], dict):
            raise w.bad(f"scales.{s}", "a table", scales[s])
        w.unknown(scales[s], TOP_KEYS - {"name", "scales"}, f"scales.{s}.")
    spec = _merge({k: v for k, v in data.items() if k != "scales"}, scales[scale])
    return spec, _Where(path, scale, scales[scale])


def _budget(spec: dict, w: _Where) -> tuple[int, float | None]:
    budget = spec.get("budget", {})
    w.unknown(budget, BUDGET_KEYS, "budget.")
    steps = budget.get("steps", 1000)
    if not is_int(steps, 1):
        raise w.bad(w.at("budget") + ".steps", "an int >= 1", steps)
    seconds = budget.get("seconds")
    if seconds is not None and not (is_real(seconds) and math.isfinite(seconds) and seconds > 0):
        raise w.bad(w.at("budget") + ".seconds", "a number > 0", seconds)
    return steps, seconds


def _seeds(seeds, key: str, w: _Where) -> list[int]:
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(is_int(s, 0) for s in seeds)):
        raise w.bad(key, "a non-empty list of distinct ints >= 0", seeds)
    return seeds


def _grid(grid: dict, w: _Where) -> dict:
    for key, values in grid.items():
        if not key.startswith(GRID_PREFIXES) or key.endswith("."):
            raise w.error(f"unknown grid key {key!r}; a grid key is task_args.<option>, "
                          f"model_args.<option> or train.<TrainConfig field>")
        if key.startswith("train.") and key[6:] in OWN_FIELDS:
            raise w.error(f"grid key {key!r} is set by the experiment itself")
        if not isinstance(values, list) or not values:
            raise w.bad(f"{w.at('grid')}.{key}", "a non-empty list of values", values)
    return grid


def _models(models, grid: dict, seeds: list[int], w: _Where) -> dict:
    if not isinstance(models, dict) or not models:
        raise w.bad(w.at("models"), "a table of model labels, e.g. [models.lstm] model = 'lstm'", models)
    for label, m in models.items():
        # the label starts each run's folder name: a character no file name may hold fails here
        if not label.strip() or label in (".", "..") or any(c in label for c in "/\\") or any(
                ord(c) < 32 or ord(c) == 127 for c in label):
            raise w.error(f"model label {label!r} cannot start a folder name (it is empty or holds a NUL, "
                          f"control character or slash); use letters, digits, _ . -")
        if not isinstance(m, dict):
            raise w.bad(f"models.{label}", "a table", m)
        _model(label, m, grid, w)
        # a model's own seeds (e.g. one seed where three at shorter settings already show chance)
        _seeds(m.get("seeds", seeds), f"models.{label}.seeds", w)
    return models


def _model(label: str, m: dict, grid: dict, w: _Where) -> None:
    w.unknown(m, MODEL_KEYS, f"models.{label}.")
    if m.get("model", label) not in MODELS:
        raise w.bad(f"models.{label}.model", f"one of {list(MODELS)}", m.get("model", label))
    for key in ("model_args", "train"):
        if not isinstance(m.get(key, {}), dict):
            raise w.bad(f"models.{label}.{key}", "a table", m[key])
    own = sorted(set(m.get("train", {})) & OWN_FIELDS)
    if own:
        raise w.error(f"models.{label}.train must not set {own}")
    # a model's own values of a swept key (e.g. attention only at the delays it fits in memory)
    if not isinstance(m.get("grid", {}), dict):
        raise w.bad(f"models.{label}.grid", "a table", m["grid"])
    for key, values in m.get("grid", {}).items():
        if key not in grid:
            raise w.error(f"models.{label}.grid key {key!r} is not a key of grid ({sorted(grid)})")
        if not isinstance(values, list) or not values:
            raise w.bad(f"models.{label}.grid.{key}", "a non-empty list of values", values)


def _target(spec: dict, w: _Where) -> tuple[Target | None, bool, str]:
    target = None
    if spec.get("target") is not None:
        try:
            target = parse_target(spec["target"], f"{w.text}: {w.at('target')}")
        except ValueError as e:
            raise ExperimentError(str(e)) from None
    stop = spec.get("stop_at_target", False)
    if not isinstance(stop, bool):
        raise w.bad(w.at("stop_at_target"), "true or false", stop)
    if stop and target is None:
        raise w.error("stop_at_target is true but no target is set")
    metric = spec.get("metric", target.metric if target else "loss")
    if not isinstance(metric, str) or not metric:
        raise w.bad(w.at("metric"), "a metric name", metric)
    for key in ("description", "matching"):
        if not isinstance(spec.get(key, ""), str):
            raise w.bad(key, "a string", spec[key])
    return target, stop, metric


def _position_eval(position, w: _Where) -> dict | None:
    if position is None:
        return None
    if not isinstance(position, dict):
        raise w.bad(w.at("position_eval"), "a table with bins (and optionally rows)", position)
    w.unknown(position, POSITION_KEYS, "position_eval.")
    try:
        position = {"bins": check_bins(position.get("bins"), f"{w.at('position_eval')}.bins"),
                    "rows": position.get("rows")}
        check_int(f"{w.at('position_eval')}.rows", position["rows"], allow_none=True)
    except ValueError as e:
        raise w.error(str(e)) from None
    return position


def _eval_at(eval_at, w: _Where) -> list[dict]:
    if not isinstance(eval_at, list) or any(not isinstance(o, dict) or not o for o in eval_at):
        raise w.bad(w.at("eval_at"), "a list of non-empty tables of task options (e.g. [{ seq_len = 512 }])",
                    eval_at)
    return eval_at


def _cells(spec: dict, models: dict, grid: dict, seeds: list[int], steps: int, folder: Path,
           w: _Where) -> list[Cell]:
    """One cell per model, combination of grid values and seed, each a checked TrainConfig."""
    train, keys, cells = spec.get("train", {}), list(grid), []
    for label, m in models.items():
        own_grid = {**grid, **m.get("grid", {})}
        for combo in itertools.product(*(own_grid[k] for k in keys)):
            swept = dict(zip(keys, combo))
            for seed in m.get("seeds", seeds):
                config = {**RUN_DEFAULTS, **train, **m.get("train", {}),
                          "task": spec["task"], "task_args": dict(spec.get("task_args", {})),
                          "model": m.get("model", label), "model_args": dict(m.get("model_args", {})),
                          "steps": steps, "seed": seed, "out_dir": str(folder)}
                for k, v in swept.items():
                    group, _, option = k.partition(".")
                    if group == "train":
                        config[option] = v
                    else:
                        config[group][option] = v
                cell = Cell(label=label, swept=swept, seed=seed, config=config, size=str(m.get("size", "")))
                config["run_name"] = cell.name
                try:
                    TrainConfig.from_dict(config)
                except (TypeError, ValueError) as e:
                    raise w.error(f"the run {cell.name!r} (train, models.{label}.train, grid): {e}") from None
                cells.append(cell)
    seen = collections.Counter(c.name for c in cells)
    dup = sorted(n for n, k in seen.items() if k > 1)
    if dup:
        raise w.error(f"grid values give the same run name twice: {dup}; use values that differ as text")
    return cells


def check(exp: Experiment) -> None:
    """Build every cell's task and model once (before any run starts) and check that the task
    reports the target's and the report's metric; fills ``exp.parameters`` (label -> count)."""
    where = f"experiment file {exp.path!r}"
    tasks, counts = {}, {}
    for cell in exp.cells:
        c = cell.config   # checked by load_experiment; a TrainConfig only per distinct task and model
        key = json.dumps([[c["task"], c["task_args"]], c["model"], c["model_args"]], sort_keys=True, default=repr)
        if key in counts:
            continue
        cfg = TrainConfig.from_dict(c)
        tkey = json.dumps([cfg.task, cfg.task_args], sort_keys=True, default=repr)
        try:
            if tkey not in tasks:
                tasks[tkey] = build_task(cfg.task, **cfg.task_args)
            model = build_model(cfg.model, **tasks[tkey].model_io(), **cfg.model_args)
        except (TypeError, ValueError) as e:
            raise ExperimentError(f"{where}: run {cell.name!r} (model {cfg.model!r}, model_args "
                                  f"{cfg.model_args}, task_args {cfg.task_args}): {e}") from None
        for options in exp.eval_at:
            merged = json.dumps([cfg.task, {**cfg.task_args, **options}], sort_keys=True, default=repr)
            if merged not in tasks:
                try:
                    tasks[merged] = build_task(cfg.task, **{**cfg.task_args, **options})
                except (TypeError, ValueError) as e:
                    raise ExperimentError(f"{where}: eval_at entry {options}: {e}") from None
        counts[key] = num_parameters(model)   # the count the run and its report give
        del model
        exp.parameters.setdefault(cell.label, counts[key])
        if exp.position_eval is not None:
            try:
                plan(tasks[tkey], exp.position_eval["bins"], exp.position_eval["rows"])
            except (TypeError, ValueError) as e:
                raise ExperimentError(f"{where}: position_eval (task {cfg.task!r}, task_args "
                                      f"{cfg.task_args}): {e}") from None
        names = reported_metrics(tasks[tkey])
        for what, metric in (("target", exp.target.metric if exp.target else None), ("metric", exp.metric)):
            if metric is not None and names is not None and metric not in names:
                raise ExperimentError(f"{where}: {what} names metric {metric!r}, which task {cfg.task!r} "
                                      f"does not report; it reports {sorted(names)}")


def reported_metrics(task) -> set[str] | None:
    """The metric names ``task.metrics`` returns, from one validation batch and a zero output of
    the task's output size (None when that output shape is not one the task accepts)."""
    gen = torch.Generator().manual_seed(0)
    _, y = task.get_batch("val", 1, gen)
    out = torch.zeros(*y.shape, task.model_io()["output_size"])
    try:
        return set(task.metrics(out, y))
    except (RuntimeError, ValueError, IndexError):
        return None
