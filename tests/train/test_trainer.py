"""The trainer: exact resume, NaN guard, corrupt checkpoints, schedule, run directory."""
import json
import math

import pytest
import torch

from matrec.train import CheckpointError, NonFiniteError, TrainConfig, Trainer, load_checkpoint, lr_factor
from matrec.train.checkpoint import flatten_tensors, unflatten_tensors
from support import SRC, kill_after_first_checkpoint
from support import tiny_config as tiny


# dropout: training draws from torch's global RNG too, so its checkpointed state must be restored
@pytest.mark.parametrize("model_args", [{"hidden_size": 16},
                                        {"hidden_size": 16, "num_layers": 2, "dropout": 0.5}])
def test_kill_and_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, model_args):
    full = Trainer(tiny(tmp_path, "full", model_args=model_args)).train()
    # The "kill": an interrupt while drawing the 7th training batch. Steps 5 and 6 were logged but
    # not checkpointed, so the resume restarts from step 4 and must drop them before redoing them.
    killed = Trainer(tiny(tmp_path, "killed", model_args=model_args))
    draw, calls = killed.task.get_batch, []

    def dies_at_seventh(split, *args):
        calls.append(split)
        if calls.count("train") == 7:
            raise KeyboardInterrupt
        return draw(split, *args)

    killed.task.get_batch = dies_at_seventh
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    logged = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 6
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')     # a kill in the middle of appending a record
    resumed = Trainer.resume(tmp_path / "killed")
    assert resumed.step == 4
    summary = resumed.train()
    assert summary["status"] == full["status"] == "completed"
    a = (tmp_path / "full" / "metrics.jsonl").read_bytes()
    b = (tmp_path / "killed" / "metrics.jsonl").read_bytes()
    assert a == b
    assert summary["eval"] == full["eval"]


def test_resume_of_a_finished_shorter_run_extends_it_exactly(tmp_path):
    Trainer(tiny(tmp_path, "full", steps=10, optimizer="rmsprop", warmup_steps=3)).train()
    paused = Trainer(tiny(tmp_path, "short", steps=10, optimizer="rmsprop", warmup_steps=3))
    assert paused.train(until=6)["status"] == "paused"     # checkpoints at the pause
    Trainer.resume(tmp_path / "short").train()
    assert (tmp_path / "full" / "metrics.jsonl").read_bytes() == (tmp_path / "short" / "metrics.jsonl").read_bytes()


def test_a_time_budget_stops_at_the_step_that_reaches_it_evaluated_and_checkpointed(tmp_path, monkeypatch):
    # a fake clock that moves 1 s per call: the budget of 5.5 s runs out within a few steps, at a
    # step that is neither an evaluation (every 4) nor a checkpoint (every 4) step of the config
    clock = iter(range(10**6))
    monkeypatch.setattr("matrec.train.trainer.time.perf_counter", lambda: float(next(clock)))
    trainer = Trainer(tiny(tmp_path, "timed", steps=12, eval_every=4, ckpt_every=4))
    summary = trainer.train(seconds=5.5)
    stop = trainer.step
    assert summary["status"] == "paused" and 0 < stop < 12 and stop % 4 != 0
    assert trainer.elapsed >= 5.5
    records = [json.loads(line) for line in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["step"] == stop and trainer.last_eval == {k: v for k, v in evals[-1].items()
                                                               if k not in ("kind", "step")}
    assert load_checkpoint(tmp_path / "timed")[0]["step"] == stop
    with pytest.raises(ValueError, match="seconds must be a finite number > 0"):
        trainer.train(seconds=0)


def test_nan_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny(tmp_path, "nan"))
    trainer.train(until=4)                       # checkpoint at step 4
    before, ckpt_dir, _ = load_checkpoint(tmp_path / "nan")
    files = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    with torch.no_grad():
        trainer.model.head.weight[0, 0] = float("nan")   # poison: the next loss is NaN
    with pytest.raises(NonFiniteError, match=r"training loss is nan at step 5.*last good checkpoint \(step 4\)"):
        trainer.train()
    meta, ckpt_dir2, _ = load_checkpoint(tmp_path / "nan")
    assert meta["step"] == 4 and ckpt_dir2 == ckpt_dir
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == files
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "non-finite"
    again = Trainer.resume(tmp_path / "nan")          # loadable, finite, trains on
    assert all(torch.isfinite(p).all() for p in again.model.parameters())
    assert again.train(until=6)["step"] == 6


def test_inf_gradient_with_a_finite_loss_stops_before_the_optimiser_step(tmp_path):
    trainer = Trainer(tiny(tmp_path, "inf"))
    trainer.train(until=4)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteError, match=r"gradient norm is inf at step 5.*\(step 4\)"):
        trainer.train()
    assert trainer.step == 4      # no optimiser step was taken with the bad gradient
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert load_checkpoint(tmp_path / "inf")[0]["step"] == 4


def test_weights_made_non_finite_by_a_step_are_never_checkpointed(tmp_path):
    trainer = Trainer(tiny(tmp_path, "w"))
    trainer.train(until=4)
    files = {p.name: p.read_bytes() for p in load_checkpoint(tmp_path / "w")[1].iterdir()}
    step = trainer.optimizer.step

    def overflows(*args, **kwargs):    # finite loss and gradient, but the update overflows
        step(*args, **kwargs)
        if trainer.step == 7:           # the update that leads to step 8, a checkpoint step
            with torch.no_grad():
                trainer.model.head.bias.fill_(float("inf"))

    trainer.optimizer.step = overflows
    with pytest.raises(NonFiniteError, match=r"parameter 'head.bias' after the optimiser step is "
                                              r"non-finite at step 8.*\(step 4\)"):
        trainer.train()
    meta, ckpt_dir, _ = load_checkpoint(tmp_path / "w")
    assert meta["step"] == 4 and {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == files


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    Trainer(tiny(tmp_path, "c", steps=4)).train()
    _, ckpt_dir, _ = load_checkpoint(tmp_path / "c")
    weights = ckpt_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="model.safetensors does not match the SHA-256"):
        Trainer.resume(tmp_path / "c")
    (ckpt_dir / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json is not valid JSON"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_run_directory_layout(tmp_path):
    cfg = tiny(tmp_path, "layout", steps=4, tensorboard=True, plot=True)
    summary = Trainer(cfg).train()
    run = tmp_path / "layout"
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4]
    assert {"grad_norm/rnn", "grad_norm/head", "lr", "loss"} <= set(records[0])
    assert set(records[-1]) == {"kind", "step", "loss", "recall"}
    assert any((run / "tb").iterdir())
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "checkpoints" / "latest.json").exists()


def test_loss_falls(tmp_path):
    summary = Trainer(tiny(tmp_path, "learn", steps=60, lr=1e-2, eval_every=60)).train()
    first = json.loads((tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["eval"]["loss"] < 0.8 * first["loss"]


def test_schedule_warmup_then_cosine_to_min_ratio():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(109, cfg) == pytest.approx(0.1)
    mid = lr_factor(10 + 99 // 2, cfg)
    assert 0.1 < mid < 1.0
    values = [lr_factor(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stpes'\]"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Trainer(tiny(tmp_path, "x", optimizer="sgdd"))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=-1)


def test_nested_state_round_trips_through_flat_tensors():
    state = (torch.randn(1, 2, 3), [torch.randn(4), {"c": torch.randn(2, 2)}], None)
    flat = {}
    spec = json.loads(json.dumps(flatten_tensors(state, "stream", flat)))
    back = unflatten_tensors(spec, flat)
    assert isinstance(back, tuple) and back[2] is None
    assert torch.equal(back[0], state[0]) and torch.equal(back[1][1]["c"], state[1][1]["c"])


def test_stream_task_carries_state_and_resumes_exactly(tmp_path):
    """TBPTT on a stream task: the state is carried (detached) and checkpointed with the cursor."""
    kw = dict(task="forecast", task_args={"seq_len": 8, "length": 4096, "lag": 20}, model="gru",
              model_args={"hidden_size": 8}, batch_size=4, steps=8)
    full = Trainer(tiny(tmp_path, "full", **kw))
    full.train()
    assert full.stream_state is not None and not full.stream_state.requires_grad
    assert full.task.state_dict()["cursor"]["train"] == 8
    killed = Trainer(tiny(tmp_path, "killed", **kw))
    killed.train(until=6)
    resumed = Trainer.resume(tmp_path / "killed")
    assert resumed.task.state_dict()["cursor"]["train"] == 6
    assert torch.equal(resumed.stream_state, killed.stream_state)
    resumed.train()
    assert (tmp_path / "full" / "metrics.jsonl").read_bytes() == (tmp_path / "killed" / "metrics.jsonl").read_bytes()
    # carrying matters: a run that starts every batch from a zero state computes other losses
    fresh = Trainer(tiny(tmp_path, "fresh", **kw))
    fresh.task.stream = False
    fresh.train()
    assert (tmp_path / "fresh" / "metrics.jsonl").read_bytes() != (tmp_path / "full" / "metrics.jsonl").read_bytes()


def test_mornn_groups_monitoring_and_exact_resume_across_refolds(tmp_path):
    kw = dict(model="mornn", model_args={"hidden_size": 8, "refold_every": 3}, optimizer="rmsprop",
              lr=2e-3, orthogonal_lr_scale=0.1, log_every=1)
    full = Trainer(tiny(tmp_path, "full", **kw))
    groups = {g.get("name"): g for g in full.optimizer.param_groups}
    assert groups["orthogonal"]["base_lr"] == pytest.approx(2e-4) and groups["other"]["base_lr"] == 2e-3
    # the Trainer opts its optimiser in to MORNN's step tracking (kept matrices rebuilt after a step)
    from matrec.nn.orthogonal import _count_optimizer_step
    assert _count_optimizer_step in full.optimizer._optimizer_step_post_hooks.values()
    full.train()
    record = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= record["mornn/rnn.weight_hh_l0/orth_error"] < 1e-5
    # stop at step 5 (between refolds at 3 and 6) and resume: the same bits as the full run
    Trainer(tiny(tmp_path, "killed", **kw)).train(until=5)
    Trainer.resume(tmp_path / "killed").train()
    assert (tmp_path / "full" / "metrics.jsonl").read_bytes() == (tmp_path / "killed" / "metrics.jsonl").read_bytes()


def test_compiled_run_checkpoints_the_bare_model(tmp_path):
    trainer = Trainer(tiny(tmp_path, "compiled", steps=2, compile=True, model="rnn"))
    assert trainer.train()["status"] == "completed"
    again = Trainer.resume(tmp_path / "compiled")      # keys load into an uncompiled model
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), again.model.state_dict().items()):
        assert not name.startswith("_orig_mod") and torch.equal(a, b)


@pytest.mark.parametrize("task, args", [
    ("adding", {"length": 20}), ("selective_copy", {}), ("assoc_recall", {}), ("seq_digits", {}),
    ("forecast", {"seq_len": 16, "length": 8192, "lag": 20}),
    ("text_stream", {"vocab_size": 300, "seq_len": 16}),
])
def test_every_kind_of_task_trains_checkpoints_and_resumes(tmp_path, task, args):
    if task.startswith("text"):
        words = "the cat sat on a mat and a dog ran far away".split()
        lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(400)]
        (tmp_path / "t.txt").write_text("\n".join(lines))
        args = {**args, "path": str(tmp_path / "t.txt")}
    cfg = tiny(tmp_path, task, task=task, task_args=args, model="gru", steps=4, batch_size=4)
    summary = Trainer(cfg).train()
    assert summary["status"] == "completed" and all(math.isfinite(v) for v in summary["eval"].values())
    assert Trainer.resume(tmp_path / task).step == 4


def test_a_save_killed_midway_leaves_the_previous_checkpoint_pointed_to(tmp_path, monkeypatch):
    import safetensors.torch
    trainer = Trainer(tiny(tmp_path, "k"))
    trainer.train(until=4)
    root = tmp_path / "k" / "checkpoints"
    real = safetensors.torch.save_file

    def dies(*args, **kwargs):
        raise KeyboardInterrupt   # a kill while the state tensors are being written

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(until=8)
    meta, ckpt_dir, _ = load_checkpoint(root)
    assert meta["step"] == 4 and ckpt_dir.name == "step-00000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000004"]
    # debris of a harder kill (no cleanup ran) and a step folder that latest.json never pointed
    # to are both cleared by the next save, which then points at its own complete folder
    (root / ".step-00000008.abc.tmp").mkdir()
    (root / "step-00000008").mkdir()
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    resumed = Trainer.resume(tmp_path / "k")
    resumed.train(until=8)
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000008"]
    assert load_checkpoint(root)[0]["step"] == 8


def _head_dtypes(trainer):
    dtypes = []
    trainer.model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    return dtypes


def test_cpu_runs_stay_float32_with_amp_on(tmp_path):
    trainer = Trainer(tiny(tmp_path, "cpu", steps=2, amp=True, device="cpu"))
    dtypes = _head_dtypes(trainer)
    trainer.train()
    assert dtypes and set(dtypes) == {torch.float32}


@pytest.mark.cuda
def test_cuda_run_trains_under_bf16_autocast_and_resumes(tmp_path):
    trainer = Trainer(tiny(tmp_path, "gpu", device="cuda"))
    dtypes = _head_dtypes(trainer)
    assert trainer.train(until=8)["status"] == "paused"
    assert trainer.device.type == "cuda" and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())   # fp32 master weights
    resumed = Trainer.resume(tmp_path / "gpu")
    assert resumed.step == 8 and resumed.train()["status"] == "completed"
    plain = Trainer(tiny(tmp_path, "fp32", device="cuda", amp=False, steps=2))
    dtypes = _head_dtypes(plain)
    plain.train()
    assert set(dtypes) == {torch.float32}


def test_each_process_takes_its_own_rows_of_the_global_batch(tmp_path):
    from matrec.train.distributed import DistInfo
    trainer = Trainer(tiny(tmp_path, "rows", batch_size=8))
    x_all, y_all = trainer.task.get_batch("train", 8, torch.Generator().manual_seed(5))
    trainer.local_batch = 4
    for rank in (0, 1):      # what rank r of a 2-process run draws (no process group needed here)
        trainer.dist = DistInfo(rank=rank, world_size=2)
        x, y, kwargs = trainer._batch("train", torch.Generator().manual_seed(5))
        assert kwargs == {}
        assert torch.equal(x, x_all[4 * rank:4 * rank + 4]) and torch.equal(y, y_all[4 * rank:4 * rank + 4])


@pytest.mark.slow
def test_a_process_killed_with_sigkill_resumes_to_the_uninterrupted_run(tmp_path):
    """A real kill: `matrec train` in its own process, SIGKILLed once a checkpoint exists, resumed
    by a fresh process; the metrics are byte-identical to an uninterrupted run's."""
    import os
    import subprocess
    import sys

    cfg = tiny(tmp_path, "killed", steps=150, ckpt_every=10, eval_every=50, log_every=5)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cli = [sys.executable, "-m", "matrec.cli", "train"]
    step = kill_after_first_checkpoint(["train", "--config", str(tmp_path / "cfg.json")], tmp_path / "killed")
    assert 10 <= step < 150 and not (tmp_path / "killed" / "summary.json").exists(), "not killed mid-run"
    done = subprocess.run(cli + ["--resume", str(tmp_path / "killed")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    Trainer(tiny(tmp_path, "full", steps=150, ckpt_every=10, eval_every=50, log_every=5)).train()
    assert (tmp_path / "full" / "metrics.jsonl").read_bytes() == (tmp_path / "killed" / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_gradients_are_clipped_to_grad_clip_before_the_step(tmp_path, clip):
    trainer = Trainer(tiny(tmp_path, f"clip{clip}", steps=4, grad_clip=clip, log_every=1))
    seen, step = [], trainer.optimizer.step

    def records_norm(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(*args, **kwargs)

    trainer.optimizer.step = records_norm
    trainer.train()
    logged = [json.loads(l)["grad_norm"] for l in (tmp_path / f"clip{clip}" / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "train"]
    assert len(seen) == len(logged) == 4 and all(g > 0.05 for g in logged)   # logged: before clipping
    if clip:
        assert seen == pytest.approx([clip] * 4, rel=1e-4)
    else:                                                  # 0 turns clipping off
        assert seen == pytest.approx(logged, rel=1e-5)


def test_every_group_follows_the_schedule_at_its_own_peak(tmp_path):
    cfg = tiny(tmp_path, "sched", model="mornn", model_args={"hidden_size": 8}, steps=6, warmup_steps=2,
               log_every=1, lr=1e-2, orthogonal_lr_scale=0.25, min_lr_ratio=0.2)
    trainer = Trainer(cfg)
    used, step = [], trainer.optimizer.step

    def records_lr(*args, **kwargs):
        used.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})
        return step(*args, **kwargs)

    trainer.optimizer.step = records_lr
    trainer.train()
    factors = [lr_factor(s, cfg) for s in range(6)]
    assert [u["other"] for u in used] == pytest.approx([1e-2 * f for f in factors])
    assert [u["orthogonal"] for u in used] == pytest.approx([2.5e-3 * f for f in factors])
    logged = [json.loads(l)["lr"] for l in (tmp_path / "sched" / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "train"]
    assert logged == pytest.approx([u[trainer.optimizer.param_groups[0]["name"]] for u in used])
    assert factors[0] == pytest.approx(0.5) and factors[-1] == pytest.approx(0.2)


def test_a_run_without_carried_state_resumes_on_another_number_of_processes(tmp_path, monkeypatch):
    from matrec.train import trainer as trainer_module
    # what a 2-process run checkpoints: one (empty, or carried) state per process
    monkeypatch.setattr(trainer_module, "all_gather_object", lambda obj, info: [obj, obj])
    Trainer(tiny(tmp_path, "plain", steps=4)).train()
    stream = dict(task="forecast", task_args={"seq_len": 8, "length": 4096, "lag": 20}, model="gru",
                  batch_size=4, steps=4)
    Trainer(tiny(tmp_path, "stream", **stream)).train()
    monkeypatch.undo()
    assert Trainer.resume(tmp_path / "plain", steps=6).train()["step"] == 6   # a world of one
    with pytest.raises(ValueError, match="stream state of 2 process"):
        Trainer.resume(tmp_path / "stream")


def test_one_validation_for_python_files_and_checkpoints(tmp_path):
    import numpy as np
    cfg = TrainConfig(lr=np.float32(0.5), steps=np.int64(3), out_dir=tmp_path)   # a script's numbers
    assert type(cfg.lr) is float and type(cfg.steps) is int and cfg.out_dir == str(tmp_path)
    for kwargs, err, match in (({"grad_clip": float("nan")}, ValueError,
                                "grad_clip must be a finite number >= 0, got nan"),
                               ({"weight_decay": float("inf")}, ValueError, "weight_decay must be a finite"),
                               ({"progress": "no"}, TypeError, "progress must be a bool"),
                               ({"task_args": {1: 2}}, TypeError, "task_args keys must be option names"),
                               ({"device": "gpu"}, ValueError, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
                               ({"run_name": ".."}, ValueError, "run_name must be a folder name")):
        with pytest.raises(err, match=match):
            TrainConfig(**kwargs)
    cfg = tiny(tmp_path, "mutated")
    cfg.lr = float("nan")                 # assigned after construction: the trainer checks again
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        Trainer(cfg)
    with pytest.raises(TypeError, match="config must be a TrainConfig, got dict"):
        Trainer({"lr": 1e-3})
    Trainer(tiny(tmp_path, "saved", steps=4)).train()
    ckpt = tmp_path / "saved" / "checkpoints" / "step-00000004" / "state.json"
    meta = json.loads(ckpt.read_text())
    meta["config"]["seed"] = "0"
    ckpt.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="holds an invalid config: seed must be an int, got '0'"):
        Trainer.resume(tmp_path / "saved")
