"""matrec for Keras 3 (optional: ``pip install matrec[keras]``): the orthogonal MORNN layer.

Importing this subpackage imports keras; ``import matrec`` never does. Set ``KERAS_BACKEND``
before the first keras import to pick the backend (TensorFlow and torch are tested).
"""
import importlib.util
import sys

# TensorFlow and Triton each bundle LLVM; whichever loads second aborts the process ("LLVM ERROR:
# inconsistency in registered CommandLine options") unless Triton comes first. torch imports Triton
# lazily (torch._dynamo, reached by the custom ops behind matrec.MORNN's modrelu/identity path), so
# with Triton installed it is loaded here, before keras brings in TensorFlow.
if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
    import torch._dynamo  # noqa: F401

from .layers import ACTIVATIONS, MORNN, MORNNCell
from .optimizers import (OrthogonalAdam, OrthogonalAdamW, OrthogonalRMSprop, OrthogonalSGD,
                         orthogonal_optimizer, orthogonality_report)
from .convert import from_torch, load_from_torch, load_simplernn_weights, simplernn_weights, to_torch
from .orthogonal import KERAS_MORNN_INITS, KERAS_ORTHOGONAL_MAPS

__all__ = ["ACTIVATIONS", "KERAS_MORNN_INITS", "KERAS_ORTHOGONAL_MAPS", "MORNN", "MORNNCell",
           "OrthogonalAdam", "OrthogonalAdamW", "OrthogonalRMSprop", "OrthogonalSGD",
           "from_torch", "load_from_torch", "load_model", "load_simplernn_weights", "orthogonal_optimizer",
           "orthogonality_report", "simplernn_weights", "to_torch"]


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """``keras.models.load_model`` for a model holding matrec layers or optimizers.

    Keras finds a saved custom class only if its module was imported before loading; importing
    ``matrec.keras`` registers MORNN, MORNNCell and the Orthogonal* optimizers. Without that import
    ``keras.models.load_model`` fails with "Could not locate class 'MORNN'" (its message shows
    ``'module': 'matrec.keras.layers'``); this function is the same call with the import done."""
    import keras
    return keras.models.load_model(filepath, custom_objects=custom_objects, compile=compile,
                                   safe_mode=safe_mode)
