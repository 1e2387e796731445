"""benchmarks/cpu_recurrence.py times every row it documents, and the GEMM limit adds up."""
from support import load_benchmark as load


def test_cpu_recurrence_benchmark_times_every_row():
    long, grid = load("cpu_recurrence").main(["--batch", "2", "--hidden", "4", "--seq", "6", "--grid-batch", "1,2",
                                              "--grid-hidden", "4", "--grid-seq", "3", "--repeats", "1"])
    rows = {r["row"]: r for r in long.rows}
    models = [name for name in rows if not name.startswith("(") and not name.startswith("GEMM")]
    assert models[0] == "nn.RNN tanh" and len(models) == 5
    assert all(rows[m]["us"] > 0 and rows[m]["ratio"] == rows[m]["us"] / rows["nn.RNN tanh"]["us"] for m in models)
    parts = [rows[f"({k})"]["us"] for k in ("forward GEMMs", "backward GEMMs", "dW GEMM")]
    limit = rows["GEMM limit (sum of the three)"]["us"]
    assert abs(limit - sum(parts)) < 1e-9 and all(rows[m]["share"] == limit / rows[m]["us"] for m in models)
    assert [r["model"] for r in grid.rows] == ["nn.RNN tanh", "nn.LSTM", "nn.GRU", "MORNN tanh", "MORNN modrelu"]
    assert all(set(r) == {"model", "B1 H4", "B2 H4"} for r in grid.rows)
