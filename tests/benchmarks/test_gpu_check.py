"""benchmarks/gpu_check.py in its CPU quick mode, so the GPU proof cannot rot while no GPU is around."""
import json

import pytest

from support import load_benchmark

gpu_check = load_benchmark("gpu_check")

TABLES = {
    "tests": {"CUDA tests"},
    "scan": {"scan: device", "scan: correctness", "scan: time", "scan: summary"},
    "guard": {"guard: first-use check"},
    "mornn": {"mornn: recurrence correctness", "mornn: fwd+bwd"},
    "copy": {"copy: setup", "copy: result"},
    "lm": {"lm: preset training step", "lm: mixer fwd+bwd"},
}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # caps x4: this checks that every part runs and reports, not how fast a shared CPU runs them
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--cap-scale", "4"])
    return rc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), out


def test_quick_mode_runs_every_part_and_reports_it(quick_report):
    rc, report, md, out = quick_report
    assert rc == 0
    assert [p["part"] for p in report["parts"]] == list(gpu_check.PARTS)
    for part in report["parts"]:
        assert part["status"] == "ok", part
        tables = {r["table"] for r in part["records"]}
        assert TABLES[part["part"]] <= tables, (part["part"], tables)
        assert f"## {part['part']}" in md
    assert report["environment"]["torch"] and report["environment"]["device"] == "cpu"
    assert not list(out.glob("records-*.jsonl")) and not list(out.glob("log-*.txt"))  # folded in
    assert "===== scan" in (out / "gpu_check.log").read_text()


def test_quick_mode_checks_before_it_times(quick_report):
    _, report, _, _ = quick_report
    scan = next(p for p in report["parts"] if p["part"] == "scan")
    checked = {(r["row"]["shape"], r["row"]["backend"]) for r in scan["records"]
               if r["table"] == "scan: correctness" and r["row"]["result"] == "ok"}
    timed = {(r["row"]["shape"], r["row"]["backend"]) for r in scan["records"] if r["table"] == "scan: time"}
    assert timed and timed <= checked  # nothing is timed that did not pass its check
    mornn = next(p for p in report["parts"] if p["part"] == "mornn")
    results = [r["row"]["result"] for r in mornn["records"] if r["table"] == "mornn: recurrence correctness"]
    assert results and all(r == "ok" for r in results)


def test_a_part_past_its_cap_is_recorded_and_the_rest_still_run(tmp_path):
    # a cap far below what the test part needs: pytest is stopped, its counts still recorded
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--only", "tests", "guard",
                         "--cap-scale", "0.02"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {p["part"]: p["status"] for p in report["parts"]}
    assert rc == 1 and status["tests"].startswith("timed out")
    assert list(status) == ["tests", "guard"]  # the driver went on to the next part


def test_only_and_skip_select_parts(tmp_path):
    gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--only", "guard", "scan",
                    "--skip", "scan"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["part"] for p in report["parts"]] == ["guard"]


@pytest.mark.parametrize("argv,match", [
    (["--only", "nope"], "invalid choice"),
    (["--cap-scale", "0"], "--cap-scale must be > 0"),
])
def test_bad_arguments_are_named(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path)] + argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
