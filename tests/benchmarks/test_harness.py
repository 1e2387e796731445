"""benchmarks/_harness.py: timing, the reference check and tables, as every script uses them."""
import json

import pytest
import torch

from support import load_benchmark


@pytest.fixture(scope="module")
def harness():
    return load_benchmark("_harness")


def test_best_ms_each_runs_round_robin_after_warmup(harness):
    calls = []
    ms = harness.best_ms_each({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu",
                              repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5 and set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        harness.best_ms(lambda: None, "cpu", repeats=0)


def test_check_close(harness):
    ref = torch.tensor([1.0, 2.0, 4.0])
    assert harness.check_close([("output", ref + 1e-7, ref)], 1e-5) is None
    assert "output relative error" in harness.check_close([("output", 2 * ref, ref)], 1e-5)
    assert "shape" in harness.check_close([("gradient", ref[:2], ref)], 1e-5)


def test_table_rows_markdown_and_json(harness, tmp_path, capsys):
    table = harness.Table({"name": "name", "ms": "time (ms)"}, title="t", formats={"ms": "{:.1f}"}, stream=True)
    table.add(name="x", ms=1.234)
    table.add(name="y")  # a missing cell prints empty
    with pytest.raises(KeyError, match="not columns"):
        table.add(nope=1)
    printed = capsys.readouterr().out
    assert printed.strip() == table.markdown().strip()
    assert "| x | 1.2 |" in printed and "| y |  |" in printed
    assert table.column("ms") == [1.234, None]
    harness.write_json(str(tmp_path / "r.json"), [table], device="cpu")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["device"] == "cpu" and saved["tables"][0]["rows"] == [{"name": "x", "ms": 1.234}, {"name": "y"}]
