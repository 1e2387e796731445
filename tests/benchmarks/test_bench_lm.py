"""benchmarks/lm.py: one configuration runs a real training step and reports it."""
import argparse

from matrec.models import build_model, num_parameters
from support import load_benchmark


def load_bench():
    return load_benchmark("lm")


def test_lm_benchmark_runs_one_configuration():
    args = argparse.Namespace(model="linear_attn", T=9, device="cpu", batch=None, tokens=18, steps=1,
                              warmup=0, dtype="fp32")
    r = load_bench().run_one(args)
    assert (r["model"], r["T"], r["batch"]) == ("linear_attn", 9, 2)  # batch = tokens // T
    assert r["ms"] > 0 and r["peak_mib"] > 0
    assert abs(r["tokens_per_s"] - 2 * 9 / r["ms"] * 1e3) < 1e-6 * r["tokens_per_s"]
    assert r["params"] == num_parameters(build_model("shakespeare-linear_attn", vocab_size=65, output_size=65))


def test_lm_benchmark_table_from_its_subprocesses():
    """main() runs each configuration in its own process and returns the rows it printed."""
    table = load_bench().main(["--device", "cpu", "--models", "linear_attn", "--lengths", "9", "--tokens", "18",
                               "--steps", "1", "--warmup", "0"])
    (row,) = table.rows
    assert (row["model"], row["T"], row["batch"], row["status"]) == ("linear_attn", 9, 2, "ok")
    assert row["ms"] > 0 and row["params"] > 0
