"""benchmarks/inference.py measures every cell it documents and states each target with its numbers."""
import importlib.util
import re

from support import load_benchmark as load


def test_inference_benchmark_measures_every_cell(tmp_path):
    """Eager and ONNX Runtime (the runners themselves are tested in tests/export; ExecuTorch's
    lowering would add ~10 s here)."""
    bench = load("inference")
    runtimes = ("eager",) + (("onnxruntime",) if importlib.util.find_spec("onnxruntime") else ())
    result = bench.measure(True, [8, 32], repeats=1, runtimes=runtimes, out_dir=tmp_path)
    name = next(iter(bench.models(True)))
    assert {(name, r, L) for r in runtimes for L in (8, 32)} == set(result["latency"])
    assert all(t > 0 for t in result["latency"].values())
    assert result["state_bytes"][name, 32] == 8 * 4  # one [1, 1, 8] float32 hidden state
    if "onnxruntime" in runtimes:
        assert result["file_bytes"][name, "onnxruntime"] == (tmp_path / "MORNN_H8.onnx").stat().st_size
    table, _ = bench.tables(result, [8, 32])
    assert table.column("runtime") == list(runtimes)
    lines = bench.targets(result, [8, 32])
    assert lines and all(re.search(r"-> (holds|does not hold)", line) for line in lines)
