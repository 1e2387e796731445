"""Models: a registry of complete sequence models built from :mod:`matrec.nn` and torch layers.

Contract shared with the workbench: ``build_model(name, *, vocab_size=None, input_size=None,
output_size, **kwargs)`` returns a module whose ``forward(x, state=None) -> (out, new_state)`` maps
token ids ``[B, T]`` (when ``vocab_size`` is given) or features ``[B, T, input_size]`` to
``[B, T, output_size]``, and carries its recurrent state / cache in ``new_state``.
"""
from .registry import MODELS, build_model
from . import recurrent as _recurrent  # noqa: F401  (registers rnn, lstm, gru)

__all__ = ["MODELS", "build_model"]
