"""matrec: matrix-valued recurrences for PyTorch.

Public names are imported on first use, so ``import matrec`` stays light (torch and numpy only) and
the workbench's heavier dependencies load only when the workbench is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Registry": "matrec.registry",
    # ops
    "mru_scan": "matrec.ops.mru_scan",
    "SCAN_BACKENDS": "matrec.ops.mru_scan",
    "state_matrix": "matrec.ops.state_matrix",
    "state_matrix_numel": "matrec.ops.state_matrix",
    "STATE_MATRICES": "matrec.ops.state_matrix",
    "ORTHOGONAL_MAPS": "matrec.ops.orthogonal",
    # nn
    "MRU": "matrec.nn.mru",
    "MORNN": "matrec.nn.mornn",
    "MORNNCell": "matrec.nn.mornn",
    "mornn_param_groups": "matrec.nn.mornn_training",
    "orthogonality_report": "matrec.nn.mornn_training",
    "track_optimizer_steps": "matrec.nn.orthogonal",
    # models
    "build_model": "matrec.models",
    "MODELS": "matrec.models",
    "MIXERS": "matrec.models",
    "SequenceModel": "matrec.models",
    "generate": "matrec.models",
    "list_presets": "matrec.models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'matrec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return __all__
