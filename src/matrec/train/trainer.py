"""The training loop (nanoGPT-style: one readable loop, no callbacks).

    trainer = Trainer(TrainConfig(task="copy", model="lstm", steps=500))
    summary = trainer.train()          # -> dict; writes the run directory
    Trainer.resume("runs/copy-lstm-...").train()   # continue a killed run exactly

Per step: lr from the schedule -> batch (this process's rows of the global batch) -> forward under
bf16 autocast on CUDA -> NaN/Inf guard on the loss -> backward -> per-layer grad norms (log steps) ->
clip -> NaN/Inf guard on the grad norm -> optimiser step. Periodic evaluation and checkpoints (never of
non-finite weights); on a stream task the model's state is carried (detached) from one batch to the
next, and a task that packs documents into rows passes their starts to the model (``starts=``).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checks import check_int, check_real
from ..data.tasks import build_task
from ..models import build_model, num_parameters
from ..nn.mornn_training import orthogonality_report
from ..nn.orthogonal import track_optimizer_steps
from .checkpoint import (CheckpointError, flatten_tensors, latest_step, load_checkpoint,
                         load_model_weights, optimizer_from_flat, optimizer_to_flat, resolve_checkpoint,
                         save_checkpoint, unflatten_tensors, write_json_atomic)
from .config import TrainConfig
from .distributed import DistInfo, all_gather_object, all_mean, barrier, init_distributed
from .optim import OPTIMIZERS, lr_factor, param_groups
from .rundir import MetricsLog, RunDirError, RunLock, claim_new_run, plot_metrics, read_metrics


# steps per forward call when a long sequence is evaluated in pieces (Trainer.evaluate): the memory
# held is that of one piece, whatever the sequence's length
EVAL_CHUNK = 4096


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss, gradient or weight; the run stopped, its last checkpoint
    is good."""


class DeviceUnavailableError(ValueError):
    """The device asked for is not on this machine (no CUDA, fewer GPUs): the machine's doing, not
    the run's, so an experiment rerun on another machine tries the run again."""


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info is not None and info.enabled:
        name = f"cuda:{info.local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {name!r} asked for, but CUDA is not available here (use "
                                     f"cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {name!r} asked for, but this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def detach_state(state, device=None):
    """The carried recurrent state without its graph (truncated back-propagation), optionally
    moved to ``device``."""
    if isinstance(state, Tensor):
        return state.detach() if device is None else state.detach().to(device)
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s, device) for s in state)
    if isinstance(state, dict):
        return {k: detach_state(v, device) for k, v in state.items()}
    return state


def packed(starts: Tensor | None, device, rows: slice = slice(None)) -> dict:
    """The model's keywords for a batch's ``starts`` (packed documents, :meth:`Task.get_packed_batch`):
    ``{"starts": starts[rows]}`` on ``device``, or ``{}`` when the batch has none."""
    return {} if starts is None else {"starts": starts[rows].to(device, non_blocking=True)}


def layer_of(param_name: str) -> str:
    """The layer a parameter belongs to, for grad-norm monitoring: its module path cut to two
    levels (``rnn.weight_hh_l0`` -> ``rnn``; ``blocks.3.attn.qkv.weight`` -> ``blocks.3``)."""
    parts = param_name.split(".")[:-1] or [param_name]
    return ".".join(parts[:2])


def orthogonality_errors(model: nn.Module) -> dict[str, float]:
    """``matrec.orthogonality_report(model)`` under ``mornn/`` (per MORNN layer: max |W^T W - I|
    and gradient norms); empty for a model without MORNN layers."""
    return {f"mornn/{k}": float(v) for k, v in orthogonality_report(model).items()}


class Trainer:
    """Trains ``config.model`` on ``config.task`` and writes a run directory (rank 0 only).

    Args:
        config: the run's settings.
        run_dir: where to write; default ``<out_dir>/<run_name or task-model-timestamp>``.

    A new trainer writes a NEW run: its first :meth:`train` refuses a directory that already holds
    a run (a default, timestamped name moves on to ``<name>-2`` instead). Each :meth:`train` holds
    the directory's lock (:class:`~matrec.train.rundir.RunLock`) while it runs, so a second writer
    of the same run fails with an error naming the first.
    """

    def __init__(self, config: TrainConfig, run_dir: str | Path | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        config.validate()   # the fields may have been assigned after construction
        self.cfg = cfg = config
        self.dist = init_distributed("cuda" if resolve_device(cfg.device).type == "cuda" else "cpu")
        self.device = resolve_device(cfg.device, self.dist)
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of "
                             f"processes ({self.dist.world_size})")
        self.local_batch = cfg.batch_size // self.dist.world_size

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # model init and anything stochastic in training
        self.task = build_task(cfg.task, **cfg.task_args)
        self.model = build_model(cfg.model, **self.task.model_io(), **cfg.model_args).to(self.device)
        self.optimizer = OPTIMIZERS.get(cfg.optimizer)(param_groups(self.model, cfg), cfg)
        # MORNN keeps built matrices across no-grad forwards (evaluation): this optimiser's steps
        # must rebuild them even where a fused kernel bumps no version counter (the opt-in)
        track_optimizer_steps(self.optimizer)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.stream_state = None   # carried across batches on stream tasks
        self.last_eval: dict[str, float] = {}
        self.elapsed = 0.0         # training seconds, summed over resumes
        self._ckpt_step: int | None = None   # the last good checkpoint, named by the NaN/Inf guard

        # a name the user did not choose may move on to <name>-2 when taken; a chosen one may not
        self._rename = run_dir is None and cfg.run_name is None
        if run_dir is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{cfg.task}-{cfg.model}-{stamp}")
        self._set_run_dir(Path(run_dir))
        self._new_run = True        # until the first train() has claimed the directory
        self._lock: RunLock | None = None
        self.log: MetricsLog | None = None

        self.forward_module: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = DDP(self.model, device_ids=ids)
        if cfg.compile:
            self.forward_module = torch.compile(self.forward_module)

    # ------------------------------------------------------------------ setup / resume

    @classmethod
    def resume(cls, run_dir: str | Path, steps: int | None = None) -> "Trainer":
        """Re-open ``run_dir`` at its latest checkpoint; ``steps`` extends (or sets) the total.

        The config comes from the checkpoint, so the continued run is the same run. The run's lock
        is taken before the checkpoint is read (a writer could otherwise replace it meanwhile) and
        held until the end of the first :meth:`train`.
        """
        run = resolve_checkpoint(run_dir).parent.parent   # the run holds checkpoints/step-*/
        # only rank 0 writes; the process group does not exist yet, torchrun's RANK says which
        lock = RunLock(run).acquire() if int(os.environ.get("RANK", "0")) == 0 else None
        try:
            meta, ckpt_dir, tensors = load_checkpoint(run_dir)
            data = dict(meta["config"])
            if steps is not None:
                if isinstance(steps, int) and steps < int(meta["step"]):
                    raise ValueError(f"steps ({steps}) is below the checkpoint's step ({meta['step']}); a "
                                     f"resumed run can only go on (its metrics after step {steps} would be lost)")
                data["steps"] = steps
            try:
                config = TrainConfig.from_dict(data)
            except (TypeError, ValueError) as e:
                if steps is not None and "steps" in str(e):
                    raise
                raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} holds an invalid config: {e}") from None
            trainer = cls(config, run_dir=run)
            trainer._new_run = False    # this run is continued, in place
            trainer._load(meta, ckpt_dir, tensors)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        trainer._lock = lock
        return trainer

    def _set_run_dir(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.ckpt_root = run_dir / "checkpoints"

    def _acquire_run(self) -> None:
        """Become the run directory's one writer (rank 0; other ranks never write).

        A new run claims a directory holding no run. A continued run (resumed, or trained again
        by this trainer) must find its last checkpoint where this trainer left it: another writer
        may have moved the run on in between, and going on would overwrite what it wrote.
        """
        if not self.dist.is_main or self._lock is not None:
            return
        if self._new_run:
            path, self._lock = claim_new_run(self.run_dir, rename=self._rename)
            self._set_run_dir(path)
            self._new_run = False
            return
        self._lock = RunLock(self.run_dir).acquire()
        try:
            current = latest_step(self.ckpt_root)
            if current != self._ckpt_step:
                raise RunDirError(
                    f"run {str(self.run_dir)!r} is at step {current} now, not at step "
                    f"{self._ckpt_step} where this trainer took it: another process wrote it in "
                    f"between; resume it again to continue from step {current}")
        except BaseException:
            self._release_run()
            raise

    def claim(self) -> Path:
        """Become the run directory's writer now and stay it until :meth:`release` (``train`` and
        ``save`` otherwise take the run's lock and drop it when they return): for a caller that
        writes its own files beside the run, before and after training. Returns the folder."""
        self._acquire_run()
        self._claimed = True
        return self.run_dir

    def release(self) -> None:
        """Stop being the run directory's writer (after :meth:`claim`)."""
        self._claimed = False
        self._release_run()

    def _release_run(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _load(self, meta: dict, ckpt_dir: Path, tensors: dict[str, Tensor]) -> None:
        missing = sorted({"rng.data", "rng.torch"} - set(tensors))
        if missing:
            raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} is corrupt: state.safetensors lacks "
                                  f"{missing}")
        load_model_weights(self.model, ckpt_dir)
        optimizer_from_flat(self.optimizer, meta["optimizer"], tensors)
        self.step = self._ckpt_step = int(meta["step"])
        self.elapsed = float(meta.get("elapsed", 0.0))
        self.last_eval = dict(meta.get("last_eval", {}))
        self.data_gen.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.task.load_state_dict(meta.get("task_state", {}))
        # one carried state per process (each holds the state of its own rows of the batch); a
        # task that carries nothing can resume on any number of processes (the batch is global)
        states = unflatten_tensors(meta["stream_states"], tensors, self.device)
        if all(s is None for s in states):
            self.stream_state = None
            return
        if len(states) != self.dist.world_size:
            raise ValueError(f"this checkpoint carries the stream state of {len(states)} process(es); "
                             f"resume it with the same number of processes, not {self.dist.world_size}")
        self.stream_state = states[self.dist.rank]

    def _open_log(self) -> None:
        if self.log is not None or not self.dist.is_main:
            return
        write_json_atomic(self.run_dir / "config.json", self.cfg.to_dict())
        self.log = MetricsLog(self.run_dir, tensorboard=self.cfg.tensorboard,
                              purge_step=self.step + 1 if self.step else None)
        # A resumed run drops what the killed run logged after its checkpoint, and any record the
        # continued run would not write itself (the end-of-run evaluation of a shorter run).
        self.log.truncate(lambda r: r["step"] <= self.step and self._logs_at(r["kind"], r["step"]))

    def _logs_at(self, kind: str, step: int) -> bool:
        every = self.cfg.log_every if kind == "train" else self.cfg.eval_every
        return step % every == 0 or step == self.cfg.steps

    # ------------------------------------------------------------------ pieces of a step

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        """This process's rows of the global batch (every process draws the same global batch), and
        the model's keywords for it: ``{"starts": ...}`` for packed documents, else none."""
        x, y, starts = self.task.get_packed_batch(split, self.cfg.batch_size, generator)
        lo = self.dist.rank * self.local_batch
        rows = [t[lo:lo + self.local_batch].to(self.device, non_blocking=True) for t in (x, y)]
        return (*rows, packed(starts, self.device, slice(lo, lo + self.local_batch)))

    def _layer_grad_norms(self) -> dict[str, float]:
        sq = defaultdict(float)
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                sq[layer_of(name)] += float(p.grad.detach().float().pow(2).sum())
        return {f"grad_norm/{k}": math.sqrt(v) for k, v in sq.items()}

    def _stop(self, what: str, value: float | str, step: int | None = None) -> None:
        good = f"step {self._ckpt_step}" if self._ckpt_step is not None else "none written yet"
        message = (f"{what} is {value} at step {step or self.step + 1}; training stopped. The last good "
                   f"checkpoint ({good}) in {self.ckpt_root} is intact. Lower the learning rate, "
                   f"tighten grad_clip, or check the data.")
        self._finish(status="non-finite", message=message)
        raise NonFiniteError(message)

    # ------------------------------------------------------------------ evaluation / checkpoints

    @torch.no_grad()
    def evaluate(self, batches: int | None = None, task_args: dict | None = None,
                 chunk: int = EVAL_CHUNK) -> dict[str, float]:
        """Mean task metrics over ``batches`` validation batches (a fixed set: the same every call).

        Stream tasks are read from the start of the validation stream with the state carried.
        A ``chunkable`` task (copy: delays up to millions of steps) is read ``chunk`` steps at a time
        with the state carried, forward only, so the memory held does not grow with the length.
        ``task_args`` overrides some of the run's task options for this evaluation alone (the task
        is rebuilt with them), e.g. ``{"seq_len": 1024}`` to measure length extrapolation.
        """
        batches = check_int("batches", self.cfg.eval_batches if batches is None else batches)
        if task_args is not None and not isinstance(task_args, dict):
            raise TypeError(f"task_args must be a dict of task options, got {type(task_args).__name__}")
        task = build_task(self.cfg.task, **{**self.cfg.task_args, **task_args}) if task_args else self.task
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        saved = task.state_dict()
        task.reset("val")
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = defaultdict(float)
        state = None
        for _ in range(batches):
            if task.chunkable:
                metrics = self._evaluate_chunked(task, gen, chunk)
            else:
                x, y, starts = task.get_packed_batch("val", self.cfg.batch_size, gen)  # full batch on every rank
                x, y = x.to(self.device), y.to(self.device)
                with self._autocast():
                    out, new_state = self.model(x, state, **packed(starts, self.device))
                if task.stream:
                    state = new_state
                metrics = task.metrics(out.float(), y)
            for k, v in metrics.items():
                totals[k] += v / batches
        task.load_state_dict(saved)
        self.model.train(was_training)
        return task.summarize(dict(totals))

    def _evaluate_chunked(self, task, gen: torch.Generator, chunk: int) -> dict[str, float]:
        """One validation batch of ``task`` read in pieces of ``chunk`` steps, the state carried."""
        sums: dict[str, list] = defaultdict(lambda: [0.0, 0])
        state = None
        for x, y in task.chunks("val", self.cfg.batch_size, gen, chunk):   # x, y: [B, <= chunk]
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                out, state = self.model(x, state)
            for k, (s, c) in task.metric_sums(out.float(), y).items():
                sums[k][0] += s
                sums[k][1] += c
        return {k: s / max(c, 1) for k, (s, c) in sums.items()}

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank waits for it).

        Called on its own (not from :meth:`train`), it takes the run's lock for the write, as
        :meth:`train` does.
        """
        if self._lock is not None or not self.dist.is_main:
            return self._save()
        self._acquire_run()
        try:
            return self._save()
        finally:
            self._release_run()

    def _save(self) -> Path | None:
        path = None
        states = all_gather_object(detach_state(self.stream_state, "cpu"), self.dist)
        if self.dist.is_main:
            tensors: dict[str, Tensor] = {
                "rng.torch": torch.get_rng_state(), "rng.data": self.data_gen.get_state()}
            if self.device.type == "cuda":
                # this process's device only: every rank seeds and steps its own device alike, so
                # rank 0's state is every rank's (get_rng_state_all would open a CUDA context on
                # every GPU from rank 0 and hand rank r a device it never used)
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            meta = {
                "step": self.step,
                "config": self.cfg.to_dict(),
                "optimizer": optimizer_to_flat(self.optimizer, tensors),
                "task_state": self.task.state_dict(),
                "stream_states": flatten_tensors(states, "stream", tensors),
                "last_eval": self.last_eval,
                "elapsed": self.elapsed,
                "lr_factor": lr_factor(max(self.step - 1, 0), self.cfg),
            }
            tokenizer = self.task.tokenizer_json()
            if tokenizer is not None:   # a text task's vocabulary: the checkpoint converts without its data
                meta["tokenizer"] = tokenizer
            path = save_checkpoint(self.ckpt_root, model=self.model, tensors=tensors, meta=meta)
        self._ckpt_step = self.step
        barrier(self.dist)
        return path

    # ------------------------------------------------------------------ the loop

    def train(self, until: int | None = None, seconds: float | None = None) -> dict:
        """Train to ``until`` (default ``config.steps``), or until the training seconds (summed over
        resumes) reach ``seconds``: then the run evaluates at the step it stopped at (unless that
        step evaluated anyway) and checkpoints there. Returns the summary.

        Raises :class:`NonFiniteError` on a NaN/Inf loss or gradient, after writing the summary;
        the last checkpoint is left as it was.
        """
        cfg = self.cfg
        check_int("until", until, 0, allow_none=True)
        seconds = check_real("seconds", seconds, minimum=0, open_min=True, allow_none=True)
        until = cfg.steps if until is None else min(until, cfg.steps)
        claimed = getattr(self, "_claimed", False)   # by claim(): kept after this call
        self._acquire_run()
        try:
            return self._train(until, seconds)
        finally:
            if not claimed:
                self._release_run()

    def _train(self, until: int, seconds: float | None = None) -> dict:
        cfg = self.cfg
        self._open_log()
        self.model.train()
        stream = self.task.stream
        bar = None
        if cfg.progress and self.dist.is_main and until > self.step:
            from tqdm.auto import tqdm
            bar = tqdm(total=until, initial=self.step, desc=f"{cfg.model} on {cfg.task}",
                       dynamic_ncols=True, leave=False)
        t0 = time.perf_counter()
        try:
            while self.step < until:
                factor = lr_factor(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                x, y, kwargs = self._batch("train", self.data_gen)
                with self._autocast():
                    out, state = self.forward_module(x, self.stream_state if stream else None, **kwargs)
                    loss = self.task.loss(out, y)
                if stream:
                    self.stream_state = detach_state(state)
                loss_value = float(all_mean(loss.detach().float(), self.dist))
                if not math.isfinite(loss_value):
                    self._stop("the training loss", loss_value)
                self.optimizer.zero_grad(set_to_none=True)
                # a model with nothing to train (seasonal_naive with fit=False) still goes through
                # the loop, so its evaluations and run directory are those of any other model
                if loss.requires_grad:
                    loss.backward()
                record_step = self.step + 1
                logging = self._logs_at("train", record_step)
                layer_norms = self._layer_grad_norms() if logging and self.dist.is_main else {}
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
                if not math.isfinite(grad_norm):
                    self._stop("the gradient norm", grad_norm)
                self.optimizer.step()
                self.step = record_step

                if logging and self.log is not None:
                    self.log.write({"kind": "train", "step": self.step, "loss": loss_value,
                                    "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                                    **layer_norms, **orthogonality_errors(self.model)})
                out_of_time = seconds is not None and self.elapsed + time.perf_counter() - t0 >= seconds
                if self._logs_at("eval", self.step) or out_of_time:
                    self.last_eval = self.evaluate()
                    if self.log is not None:
                        self.log.write({"kind": "eval", "step": self.step, **self.last_eval})
                if self.step % cfg.ckpt_every == 0 or self.step == until or out_of_time:
                    # a finite loss and gradient can still step the weights to Inf/NaN (a huge lr):
                    # such weights must not replace the last good checkpoint
                    bad = next((n for n, p in self.model.named_parameters()
                                if not bool(torch.isfinite(p).all())), None)
                    if bad is not None:
                        self._stop(f"parameter {bad!r} after the optimiser step", "non-finite", self.step)
                    self.elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self._save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                if out_of_time:
                    break
        finally:
            if bar is not None:
                bar.close()
        self.elapsed += time.perf_counter() - t0
        return self._finish(status="completed" if self.step >= cfg.steps else "paused")

    def _finish(self, status: str, message: str = "") -> dict:
        summary = {
            "status": status, "message": message, "step": self.step, "steps": self.cfg.steps,
            "task": self.cfg.task, "model": self.cfg.model, "parameters": num_parameters(self.model),
            "baseline": self.task.baseline, "eval": self.last_eval,
            "train_seconds": round(self.elapsed, 3), "device": str(self.device),
            "world_size": self.dist.world_size, "run_dir": str(self.run_dir),
        }
        if self.dist.is_main and self.log is not None:
            self.log.close()
            self.log = None
            write_json_atomic(self.run_dir / "summary.json", summary)
            if self.cfg.plot:
                plot_metrics(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "plot.png",
                             title=f"{self.cfg.model} on {self.cfg.task}", baseline=summary["baseline"])
        return summary
