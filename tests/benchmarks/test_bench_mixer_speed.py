"""benchmarks/mixer_speed.py: every mixer timed after its reference check, the skip rule, failures reported."""
import pytest

from support import load_benchmark

speed = load_benchmark("mixer_speed")


def test_quick_run_times_every_mixer_after_its_check():
    table = speed.main(["--quick"])
    assert len(table.rows) == len(speed.MIXER_SPECS) * 2 * 2   # mixers x lengths x batches
    for row in table.rows:
        assert row["ms"] > 0 and "FAILED" not in row.get("note", ""), row
        if row["mixer"] != "attn":
            assert row["vs_attn"] == pytest.approx(
                next(r["ms"] for r in table.rows if r["mixer"] == "attn" and r["T"] == row["T"]
                     and r["batch"] == row["batch"]) / row["ms"])
    assert {r["note"] for r in table.rows if r["mixer"] == "mru"} <= {"scan brent_kung", "scan sequential"}


def test_a_configuration_predicted_too_slow_is_not_run():
    table = speed.main(["--width", "24", "--heads", "2", "--repeats", "1", "--mixers", "attn", "--batches", "1",
                        "--lengths", "16", "64", "256",
                        "--max-seconds", "1e-9"])
    first, *rest = table.rows
    assert first["ms"] > 0
    assert all("ms" not in r and r["note"].startswith("not run: ~") for r in rest)


def test_a_mismatch_is_reported_instead_of_a_time(monkeypatch):
    monkeypatch.setitem(speed.MIXER_SPECS, "mru", ("mru", {}, {"backend": "sequential", "state_matrix": "cayley"}, 1))
    table = speed.main(["--width", "24", "--heads", "2", "--repeats", "1", "--mixers", "mru", "--batches", "1",
                        "--lengths", "16"])
    row, = table.rows
    assert "ms" not in row and row["note"].startswith("FAILED against")


def test_process_clock_counts_this_process_only():
    table = speed.main(["--width", "24", "--heads", "2", "--repeats", "1", "--mixers", "mru", "--batches", "1",
                        "--lengths", "16", "--clock", "process"])
    row, = table.rows
    assert row["ms"] > 0 and "process time" in table.title
    assert speed.best_process_ms(lambda: __import__("time").sleep(0.05), repeats=1, warmup=0) < 20   # sleeping is free
    with pytest.raises(SystemExit):
        speed.main(["--device", "cuda", "--clock", "process"])
