"""`matrec experiment run | report` under faults (issue 26): a full disk or a missing GPU retried on
rerun, changed settings refused, damaged bookkeeping files named with the rest going on, killed
and concurrent drivers, hostile files. CLI cases through the real command where the process
matters (exit status, stderr, signals)."""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from matrec import cli
from matrec.experiment.runner import run_state
from matrec.experiment.state import inspect
from support import SRC, kill_after_first_checkpoint, matrec_cli, one_line_error

TRAIN = {"batch_size": 8, "eval_every": 2, "eval_batches": 1, "log_every": 1, "ckpt_every": 2, "threads": 1}


def experiment(folder: Path, name="tiny", **over) -> Path:
    data = {"name": name, "task": "copy", "task_args": {"n_symbols": 3, "delay": 3}, "seeds": [0, 1],
            "train": dict(TRAIN), "budget": {"steps": 4},
            "models": {"rnn": {"model": "rnn", "model_args": {"hidden_size": 8}}},
            "metric": "recall", "scales": {"cpu": {}, "gpu": {"train": {"device": "cuda"}}}}
    data.update(over)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    status = cli.main(list(map(str, argv)))
    return status, capsys.readouterr().out


def _file_size_limit(limit: int):
    def apply():   # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_retried_on_rerun_and_its_record_kept(tmp_path, capsys):
    """A real refusal by the kernel (a file-size limit: every checkpoint is larger) fails the run
    as environmental; the rerun, with room, retries it, keeps the failure in failures.jsonl and
    says so."""
    path = experiment(tmp_path, seeds=[0], models={"rnn": {"model": "rnn", "model_args": {"hidden_size": 64}}})
    out, runs = tmp_path / "out", tmp_path / "out" / "tiny" / "cpu"
    proc = matrec_cli("experiment", "run", path, "--out", out, preexec_fn=_file_size_limit(16_000))
    assert proc.returncode == 1 and "failed rnn-seed0: OSError: [Errno 27] File too large while writing a " \
                                    "checkpoint" in proc.stdout, proc.stdout + proc.stderr
    status = json.loads((runs / "rnn-seed0" / "status.json").read_text())
    assert status["state"] == "failed" and status["environmental"] is True
    assert inspect(runs / "rnn-seed0") == ("retry", status["reason"])
    assert "retry    " in run(capsys, "experiment", "run", path, "--out", out, "--dry-run")[1]
    code, text = run(capsys, "experiment", "run", path, "--out", out)
    assert code == 0 and "retry rnn-seed0: it failed for a reason of the machine" in text
    assert "retried 1 run(s) that had failed for a reason of the machine" in text and "rnn-seed0 -> done" in text
    assert run_state(runs / "rnn-seed0") == "done"
    kept = [json.loads(line) for line in (runs / "rnn-seed0" / "failures.jsonl").read_text().splitlines()]
    assert kept == [status]
    # the run is the same as one that never failed
    (tmp_path / "ref").mkdir()
    ref = experiment(tmp_path / "ref", seeds=[0], models={"rnn": {"model": "rnn", "model_args": {"hidden_size": 64}}})
    assert run(capsys, "experiment", "run", ref, "--out", tmp_path / "ref-out")[0] == 0
    assert (runs / "rnn-seed0" / "metrics.jsonl").read_text() == \
        (tmp_path / "ref-out" / "tiny" / "cpu" / "rnn-seed0" / "metrics.jsonl").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_scale_without_cuda_is_retried_not_final(tmp_path, capsys):
    path = experiment(tmp_path, seeds=[0])
    out, run_dir = tmp_path / "out", tmp_path / "out" / "tiny" / "gpu" / "rnn-seed0"
    for attempt in (1, 2):
        code, text = run(capsys, "experiment", "run", path, "--out", out, "--scale", "gpu")
        assert code == 1 and "CUDA is not available here" in text
        assert (attempt == 1) == ("retried" not in text)
    assert "retried 1 run(s)" in text and "rnn-seed0 -> failed" in text
    assert inspect(run_dir)[0] == "retry" and len((run_dir / "failures.jsonl").read_text().splitlines()) == 1


def test_changed_settings_are_refused_naming_the_keys(tmp_path, capsys):
    path = experiment(tmp_path)
    out = tmp_path / "out"
    assert run(capsys, "experiment", "run", path, "--out", out)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    experiment(tmp_path, budget={"steps": 6}, models={"rnn": {"model": "rnn", "model_args": {"hidden_size": 16}}})
    for dry in ([], ["--dry-run"]):
        proc = matrec_cli("experiment", "run", path, "--out", out, *dry)
        line = one_line_error(proc, "experiment", "2 run(s)", "rnn-seed0 (", "rnn-seed1 (", "Nothing was run")
        assert "model_args.hidden_size: 8 in the run, 16 in the file" in line
        assert "steps: 4 in the run, 6 in the file" in line
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a setting that decides when a run stops (the target) counts too; threads and display do not
    experiment(tmp_path, target="recall >= 2", train={**TRAIN, "threads": 2, "progress": True})
    proc = matrec_cli("experiment", "run", path, "--out", out)
    one_line_error(proc, "experiment", "target: None in the run, 'recall >= 2' in the file")
    experiment(tmp_path, train={**TRAIN, "threads": 2, "progress": True})
    assert run(capsys, "experiment", "run", path, "--out", out)[1].count("skip ") == 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-run grid (with a target, so it has timing.jsonl) to damage copies of."""
    tmp = tmp_path_factory.mktemp("grid")
    path = experiment(tmp, target="recall >= 2")
    assert cli.main(["experiment", "run", str(path), "--out", str(tmp / "out")]) == 0
    return path, tmp / "out"


def _metrics_with(run_dir: Path, change) -> bytes:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    change(records)
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _last_eval(key, value):
    def change(records):
        [r for r in records if r["kind"] == "eval"][-1][key] = value
    return change


def _first_train(key, value):
    def change(records):
        next(r for r in records if r["kind"] == "train")[key] = value
    return change


DAMAGE = {   # file -> what is written in it; the case's id
    "status-binary": ("status.json", b"\x80\x81\xff\x00"),
    "status-list": ("status.json", b"[1]"),
    "cell-binary": ("cell.json", b"\xff\xfe\x00"),
    "cell-list": ("cell.json", b"[1]"),
    "cell-empty-object": ("cell.json", b"{}"),
    "summary-binary": ("summary.json", b"\x89PNG\x00"),
    "summary-list": ("summary.json", b"[1]"),
    "timing-binary": ("timing.jsonl", b"\x00\xff\n{\"step\": 2, \"train_seconds\": 0.1}\n"),
    "timing-list": ("timing.jsonl", b"[1]\n{\"step\": 2, \"train_seconds\": 0.1}\n"),
    "timing-empty-object": ("timing.jsonl", b"{}\n{\"step\": 2, \"train_seconds\": 0.1}\n"),
    "loss-not-a-number": ("metrics.jsonl", lambda run: _metrics_with(run, _first_train("loss", "x"))),
    "metrics-empty": ("metrics.jsonl", b""),
    "eval-nan": ("metrics.jsonl", lambda run: _metrics_with(run, _last_eval("recall", float("nan")))),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_file_is_named_and_the_rest_goes_on(finished, tmp_path, capsys, case):
    path, source = finished
    out = tmp_path / "out"
    shutil.copytree(source, out)
    folder = out / "tiny" / "cpu"
    name, content = DAMAGE[case]
    target = folder / "rnn-seed0" / name
    content = content(folder / "rnn-seed0") if callable(content) else content
    target.write_bytes(content)
    shutil.rmtree(folder / "rnn-seed1")          # the other run: to be run again now
    code, text = run(capsys, "experiment", "run", path, "--out", out)
    assert code == 1 and f"damaged rnn-seed0: {str(target)!r}" in text, text
    assert "done  rnn-seed1" in text and "1 runs done" in text and "1 damaged" in text
    assert target.read_bytes() == content      # left alone: nothing of a damaged run is rewritten
    assert "damaged  " in run(capsys, "experiment", "run", path, "--out", out, "--dry-run")[1]
    code = cli.main(["experiment", "report", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and f"damaged run {str(folder / 'rnn-seed0')!r}" in captured.err
    assert "1/2 (1 damaged)" in captured.out and "Damaged runs (counted, no numbers): rnn-seed0" in captured.out


def test_a_killed_run_without_target_stays_in_its_experiment_as_partial(tmp_path, capsys):
    train = {**TRAIN, "eval_every": 100, "ckpt_every": 20, "log_every": 10}
    path = experiment(tmp_path, seeds=[0, 1], budget={"steps": 600}, train=train)
    out = tmp_path / "out"
    run_dir = out / "tiny" / "cpu" / "rnn-seed0"
    killed = kill_after_first_checkpoint(["experiment", "run", str(path), "--out", str(out)], run_dir)
    assert 0 < killed < 600
    assert json.loads((run_dir / "cell.json").read_text())["experiment"] == "tiny"
    code = cli.main(["experiment", "report", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "## tiny (cpu scale)" in text and "## cpu" not in text
    assert "0/1 (1 partial)" in text


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"   # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_jobs_workers_end_with_a_driver_killed_by_sigkill(tmp_path, capsys):
    path = experiment(tmp_path, budget={"steps": 100_000}, train={**TRAIN, "eval_every": 1000, "ckpt_every": 50})
    out = tmp_path / "out"
    runs = [out / "tiny" / "cpu" / f"rnn-seed{s}" for s in (0, 1)]
    driver = subprocess.Popen([sys.executable, "-m", "matrec.cli", "experiment", "run", str(path), "--out",
                               str(out), "--jobs", "2"], env={**os.environ, "PYTHONPATH": str(SRC)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not all((r / "checkpoints" / "latest.json").exists() for r in runs) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [json.loads((r / ".lock").read_text())["pid"] for r in runs]
    assert all(_alive(w) for w in workers) and driver.pid not in workers
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [w for w in workers if _alive(w)]
    for w in left:   # no stray training processes after a failed test
        os.kill(w, signal.SIGKILL)
    assert not left, "a worker outlived its driver"
    text = run(capsys, "experiment", "run", path, "--out", out, "--dry-run")[1]
    assert text.count("partial  ") == 2     # resumable now, not blocked by a live worker


def test_a_task_on_the_drivers_machine_ends_with_it_too(tmp_path):
    """The watch used where the run's process is not the driver's child (a Ray task on the
    driver's machine): it follows the driver's pid."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    script = ("import sys, time; from matrec.experiment.runner import end_with_driver; "
              f"end_with_driver({{'host': {socket.gethostname()!r}, 'pid': {driver.pid}}}); "
              "print('watching', flush=True); time.sleep(120)")
    task = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(SRC)},
                            stdout=subprocess.PIPE, text=True)
    assert task.stdout.readline().strip() == "watching"
    driver.kill()
    driver.wait()
    assert task.wait(timeout=20) == -signal.SIGTERM


@pytest.mark.slow
def test_two_runs_on_one_folder_share_the_grid_and_both_succeed(tmp_path):
    path = experiment(tmp_path, seeds=[0, 1, 2, 3], budget={"steps": 300},
                      train={**TRAIN, "eval_every": 100, "ckpt_every": 100, "log_every": 50})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "matrec.cli", "experiment", "run", str(path), "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(run_state(out / "tiny" / "cpu" / f"rnn-seed{s}") == "done" for s in range(4))
    said = results[0][0] + results[1][0]
    # each run trained once: by one of the two, the other skipped it or waited and found it done
    assert sum(said.count(f"done  rnn-seed{s}: steps at step 300\n") for s in range(4)) == 4, said
    assert "finished by another process" in said or said.count("skip ") >= 4, said


def _cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
def test_dry_run_of_a_100000_run_grid_is_linear_and_warns(tmp_path):
    lrs = [round(1e-4 * (1 + i / 50_000), 12) for i in range(50_000)]
    path = experiment(tmp_path, grid={"train.lr": lrs})
    before = _cpu_seconds_of_children()   # CPU time, not wall time: the test machine is shared
    proc = matrec_cli("experiment", "run", path, "--out", tmp_path / "out", "--dry-run", timeout=900)
    seconds = _cpu_seconds_of_children() - before
    assert proc.returncode == 0, proc.stderr
    assert "warning: 100,000 runs (more than 10,000)" in proc.stdout and proc.stdout.count("\nnew ") == 100_000
    # the quadratic name check alone took 200 s; the whole dry run is ~22 s of CPU (2-core machine)
    assert seconds < 90, seconds
    experiment(tmp_path, grid={"train.lr": [*lrs[:3], lrs[0]]})
    one_line_error(matrec_cli("experiment", "run", path, "--out", tmp_path / "out", "--dry-run"), "experiment",
                   "same run name twice")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_a_file_nested_20000_deep_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"a": ' * 20_000 + "1" + "}" * 20_000 if suffix == ".json"
                    else "a = " + "[" * 20_000 + "]" * 20_000 + "\n")
    one_line_error(matrec_cli("experiment", "run", path, "--dry-run"), "experiment", str(path), "nested too deeply")


def test_a_model_label_with_a_nul_byte_is_refused_up_front(tmp_path):
    path = experiment(tmp_path, models={"rn\u0000n": {"model": "rnn"}})
    one_line_error(matrec_cli("experiment", "run", path, "--out", tmp_path / "out", "--dry-run"), "experiment",
                   "model label 'rn\\x00n' cannot start a folder name")
    assert not (tmp_path / "out").exists()
