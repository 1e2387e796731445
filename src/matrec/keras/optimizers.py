"""The training recipe for Keras MORNNs: orthogonal parameters at a tenth of the learning rate.

Keras optimizers have one learning rate for all variables, so the recipe (PyTorch's
``matrec.mornn_param_groups``) is a subclass per optimizer that updates the orthogonal parameters
(each MORNN's ``recurrent_A``) with ``orthogonal_scale * learning_rate`` and without weight decay,
and the other variables as the base optimizer does. The subclasses are registered, so a compiled
model saves and loads with its optimizer.
"""
from __future__ import annotations

import keras
from keras import ops

from ..checks import check_positive
from .layers import MORNNCell
from .orthogonal import orthogonality_error_np

__all__ = ["OrthogonalAdam", "OrthogonalAdamW", "OrthogonalRMSprop", "OrthogonalSGD",
           "orthogonal_optimizer", "orthogonality_report"]


def _is_orthogonal(variable) -> bool:
    return bool(getattr(variable, "_matrec_orthogonal", False))


class _OrthogonalMixin:
    """Splits each update: orthogonal variables at ``orthogonal_scale * lr``, the rest at ``lr``."""

    def __init__(self, *args, orthogonal_scale=0.1, **kwargs):
        check_positive("orthogonal_scale", orthogonal_scale)
        super().__init__(*args, **kwargs)
        self.orthogonal_scale = float(orthogonal_scale)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        orth = [i for i, v in enumerate(trainable_variables) if _is_orthogonal(v)]
        if not orth:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        other = [i for i in range(len(trainable_variables)) if i not in set(orth)]
        if other:
            super()._backend_update_step([grads[i] for i in other],
                                         [trainable_variables[i] for i in other], learning_rate)
        super()._backend_update_step([grads[i] for i in orth], [trainable_variables[i] for i in orth],
                                     learning_rate * self.orthogonal_scale)

    def _use_weight_decay(self, variable):
        # decay would pull A towards 0, i.e. W towards its base: a meaningless target after a refold
        return not _is_orthogonal(variable) and super()._use_weight_decay(variable)

    def get_config(self):
        return {**super().get_config(), "orthogonal_scale": self.orthogonal_scale}


def _orthogonal_class(base: type) -> type:
    cls = type(f"Orthogonal{base.__name__}", (_OrthogonalMixin, base), {
        "__doc__": f"``keras.optimizers.{base.__name__}`` with every MORNN ``recurrent_A`` updated at "
                   f"``orthogonal_scale * learning_rate`` (default 0.1) and no weight decay.",
        "__module__": __name__,
    })
    return keras.saving.register_keras_serializable(package="matrec")(cls)


OrthogonalAdam = _orthogonal_class(keras.optimizers.Adam)
OrthogonalAdamW = _orthogonal_class(keras.optimizers.AdamW)
OrthogonalRMSprop = _orthogonal_class(keras.optimizers.RMSprop)
OrthogonalSGD = _orthogonal_class(keras.optimizers.SGD)
_BY_NAME = {"adam": OrthogonalAdam, "adamw": OrthogonalAdamW, "rmsprop": OrthogonalRMSprop,
            "sgd": OrthogonalSGD}


def orthogonal_optimizer(optimizer: str = "rmsprop", learning_rate: float = 1e-3, *,
                         orthogonal_scale: float = 0.1, **kwargs):
    """The recipe's optimizer: ``optimizer`` ("rmsprop", "adam", "adamw", "sgd") at
    ``learning_rate`` for every variable but the MORNN orthogonal parameters, which get
    ``orthogonal_scale * learning_rate``. Other keyword arguments go to the optimizer (e.g.
    ``clipnorm=1.0``, as in the recipe).

    Example::

        model.compile(optimizer=orthogonal_optimizer("rmsprop", 1e-3, clipnorm=1.0), loss=...)
    """
    key = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if key not in _BY_NAME:
        raise ValueError(f"optimizer must be one of {sorted(_BY_NAME)}, got {optimizer!r}")
    check_positive("learning_rate", learning_rate)
    return _BY_NAME[key](learning_rate=learning_rate, orthogonal_scale=orthogonal_scale, **kwargs)


def orthogonality_report(model) -> dict[str, float]:
    """``{"<cell path>/orth_error": max |W^T W - I|}`` (float64) for every built MORNN cell in
    ``model`` (a model or a layer, Bidirectional wrappers included)."""
    report = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, MORNNCell) and layer.built:
            W = ops.convert_to_numpy(layer.recurrent_weight())
            report[f"{layer.path}/orth_error"] = orthogonality_error_np(W)
    return report
