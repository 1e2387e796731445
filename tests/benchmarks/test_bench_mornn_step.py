"""benchmarks/mornn_step.py measures every row it documents, on every size asked for."""
from support import load_benchmark as load


def test_step_latency_benchmark_measures_every_row():
    bench = load("mornn_step")
    result = bench.measure([4, 6], steps=3, repeats=1)
    rows = list(bench.candidates(2))
    assert set(result) == {(row, H) for row in rows for H in (4, 6)}
    assert all(t > 0 for t in result.values())
    assert {bench.ratio_to_reference(row) for row in rows} == {"nn.RNN tanh", "nn.RNNCell tanh"}
