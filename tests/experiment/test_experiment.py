"""`matrec experiment run | report` end to end on tiny grids (a few steps per run)."""
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from matrec import cli
from matrec.experiment.paired import cell_name
from matrec.experiment.report import loss_spikes, write_report
from matrec.experiment.runner import RayBackend, _result_of, run_experiment, run_state
from matrec.experiment.spec import ExperimentError, check, load_experiment
from matrec.train import Trainer, TrainConfig
from matrec.train.checkpoint import load_checkpoint, load_model_weights
from matrec.train.rundir import read_metrics
from support import SHAKESPEARE_FILE, SRC, kill_after_first_checkpoint

TRAIN = {"batch_size": 8, "eval_every": 2, "eval_batches": 1, "log_every": 1, "ckpt_every": 2, "threads": 1}


def write_experiment(folder: Path, name="tiny", **over) -> Path:
    data = {"name": name, "task": "copy", "task_args": {"n_symbols": 3}, "seeds": [0, 1],
            "train": dict(TRAIN), "budget": {"steps": 4}, "grid": {"task_args.delay": [3, 5]},
            "models": {"rnn": {"model": "rnn", "model_args": {"hidden_size": 8}, "size": "hidden 8"},
                       "gru": {"model": "gru", "model_args": {"hidden_size": 4}}},
            "metric": "recall", "matching": "by hand", "scales": {"cpu": {}, "gpu": {"budget": {"steps": 100}}}}
    for key, value in over.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    return status, capsys.readouterr().out


def test_dry_run_lists_runs_and_states_then_run_skips_finished(tmp_path, capsys):
    path = write_experiment(tmp_path)
    out = tmp_path / "out"
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(out), "--dry-run")
    assert status == 0
    # state, run directory (and the run's estimated time where step times are measured)
    runs = [line.split()[:2] for line in text.splitlines() if line.startswith(("new", "partial", "done", "failed"))]
    assert [Path(p).name for _, p in runs] == [f"{m}-delay{d}-seed{s}" for m in ("rnn", "gru")
                                                for d in (3, 5) for s in (0, 1)]
    assert {state for state, _ in runs} == {"new"} and not out.exists()   # a dry run writes nothing
    assert "rnn: 737 parameters (hidden 8)" in text and "matched: by hand" in text

    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(out))[0] == 0
    folder = out / "tiny" / "cpu"
    for run in folder.iterdir():
        status_file = json.loads((run / "status.json").read_text())
        assert status_file["state"] == "done" and status_file["step"] == 4
        assert json.loads((run / "cell.json").read_text())["experiment"] == "tiny"
        assert TrainConfig.from_json(run / "config.json").steps == 4     # an ordinary run directory
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(out))
    assert status == 0 and text.count("skip ") == 8 and "0 runs done" in text
    assert before == {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(out), "--dry-run")
    assert text.count("\ndone ") == 8


def test_interrupted_run_resumes_as_if_never_killed(tmp_path, capsys, monkeypatch):
    """A real `matrec experiment run` process, SIGKILLed after its first checkpoint; running the
    command again resumes the run (its metrics equal an uninterrupted run's) and marks it done."""
    train = {**TRAIN, "eval_every": 100, "ckpt_every": 20, "log_every": 10}
    path = write_experiment(tmp_path, seeds=[0], grid={}, budget={"steps": 600}, train=train,
                            models={"rnn": {"model": "rnn", "model_args": {"hidden_size": 8}}})
    out = tmp_path / "out"
    run = out / "tiny" / "cpu" / "rnn-seed0"
    killed_at = kill_after_first_checkpoint(["experiment", "run", str(path), "--out", str(out)], run)
    assert 0 < killed_at < 600, "the run ended before it could be killed: make it longer"
    assert run_state(run) == "partial" and not (run / "status.json").exists()
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(out), "--dry-run")
    assert "partial " in text

    resumed = []
    original = Trainer.resume.__func__
    monkeypatch.setattr(Trainer, "resume",
                        classmethod(lambda cls, d, **kw: resumed.append(d) or original(cls, d, **kw)))
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(out))[0] == 0
    assert resumed == [run]      # continued from its checkpoint, not started again
    assert json.loads((run / "status.json").read_text())["step"] == 600
    reference = Trainer(TrainConfig.from_dict({**json.loads((run / "config.json").read_text()),
                                               "out_dir": str(tmp_path / "ref")}))
    reference.train()
    assert (run / "metrics.jsonl").read_text() == (reference.run_dir / "metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in (run / "timing.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 600


def test_jobs_2_runs_in_parallel_processes_and_records_a_diverged_run(tmp_path, capsys):
    models = {"rnn": {"model": "rnn", "model_args": {"hidden_size": 8}},
              "boom": {"model": "rnn", "model_args": {"hidden_size": 8},
                       "train": {"lr": 1e36, "grad_clip": 0.0}}}
    path = write_experiment(tmp_path, seeds=[0], grid={}, models=models)
    out = tmp_path / "out"
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(out), "--jobs", "2")
    assert status == 1 and "1 runs done, 1 failed" in text
    folder = out / "tiny" / "cpu"
    good = json.loads((folder / "rnn-seed0" / "status.json").read_text())
    bad = json.loads((folder / "boom-seed0" / "status.json").read_text())
    assert good["state"] == "done" and good["step"] == 4
    assert bad["state"] == "failed" and bad["reason"].startswith(("diverged: the training loss is nan",
                                                                "diverged: the training loss is inf"))
    # each job got its share of the 2 cores... of this machine: cores // jobs, at least 1
    assert TrainConfig.from_json(folder / "rnn-seed0" / "config.json").threads == 1
    # a failed run is final: the next run neither drops nor retries it, and the report counts it
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(out), "--dry-run")
    assert "failed   " in text
    report = write_report(out)
    boom = next(c for c in report["json"]["experiments"][0]["cells"] if c["label"] == "boom")
    assert boom["failed"] == 1 and boom["done"] == 0 and "(1 failed)" in report["markdown"]


def test_report_tables_json_and_plots_from_run_directories_alone(tmp_path, capsys):
    out = tmp_path / "out"
    path = write_experiment(tmp_path, target="loss <= 0.0001")      # not reached in 4 steps
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(out))[0] == 0
    path = write_experiment(tmp_path, name="stop", target="loss <= 1000", stop_at_target=True,
                            grid={}, budget={"steps": 8})
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(out))[0] == 0

    moved = tmp_path / "elsewhere"             # reported where the runs were copied: no other input
    os.rename(out, moved)
    status, text = run_cli(capsys, "experiment", "report", str(moved))
    assert status == 0
    data = json.loads((moved / "report.json").read_text())
    tiny = next(e for e in data["experiments"] if e["name"] == "tiny")
    assert tiny["matching"] == "by hand" and tiny["swept"] == ["task_args.delay"]
    cell = next(c for c in tiny["cells"] if c["label"] == "rnn" and c["swept"] == {"task_args.delay": 5})
    finals = [[r for r in read_metrics(moved / "tiny" / "cpu" / f"rnn-delay5-seed{s}" / "metrics.jsonl")
               if r["kind"] == "eval"][-1]["recall"] for s in (0, 1)]
    assert cell["metric"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert cell["metric"]["std"] == pytest.approx(statistics.stdev(finals))
    assert cell["parameters"] == 737 and cell["target_reached"] == 0
    per_step = [1000 * seed["train_seconds"] / seed["step"] for seed in cell["seeds"]]
    assert cell["step_ms"]["mean"] == pytest.approx(statistics.fmean(per_step)) and "| ms / step |" in text
    assert "| rnn | 5 | 737 | 2/2 |" in text and "not reached" in text and "± " in text
    # each cell minus the best cell (recall: the highest mean), seed by seed, in report.json and .md
    finals = {cell_name(c): {s["seed"]: s["final"]["recall"] for s in c["seeds"]} for c in tiny["cells"]}
    best = max(finals, key=lambda name: statistics.fmean(finals[name].values()))
    assert tiny["paired"]["reference"] == best and len(tiny["paired"]["rows"]) == 3
    for row in tiny["paired"]["rows"]:
        assert row["differences"] == pytest.approx({str(s): finals[row["cell"]][s] - finals[best][s] for s in (0, 1)})
    assert f"recall minus {best}'s (the best mean)" in text
    # --pair tables the pairs named; a name that is no cell is refused, naming it
    status, text = run_cli(capsys, "experiment", "report", str(moved), "--pair", "rnn delay=5:gru delay=5")
    reported = json.loads((moved / "report.json").read_text())["experiments"]
    pair = next(e for e in reported if e["name"] == "tiny")["pairs"]
    assert status == 0 and "| rnn delay=5 − gru delay=5 |" in text and pair[0]["differences"] == pytest.approx(
        {str(s): finals["rnn delay=5"][s] - finals["gru delay=5"][s] for s in (0, 1)})
    assert cli.main(["experiment", "report", str(moved), "--pair", "rnn delay=5:lstm"]) == 2
    assert "--pair names ['lstm'], not cells of this report" in capsys.readouterr().err
    for name in ("tiny-cpu-recall.png", "tiny-cpu-curves.png", "stop-cpu-curves.png"):
        assert (moved / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stop = next(e for e in data["experiments"] if e["name"] == "stop")
    for c in stop["cells"]:   # stopped at the first evaluation (step 2 of 8), its time recorded
        assert c["target_reached"] == 2 and c["target_step"]["mean"] == 2 and c["steps"]["mean"] == 2
        for seed in c["seeds"]:
            timing = (Path(seed["run_dir"]) / "timing.jsonl").read_text().splitlines()
            assert seed["target_seconds"] == json.loads(timing[0])["train_seconds"] > 0
            assert seed["reason"] == "target" and not seed["target_seconds_estimated"]


def test_report_loss_by_position_carried_vs_reset_from_checkpoints(tmp_path, capsys):
    # the seasonal-naive forecast looks 32 steps back, beyond one 8-step chunk: with its state reset
    # every chunk it has no past (forecasts 0), carried it has; in the first chunk both are the same
    path = write_experiment(
        tmp_path, task="forecast", metric="r2", grid={}, budget={"steps": 2},
        task_args={"seq_len": 8, "length": 2048, "lag": 32, "periods": [4, 16]},
        position_eval={"bins": [0, 8, 32, 128]},
        models={"naive": {"model": "seasonal_naive", "model_args": {"period": 32, "fit": False}},
                "gru": {"model": "gru", "model_args": {"hidden_size": 4}}},
        scales={"cpu": {}, "gpu": {"position_eval": {"bins": [0, 8, 32, 100]}}})
    out = tmp_path / "out"
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(out))[0] == 0
    moved = tmp_path / "elsewhere"             # from the run directories (their checkpoints) alone
    os.rename(out, moved)
    status, text = run_cli(capsys, "experiment", "report", str(moved))
    assert status == 0 and "### Loss by position in the context" in text
    assert "| model | state | 0-8 | 8-32 | 32-128 |" in text and "| naive | reset every 8 |" in text
    data = json.loads((moved / "report.json").read_text())
    cells = {c["label"]: c for c in data["experiments"][0]["cells"]}
    for cell in cells.values():
        position = cell["position"]
        assert position["n"] == 2 and position["rows"] == 1 and position["context"] == 128
        assert position["carried"][0] == position["reset"][0]          # the first chunk
        for seed in cell["seeds"]:
            kept = json.loads((Path(seed["run_dir"]) / "position_eval.json").read_text())
            assert kept["carried"] == seed["position"]["carried"] and kept["step"] == 2
    naive = cells["naive"]["position"]
    assert naive["reset_minus_carried"][2]["mean"] > 0.1
    assert (moved / "tiny-cpu-position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_includes_an_earlier_report_for_runs_whose_directories_are_gone(tmp_path, capsys):
    # seed 0 runs on one machine and is reported; its directories are lost; seed 1 runs on another:
    # the report of seed 1 with the first report included equals the report of both run together
    path = write_experiment(
        tmp_path, task="forecast", metric="r2", grid={}, budget={"steps": 2},
        task_args={"seq_len": 8, "length": 2048, "lag": 32, "periods": [4, 16]},
        position_eval={"bins": [0, 8, 32, 128]}, seeds=[0, 1],
        models={"naive": {"model": "seasonal_naive", "model_args": {"period": 32, "fit": False}},
                "gru": {"model": "gru", "model_args": {"hidden_size": 4}}})
    both, first, second = tmp_path / "both", tmp_path / "first", tmp_path / "second"
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(both))[0] == 0
    for out, seed in ((first, 0), (second, 1)):
        assert run_cli(capsys, "experiment", "run", str(path), "--out", str(out),
                       "--only", f"*-seed{seed}")[0] == 0
    whole = write_report(both, tmp_path / "whole")["json"]["experiments"][0]
    write_report(first, tmp_path / "report0")
    shutil.rmtree(first)
    status, text = run_cli(capsys, "experiment", "report", str(second), "--out", str(tmp_path / "merged"),
                           "--include", str(tmp_path / "report0" / "report.json"))
    assert status == 0 and "2 of these 4 runs are read from an earlier report" in text
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())["experiments"][0]
    assert [c["label"] for c in merged["cells"]] == [c["label"] for c in whole["cells"]]
    for a, b in zip(whole["cells"], merged["cells"]):
        assert b["runs"] == b["done"] == 2 and [s["seed"] for s in b["seeds"]] == [0, 1]
        for key in ("metric", "loss", "steps"):
            assert b[key]["mean"] == pytest.approx(a[key]["mean"]) and b[key]["std"] == pytest.approx(a[key]["std"])
        assert b["position"]["n"] == 2
        assert [s["evals"] for s in b["seeds"]] == [s["evals"] for s in a["seeds"]] != [[], []]
        carried = [[x["mean"] for x in c["position"]["carried"]] for c in (a, b)]
        assert carried[1] == pytest.approx(carried[0])

    # a run directory replaces its run's entry: `second` reported with a report of itself counts 1 run a cell
    write_report(second, tmp_path / "report1")
    again = write_report(second, tmp_path / "again", include=[tmp_path / "report1" / "report.json"])
    assert all(c["runs"] == 1 for c in again["json"]["experiments"][0]["cells"])
    assert "read from an earlier report" not in again["markdown"]
    # and a run held by two included reports counts once
    twice = write_report(second, tmp_path / "twice", include=[tmp_path / "report0" / "report.json",
                                                               tmp_path / "merged" / "report.json"])
    assert all(c["runs"] == 2 for c in twice["json"]["experiments"][0]["cells"])

    (tmp_path / "bad.json").write_text("[1, 2]")
    status = cli.main(["experiment", "report", str(second), "--include", str(tmp_path / "bad.json")])
    assert status == 2 and "include:" in capsys.readouterr().err
    status = cli.main(["experiment", "report", str(second), "--include", str(tmp_path / "none.json")])
    assert status == 2 and "expected an earlier report.json" in capsys.readouterr().err


def test_eval_at_columns_in_the_report(tmp_path, capsys):
    # each done run is also evaluated at other task settings (length extrapolation: seq_len 2x, 4x)
    path = write_experiment(tmp_path, grid={}, eval_at=[{"delay": 7}, {"delay": 9}])
    out = tmp_path / "out"
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(out))[0] == 0
    run_dir = out / "tiny" / "cpu" / "rnn-seed1"
    status = json.loads((run_dir / "status.json").read_text())
    cfg = TrainConfig.from_dict({**json.loads((run_dir / "config.json").read_text()),
                                 "task_args": {"n_symbols": 3, "delay": 7}, "out_dir": str(tmp_path),
                                 "run_name": "reference"})
    reference = Trainer(cfg)                       # a run configured at delay 7, the final weights
    load_model_weights(reference.model, load_checkpoint(run_dir)[1])
    expected = reference.evaluate()
    got = status["eval_at"][0]
    assert got["task_args"] == {"delay": 7} and {k: got[k] for k in expected} == pytest.approx(expected)
    assert status["eval_at"][1]["task_args"] == {"delay": 9}

    status_code, text = run_cli(capsys, "experiment", "report", str(out))
    assert status_code == 0 and "| recall at delay=7 | recall at delay=9 | train s | ms / step | loss spikes |" in text
    cell = next(c for c in json.loads((out / "report.json").read_text())["experiments"][0]["cells"]
                if c["label"] == "rnn")
    at7 = [json.loads((out / "tiny" / "cpu" / f"rnn-seed{s}" / "status.json").read_text())["eval_at"][0]["recall"]
           for s in (0, 1)]
    assert cell["eval_at"][0]["task_args"] == {"delay": 7}
    assert cell["eval_at"][0]["metric"]["mean"] == pytest.approx(statistics.fmean(at7))
    assert (out / "tiny-cpu-eval_at.png").is_file() and "tiny-cpu-eval_at.png" in text


def test_report_says_below_chance_where_recall_is_under_one_eighth():
    from matrec.experiment.report import summarise, table

    def run(label, recall, at):
        return {"experiment": "e", "scale": "cpu", "label": label, "swept": {}, "metric": "recall",
                "target": None, "matching": "", "size": "", "parameters": 1, "seed": 0, "state": "done",
                "reason": "steps", "step": 10, "train_seconds": 1.0, "final": {"recall": recall, "loss": 1.0},
                "eval_at": [{"task_args": {"delay": 9}, "recall": at}], "target_step": None,
                "target_seconds": None, "target_seconds_estimated": False, "run_dir": label}

    text = table(summarise([run("a", 0.1, 0.125), run("b", 0.125, 0.0)])[0])
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()[2:]}
    assert "| 0.1 ± 0 (below chance) |" in rows["a"] and "| 0.125 ± 0 |" in rows["a"]
    assert "| 0.125 ± 0 |" in rows["b"] and "| 0 ± 0 (below chance) |" in rows["b"]


def test_loss_spikes_are_losses_above_1_5x_the_running_median():
    losses = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1,   # 10 records before any spike can count
              2.0, 3.4, 2.0, 2.9, 1.9, 1.8, float("nan"), 9.0]
    records = [{"step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]
    # step 120: 3.4 against the median 2.45 of the 10 before (ratio 1.39); step 180: 9.0 against
    # the median of the finite losses before it (the NaN is neither a spike nor part of a median)
    spikes = loss_spikes(records)
    assert [s["step"] for s in spikes] == [180] and spikes[0]["median"] == pytest.approx(2.1)
    assert [s["step"] for s in loss_spikes(records, ratio=1.3)] == [120, 180]
    assert loss_spikes(records[:10]) == []


def test_report_of_plain_train_runs(tmp_path, capsys):
    for seed in (0, 1):
        Trainer(TrainConfig(task="copy", task_args={"delay": 3, "n_symbols": 3}, model="rnn",
                            model_args={"hidden_size": 8}, steps=2, seed=seed, out_dir=str(tmp_path / "mine"),
                            run_name=f"s{seed}", progress=False, plot=False, tensorboard=False, eval_every=2,
                            **{k: v for k, v in TRAIN.items() if k != "eval_every"})).train()
    status, text = run_cli(capsys, "experiment", "report", str(tmp_path / "mine"))
    assert status == 0 and "## mine" in text and "| rnn | 3 | 3 | 737 | 2/2 |" in text


def test_ray_backend_dispatch_with_a_fake_ray(tmp_path):
    """The Ray backend's dispatch (init, one remote task per run with its resources, results as they
    come) on a stand-in module that runs each task at once in this process."""
    calls = {"init": None, "options": []}

    class Ref:
        def __init__(self, value):
            self.value = value

    class FakeRay:
        def init(self, address, ignore_reinit_error):
            calls["init"] = address

        def remote(self, fn):
            class Task:
                def options(self, **kw):
                    calls["options"].append(kw)
                    return self

                def remote(self, spec):
                    return Ref(fn(spec))
            return Task()

        def wait(self, refs, num_returns):
            return refs[:num_returns], refs[num_returns:]

        def get(self, ref):
            return ref.value

    path = write_experiment(tmp_path, seeds=[0], grid={})
    exp = load_experiment(path, "cpu", tmp_path / "out")
    check(exp)
    results = run_experiment(exp, RayBackend("ray://head:10001", ray_module=FakeRay()), log=lambda _: None)
    assert calls["init"] == "ray://head:10001"
    assert calls["options"] == [{"num_cpus": 1, "num_gpus": 0}] * 2
    assert sorted(r["state"] for r in results) == ["done", "done"]
    assert run_state(tmp_path / "out" / "tiny" / "cpu" / "gru-seed0") == "done"


def test_ray_backend_on_a_local_ray_instance(tmp_path, capsys):
    pytest.importorskip("ray")
    path = write_experiment(tmp_path, seeds=[0], grid={})
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(tmp_path / "ray"), "--ray", "local")
    assert status == 0 and "2 runs done" in text
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(tmp_path / "inline"))[0] == 0
    for name in ("rnn-seed0", "gru-seed0"):
        ray_run, inline_run = (tmp_path / w / "tiny" / "cpu" / name for w in ("ray", "inline"))
        assert (ray_run / "metrics.jsonl").read_bytes() == (inline_run / "metrics.jsonl").read_bytes()


BAD = [
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"models": {"x": {"model": "nope"}}}, "models.x.model must be one of"),
    ({"models": {"x": {"model": "rnn", "layers": 2}}}, "unknown key(s) ['models.x.layers']"),
    ({"target": "recall => 0.99"}, "target must read '<metric> <op> <number>'"),
    ({"target": "recall >= high"}, "target must read"),
    ({"target": "accuracy >= 0.9"}, "target names metric 'accuracy', which task 'copy' does not report"),
    ({"metric": "r2"}, "metric names metric 'r2'"),
    ({"task": "copyy"}, "task must be one of"),
    ({"scales": {"cpu": {}}}, "scales must be a table with the keys ['cpu', 'gpu'] (and optionally ['gpu-full'])"),
    ({"scales": {"cpu": {}, "gpu": {}, "tpu": {}}}, "scales must be a table with the keys ['cpu', 'gpu']"),
    ({"models": {"lstm": {"model": "lstm", "seeds": []}}}, "models.lstm.seeds must be a non-empty list"),
    ({"scales": {"cpu": {"seed": 1}, "gpu": {}}}, "unknown key(s) ['scales.cpu.seed']"),
    ({"grid": {"delay": [1, 2]}}, "unknown grid key 'delay'"),
    ({"grid": {"task_args.delay": 3}}, "grid.task_args.delay must be a non-empty list"),
    ({"seeds": [0, 0]}, "seeds must be a non-empty list of distinct ints"),
    ({"train": {"seed": 3}}, "train must not set ['seed']"),
    ({"train": {"lr": "fast"}}, "lr must be a number"),
    ({"budget": {"steps": 0}}, "budget.steps must be an int >= 1"),
    ({"models": {"x": {"model": "rnn", "model_args": {"hidden_size": 0}}}}, "run 'x-delay3-seed0'"),
    ({"position_eval": {"bins": [0, 8]}}, "position_eval (task 'copy', task_args {'n_symbols': 3, 'delay': 3}): "
                                          "the loss by position needs a stream task"),
    ({"position_eval": {"bins": [8, 4]}}, "position_eval.bins must be a list of at least 2 strictly increasing"),
    ({"position_eval": {"bins": [0, 8], "width": 3}}, "unknown key(s) ['position_eval.width']"),
    ({"position_eval": {"bins": [0, 8], "rows": 0}}, "position_eval.rows must be"),
    ({"eval_at": {"delay": 7}}, "eval_at must be a list of non-empty tables of task options"),
    ({"eval_at": [{}]}, "eval_at must be a list of non-empty tables"),
    ({"eval_at": [{"dellay": 7}]}, "eval_at entry {'dellay': 7}: task 'copy' got unknown option(s) ['dellay']"),
]


@pytest.mark.parametrize("over, message", BAD)
def test_bad_experiment_files_are_rejected_before_any_run(tmp_path, capsys, over, message):
    path = write_experiment(tmp_path, **over)
    with pytest.raises(SystemExit) as e:
        cli.main(["experiment", "run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("matrec experiment: error: ") and message in err
    assert str(path) in err or message.startswith("run ") or "must be one of ['cpu'" in err
    assert not (tmp_path / "out").exists()


def test_only_runs_the_named_models(tmp_path, capsys):
    path = write_experiment(tmp_path)
    status, out = run_cli(capsys, "experiment", "run", str(path), "--out", str(tmp_path / "out"), "--dry-run",
                  "--only", "gru")
    assert status == 0 and "4 runs" in out and "gru-delay3-seed0" in out and "rnn-" not in out
    with pytest.raises(SystemExit) as e:
        cli.main(["experiment", "run", str(path), "--out", str(tmp_path / "out"), "--only", "lstm"])
    assert e.value.code == 2 and "--only must name model labels" in capsys.readouterr().err


def test_the_optional_gpu_full_scale(tmp_path, capsys):
    path = write_experiment(tmp_path, scales={"cpu": {}, "gpu": {}, "gpu-full": {"budget": {"steps": 9}}})
    assert {c.config["steps"] for c in load_experiment(path, "gpu-full", tmp_path).cells} == {9}
    path = write_experiment(tmp_path)
    with pytest.raises(ValueError, match="has no gpu-full scale; its scales are \\['cpu', 'gpu'\\]"):
        load_experiment(path, "gpu-full", tmp_path)


def test_bad_file_in_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('task = "copy"\ntarget = "recall >>= 1"\n[models.rnn]\n[scales.cpu]\n[scales.gpu]\n')
    proc = subprocess.run([sys.executable, "-m", "matrec.cli", "experiment", "run", str(path)],
                          env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"matrec experiment: error: experiment file {str(path)!r}: target must read")


EXPERIMENTS = sorted((SRC.parent / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_shipped_experiment_files_are_valid_at_both_scales(path, tmp_path):
    assert len(EXPERIMENTS) >= 4
    scales = ["cpu", "gpu"] + (["gpu-full"] if "[scales.gpu-full" in path.read_text() else [])
    for scale in scales:
        exp = load_experiment(path, scale, tmp_path)     # every key and every run's TrainConfig
        # three seeds, except a sweep (a grid over train.lr, or a file named *_sweep), a diagnosis
        # whose description says it uses one seed (the files that use their settings have the seeds),
        # and a gpu scale that must fit one 8-minute window (its decisive cells may keep one seed)
        sweep = exp.name.endswith("_sweep") or any(k == "train.lr" for c in exp.cells for k in c.swept)
        seeds = len({c.seed for c in exp.cells})
        assert exp.cells and (seeds >= 3 or sweep or scale == "gpu" or "one seed" in exp.description.lower())
        assert all(c.size for c in exp.cells) and exp.matching
        assert all(c.config["device"] == ("cpu" if scale == "cpu" else "cuda") for c in exp.cells)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_mixer_of_a_shipped_experiment_builds_at_every_scale(path, tmp_path):
    """Each sequence model's mixers, one layer each (cheap at any width), built as the runs will build
    them: a layer that refuses its shape (e.g. an MRU whose heads would hold constant 1 x 1 matrices)
    fails here, not hours into a run."""
    from matrec.models import MIXERS
    from matrec.models.registry import architecture, model_kind

    scales = ["cpu", "gpu"] + (["gpu-full"] if "[scales.gpu-full" in path.read_text() else [])
    built = set()
    for scale in scales:
        for cell in load_experiment(path, scale, tmp_path).cells:
            model, args = cell.config["model"], cell.config["model_args"]
            if model_kind(model) != "sequence":
                continue
            arch = architecture(model, **args)[1]
            for mixer in dict.fromkeys(arch["pattern"]):
                options = arch["mixer_options"].get(mixer, {})
                key = json.dumps([mixer, arch["d_model"], arch["n_heads"], options], sort_keys=True, default=repr)
                if key not in built:
                    built.add(key)
                    MIXERS.get(mixer)(arch["d_model"], n_heads=arch["n_heads"], **options)


def test_per_model_seeds_and_an_optional_gpu_full_scale(tmp_path):
    path = write_experiment(tmp_path, models={"rnn": {"model": "rnn", "model_args": {"hidden_size": 8}},
                                              "gru": {"model": "gru", "seeds": [4]}},
                            scales={"cpu": {}, "gpu": {}, "gpu-full": {"seeds": [0, 1, 2]}})
    names = [c.name for c in load_experiment(path, "cpu", tmp_path).cells]
    assert names == ["rnn-delay3-seed0", "rnn-delay3-seed1", "rnn-delay5-seed0", "rnn-delay5-seed1",
                     "gru-delay3-seed4", "gru-delay5-seed4"]
    full = load_experiment(path, "gpu-full", tmp_path)
    assert len(full.cells) == 8 and str(full.cells[0].config["out_dir"]).endswith("gpu-full")
    with pytest.raises(ExperimentError, match=r"has no gpu-full scale; its scales are \['cpu', 'gpu'\]"):
        load_experiment(write_experiment(tmp_path, name="two"), "gpu-full", tmp_path)


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    path = write_experiment(tmp_path, seeds=[0], grid={}, models={"rnn": {"model": "rnn"}})
    run = tmp_path / "out" / "tiny" / "cpu" / "rnn-seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")          # what a run killed at once leaves
    (run / "metrics.jsonl").write_text('{"kind": "train", "st')
    assert run_state(run) == "partial"
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(tmp_path / "out"))[0] == 0
    assert run_state(run) == "done" and TrainConfig.from_json(run / "config.json").model == "rnn"
    (run / "notes.txt").write_text("mine")          # a file the runner never writes is never deleted
    (run / "status.json").unlink()
    import shutil
    shutil.rmtree(run / "checkpoints")
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(tmp_path / "out"))
    assert status == 1 and "blocked rnn-seed0" in text and "['notes.txt']" in text and "1 left alone" in text
    assert (run / "notes.txt").exists() and (run / "config.json").exists()


def test_a_worker_process_that_dies_without_a_result_is_recorded_failed(tmp_path):
    class Dead:   # what the local backend sees of a worker killed by the system (e.g. out of memory)
        result_file = io.StringIO("some output, then nothing\n")
        returncode = -9

    run = tmp_path / "rnn-seed0"
    result = _result_of(Dead(), {"run_dir": str(run), "cell": {"experiment": "x", "label": "rnn"}})
    assert result["state"] == "failed" and "status -9" in result["reason"]
    assert run_state(run) == "failed" and json.loads((run / "cell.json").read_text())["label"] == "rnn"


def test_report_rows_follow_the_swept_numbers_not_the_folder_names():
    from matrec.experiment.report import summarise

    def run(delay, seed):
        return {"experiment": "e", "scale": "cpu", "label": "rnn", "swept": {"task_args.delay": delay},
                "metric": "recall", "target": None, "matching": "", "size": "", "parameters": 1,
                "seed": seed, "state": "done", "reason": "steps", "step": 10, "train_seconds": 1.0,
                "final": {"recall": 0.5, "loss": 1.0}, "target_step": None, "target_seconds": None,
                "target_seconds_estimated": False, "run_dir": f"rnn-delay{delay}-seed{seed}"}

    # the order a directory listing gives: delay1000 < delay300 < delay50
    runs = [run(d, s) for d in (1000, 300, 50) for s in (0, 1)]
    cells = summarise(runs)[0]["cells"]
    assert [c["swept"]["task_args.delay"] for c in cells] == [50, 300, 1000]
    assert all(c["step_ms"]["mean"] == pytest.approx(100.0) for c in cells)


def test_dry_run_estimates_each_run_from_measured_step_times(tmp_path, capsys, monkeypatch):
    from matrec.experiment import estimate as est
    table = {"machine": "a test box", "fwd_bwd_ms_per_timestep": {"rnn": 0.5}, "forward_share": 0.5,
             "startup_s": 1}
    (tmp_path / "t.json").write_text(json.dumps(table))
    monkeypatch.setitem(est.TABLES, "cpu", tmp_path / "t.json")
    path = write_experiment(tmp_path, seeds=[0], grid={"task_args.delay": [6]},
                            task_args={"n_symbols": 2}, eval_at=[{"delay": 16}],
                            train={**TRAIN, "eval_every": 2, "eval_batches": 1},
                            models={"rnn": {"model": "rnn"}, "gru": {"model": "gru"}},
                            budget={"steps": 4})
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(tmp_path / "out"), "--dry-run")
    # T = 6 + 2*2 = 10; 4 steps * 10 * 0.5 ms + 3 evaluations * 1 batch * 10 * 0.5 * 0.5
    # + the eval_at setting (T' = 20) 1 batch * 20 * 0.5 * 0.5 = 32.5 ms, plus 1 s to start
    assert status == 0 and "rnn-delay6-seed0  (est. 1 s)" in text
    spec = {"run_dir": "r", "config": load_experiment(path, "cpu", tmp_path).cells[0].config}
    assert est.estimate([spec], [{"delay": 16}])["total"] == pytest.approx(1.0325)
    # a seconds budget stops training at the first step past it: 0.003 s = 0.6 steps of 5 ms, so 1
    # step and 2 evaluations (its last step, and the count of the full run's formula): 5 + 5 + 5 ms
    capped = {**spec, "cell": {"seconds": 0.003}}
    assert est.estimate([capped], [{"delay": 16}])["total"] == pytest.approx(1.015)
    assert est.estimate([{**spec, "cell": {"seconds": 60}}], [{"delay": 16}])["total"] == pytest.approx(1.0325)
    # a model with no figure: counted at its seconds budget + start-up when it has one, else not
    gru = {"run_dir": "g", "config": load_experiment(path, "cpu", tmp_path).cells[1].config}
    both = est.estimate([capped, {**gru, "cell": {"seconds": 2.0}}], [{"delay": 16}])
    assert both["total"] == pytest.approx(1.015 + 3.0) and both["budgeted"] == ["g"] and not both["missing"]
    assert "no figure for 1 run(s), not counted" in text and "a test box" in text
    monkeypatch.setitem(est.TABLES, "cpu", tmp_path / "none.json")
    assert "no measured step times for this device" in run_cli(
        capsys, "experiment", "run", str(path), "--out", str(tmp_path / "out"), "--dry-run")[1]


def test_an_unmeasured_model_takes_the_figure_of_the_model_that_bounds_it():
    from matrec.experiment.estimate import figure
    table = {"fwd_bwd_ms_per_timestep": {"big": 0.5, "ablation-mru-ldu": 0.1},
             "bounded_by": {"ablation-mru-*": "big", "orphan": "not-measured"}}
    assert figure(table, "ablation-mru-ldu") == 0.1          # its own figure first
    assert figure(table, "ablation-mru-expm") == 0.5         # else the bound's
    assert figure(table, "orphan") is None and figure(table, "gru") is None
    assert figure({"fwd_bwd_ms_per_timestep": {"gru": 0.2}}, "gru") == 0.2   # tables without bounds


def _assert_pieces_fit_and_cover(name, pieces, tmp_path):
    """The gpu scale of experiments/<name>.toml run as `--only` pieces (each a comma-separated selection
    as the file's header names it): every piece fits one 8-minute window and together they cover every run."""
    from matrec.experiment.estimate import estimate
    from matrec.experiment.runner import specs_of
    exp = load_experiment(SRC.parent / "experiments" / f"{name}.toml", "gpu", tmp_path)
    specs = specs_of(exp)
    covered = set()
    for piece in pieces:
        names = {c.name for c in exp.cells_matching(piece.split(","))}   # as --only picks them
        chosen = [s for s in specs if Path(s["run_dir"]).name in names]
        covered |= {s["run_dir"] for s in chosen}
        result = estimate(chosen, exp.eval_at)
        assert chosen and not result["missing"] and result["total"] <= 8 * 60, (name, piece, result["total"])
    assert covered == {s["run_dir"] for s in specs}, name


def test_shipped_gpu_scales_of_the_memory_files_fit_one_8_minute_window(tmp_path):
    from matrec.experiment.estimate import estimate
    from matrec.experiment.runner import specs_of
    # (the long-memory designs' models without a measured step time count at their seconds budget)
    for name in ("memory_long_delay", "memory_variable_delay", "forecast_regime", "stdlib_documents",
                 "attention_copy", "forecast_long_horizon", "memory_horizon", "training_time_adding",
                 "training_time_copy"):
        exp = load_experiment(SRC.parent / "experiments" / f"{name}.toml", "gpu", tmp_path)
        result = estimate(specs_of(exp), exp.eval_at)
        assert not result["missing"] and result["total"] <= 8 * 60, (name, result["total"])
    # the sweeps with too many runs for one window: the pieces their headers name each fit
    _assert_pieces_fit_and_cover("memory_lr_sweep", ["mornn,lstm,lstm_fb1,lstm_chrono,gru", "attn,txl", "mamba,lru"],
                                 tmp_path)
    _assert_pieces_fit_and_cover("forecast_regime_lr", ["mornn,mru,linear_ar", "lstm,gru,txl,window"], tmp_path)
    _assert_pieces_fit_and_cover("stdlib_documents_lr", ["mornn,lstm,gru", "mru,mru-direction,txl,window"], tmp_path)


@pytest.mark.skipif(not SHAKESPEARE_FILE.exists(), reason="needs the tiny-shakespeare file")
def test_gpu_scales_of_the_mru_files_fit_8_minutes_and_the_sweeps_pieces_do(tmp_path, monkeypatch):
    from matrec.experiment.estimate import estimate
    from matrec.experiment.runner import specs_of
    monkeypatch.setenv("MATREC_SHAKESPEARE", str(SHAKESPEARE_FILE))
    for name, runs in (("mru_ablation_long", 9), ("mru_ablation", 11), ("mru_bounded", 5), ("mru_shakespeare", 3),
                       ("mru_rotary", 3), ("mru_rotary_long", 3), ("long_context_lm", 5)):
        exp = load_experiment(SRC.parent / "experiments" / f"{name}.toml", "gpu", tmp_path)
        result = estimate(specs_of(exp), exp.eval_at)
        assert len(result["runs"]) == runs and not result["missing"] and result["total"] <= 8 * 60, name
    # the sweeps' runs do not fit one window; the pieces their headers name each do
    sweep_pieces = ["mru-identity-*,mru-scaled-*", "mru-ldu-*", "mru-cayley_qr-*,mru-cayley-*", "mru-expm-*,attn,mlp"]
    _assert_pieces_fit_and_cover("mru_ablation_sweep", sweep_pieces, tmp_path)
    _assert_pieces_fit_and_cover("passkey_retrieval_lr", ["mornn,mru,mru-fanin", "lstm,gru,txl,window"], tmp_path)


def test_a_time_budget_ends_a_run_at_any_step_with_its_evaluation_there(tmp_path, capsys):
    # evaluations every 10,000 steps: the budget of 0.3 s must still stop the run within a few
    # hundred steps, and its final numbers are an evaluation at the step it stopped at
    path = write_experiment(tmp_path, seeds=[0], grid={}, budget={"steps": 10000, "seconds": 0.3},
                            train={**TRAIN, "eval_every": 10000, "ckpt_every": 10000, "log_every": 50},
                            models={"rnn": {"model": "rnn", "model_args": {"hidden_size": 8}}})
    out = tmp_path / "out"
    assert run_cli(capsys, "experiment", "run", str(path), "--out", str(out))[0] == 0
    run = out / "tiny" / "cpu" / "rnn-seed0"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["reason"] == "time budget"
    assert 0 < status["step"] < 10000 and status["train_seconds"] >= 0.3
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["step"] == status["step"] and evals[-1]["recall"] == status["eval"]["recall"]
    assert "skip  rnn-seed0: done" in run_cli(capsys, "experiment", "run", str(path), "--out", str(out))[1]


def test_only_runs_the_runs_whose_names_match(tmp_path, capsys):
    path = write_experiment(tmp_path)
    out = tmp_path / "out"
    status, text = run_cli(capsys, "experiment", "run", str(path), "--out", str(out), "--only", "rnn-delay5-*",
                           "--only", "gru-delay3-seed1")
    assert status == 0
    assert sorted(p.name for p in (out / "tiny" / "cpu").iterdir()) == [
        "gru-delay3-seed1", "rnn-delay5-seed0", "rnn-delay5-seed1"]
    with pytest.raises(SystemExit) as e:
        cli.main(["experiment", "run", str(path), "--out", str(out), "--only", "lstm-*"])
    assert e.value.code == 2 and "--only must name model labels" in capsys.readouterr().err
