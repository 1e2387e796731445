"""Helpers shared by several test files (not collected: the name does not start with test_)."""
import importlib.util
from pathlib import Path

import torch
from torch import nn

from matrec.ops.orthogonal import project_orthogonal

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def orthogonal_rnn(*args, **kwargs) -> nn.RNN:
    """An nn.RNN whose recurrent matrices are made orthogonal."""
    rnn = nn.RNN(*args, **kwargs)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(project_orthogonal(p))
    return rnn
