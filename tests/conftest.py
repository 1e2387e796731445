"""Suite-wide settings."""
import torch

# The tests use tiny tensors: one intra-op thread is faster than two (no synchronisation), and on a
# shared 2-core machine extra threads oversubscribe the cores (measured: 500 tiny Adam steps took
# ~1.5 s on one thread, ~30 s on two under load).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip cleanly without a GPU; ``pytest -m cuda`` selects exactly them
    (benchmarks/gpu_check.py runs that selection on a GPU machine)."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
