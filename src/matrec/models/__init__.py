"""Models: complete sequence models assembled from the layers of :mod:`matrec.nn`.

Contract shared with the workbench: ``build_model(name, *, vocab_size=None, input_size=None,
output_size, **kwargs)`` returns a module whose ``forward(x, state=None) -> (out, new_state)`` maps
token ids ``[B, T]`` (when ``vocab_size`` is given) or features ``[B, T, input_size]`` to
``[B, T, output_size]``, and carries its recurrent state / cache in ``new_state``.

The assembly only: the mixer registry (``MIXERS``) and :class:`SequenceModel` that stacks mixers,
the recurrent wrappers, the registered models and presets (``PRESETS``, :func:`list_presets`), and
:func:`generate` for sampling from any of them.
"""
from ..nn.positional import POSITIONS
from .generate import generate
from .mixers import MIXERS
from .recurrent import RecurrentModel
from .registry import MODELS, build_model
from .seasonal import SeasonalNaive
from .autoregressive import LinearAR
from .sequence import SequenceModel, num_parameters
from .zoo import PRESETS, list_presets

__all__ = ["MODELS", "build_model", "MIXERS", "POSITIONS", "SequenceModel", "RecurrentModel", "SeasonalNaive",
           "LinearAR", "num_parameters", "generate", "PRESETS", "list_presets"]
