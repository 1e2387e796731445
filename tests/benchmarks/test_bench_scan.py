"""benchmarks/scan.py runs, checks before timing, and refuses a backend that disagrees with the loop."""
import json

import torch

from matrec.ops.mru_scan import SCAN_BACKENDS, ScanBackend, naive_mru_scan
from support import load_benchmark


def load_bench():
    return load_benchmark("scan")


def test_bench_reports_good_and_refuses_bad(monkeypatch, tmp_path):
    def wrong(states, initial_state):  # off by a factor: must never be timed
        return 2 * naive_mru_scan(states, initial_state)

    monkeypatch.setitem(SCAN_BACKENDS._items, "wrong", ScanBackend(function=wrong))
    table = load_bench().main(["--device", "cpu", "--shapes", "2,1,9,2", "--backends", "sequential", "chunked",
                               "wrong", "--repeats", "1", "--json", str(tmp_path / "scan.json")])
    rows = {row["backend"]: row for row in table.rows}
    assert set(rows) == {"sequential", "chunked", "wrong"} and set(table.column("shape")) == {"2, 1, 9, 2"}
    assert rows["wrong"]["status"].startswith("FAILED check") and "forward_ms" not in rows["wrong"]
    assert rows["chunked"]["status"] == "ok" and rows["chunked"]["forward_ms"] > 0
    assert rows["chunked"]["speedup"] == rows["sequential"]["fwd_bwd_ms"] / rows["chunked"]["fwd_bwd_ms"]
    saved = json.loads((tmp_path / "scan.json").read_text())
    assert saved["tables"][0]["rows"] == table.rows


def test_default_shapes_cover_the_records():
    """The reference shapes (docs/design.md §7) everywhere; on CUDA also the kernel records
    (T >= 65536, small batch x heads)."""
    bench = load_bench()
    spec = {"64,6,256,8", "80,3,512,16", "8,4,4096,16"}
    cpu = [bench.parse_shape(s) for s in bench.default_shapes(torch.device("cpu"))]
    cuda = [bench.parse_shape(s) for s in bench.default_shapes(torch.device("cuda"))]
    assert spec <= set(bench.default_shapes(torch.device("cpu"))) and max(T for _, _, T, _ in cpu) < 65536
    assert spec <= set(bench.default_shapes(torch.device("cuda")))
    assert any(T >= 65536 for _, _, T, _ in cuda)
    assert any(B * h <= 2 for B, h, T, _ in cuda if T < 65536)


def graph_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_outputs_come_from_the_one_autograd_function():
    from matrec import mru_scan

    states = torch.eye(3).repeat(2, 5, 1, 1).requires_grad_()
    h0 = torch.eye(3).repeat(2, 1, 1).requires_grad_()
    for name in ["sequential", "hillis_steele", "brent_kung", "sklansky", "chunked"]:
        nodes = graph_nodes(mru_scan(states, h0, backend=name))
        assert any("PatternScan" in n for n in nodes), nodes
        # no autograd through the scan's products: no matmul or stack nodes in the graph
        assert not any(k in n for n in nodes for k in ("Mm", "Matmul", "Stack")), nodes
    assert any("Bmm" in n or "Mm" in n for n in graph_nodes(naive_mru_scan(states, h0)))
