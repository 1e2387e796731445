"""Models: a registry of complete sequence models built from :mod:`matrec.nn` and torch layers.

Contract shared with the workbench: ``build_model(name, *, vocab_size=None, input_size=None,
output_size, **kwargs)`` returns a module whose ``forward(x, state=None) -> (out, new_state)`` maps
token ids ``[B, T]`` (when ``vocab_size`` is given) or features ``[B, T, input_size]`` to
``[B, T, output_size]``, and carries its recurrent state / cache in ``new_state``.

The model zoo: sequence mixers (``MIXERS``) stacked by :class:`SequenceModel`, the registered models
and presets (``PRESETS``, :func:`list_presets`), and :func:`generate` for sampling from any of them.
"""
from .registry import MODELS, build_model
from . import recurrent as _recurrent  # noqa: F401  (registers rnn, lstm, gru, mornn)
from .mixers import MIXERS
from ..nn import attention as _attention  # noqa: F401  (registers attn, mru_rotary)
from ..nn import linear_attention as _linear_attention  # noqa: F401  (registers linear_attn)
from ..nn import transformer_xl as _transformer_xl  # noqa: F401  (registers txl)
from ..nn.positional import POSITIONS
from .sequence import SequenceModel, num_parameters
from .generate import generate
from .zoo import PRESETS, list_presets

__all__ = ["MODELS", "build_model", "MIXERS", "POSITIONS", "SequenceModel", "num_parameters",
           "generate", "PRESETS", "list_presets"]
