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


class _Parsed(Exception):
    """Raised in place of parsing: the script's parser, caught before the script runs anything."""


def test_every_script_declares_quick_exactly_when_its_parser_has_it(monkeypatch):
    import argparse
    import sys

    from matrec.cli import declares_quick
    from support import BENCHMARKS

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    checked = {}
    for script in sorted(BENCHMARKS.glob("[!_]*.py")):
        monkeypatch.setattr(sys, "argv", [str(script)])
        try:
            module = load_benchmark(script.stem)
        except ImportError:          # an optional framework (Keras) that is not installed
            continue
        with pytest.raises(_Parsed) as caught:
            module.main()
        parser = caught.value.args[0]
        has_flag = any("--quick" in action.option_strings for action in parser._actions)
        checked[script.stem] = has_flag
        assert declares_quick(script) == has_flag, script.name
        if has_flag:   # the declaration is the flag's help: one text for both
            (action,) = [a for a in parser._actions if "--quick" in a.option_strings]
            assert action.help == module.QUICK
    assert {"scan", "gpu_check", "mru_stability"} <= {k for k, v in checked.items() if v}
    assert "mornn" in checked and not checked["mornn"]
