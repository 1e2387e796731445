"""Weights between the PyTorch ``matrec.MORNN`` and the Keras :class:`MORNN`, both ways.

Layer ``k`` of a PyTorch MORNN is one Keras layer: ``MORNN`` (one direction) or
``keras.layers.Bidirectional(MORNN(...))`` (merge_mode "concat", PyTorch's output layout). Per
direction: ``kernel = weight_ih^T``, ``bias = bias_ih + bias_hh`` (Keras has one bias; going back,
``bias_ih = bias`` and ``bias_hh = 0``), ``modrelu_bias`` as is, and the recurrent matrix
``W = weight_hh`` moves as a matrix: it becomes the receiving side's base (projected onto the
orthogonal matrices in float64) with ``A = 0``. The outputs then agree to float32 rounding whatever
orthogonal map either side uses; the split of ``W`` into base and ``A`` is not carried over.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from .layers import MORNN, TORCH_NONLINEARITY
from .orthogonal import project_orthogonal_np

__all__ = ["from_torch", "load_from_torch", "load_simplernn_weights", "simplernn_weights", "to_torch"]

_TO_KERAS_ACT = {v: k for k, v in TORCH_NONLINEARITY.items()}


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _directions(layer) -> list[MORNN]:
    if isinstance(layer, keras.layers.Bidirectional):
        if layer.merge_mode != "concat" or not isinstance(layer.forward_layer, MORNN):
            raise ValueError("a Bidirectional layer must wrap a MORNN with merge_mode='concat' (the "
                             f"PyTorch layout), got merge_mode={layer.merge_mode!r} around "
                             f"{type(layer.forward_layer).__name__}")
        return [layer.forward_layer, layer.backward_layer]
    if isinstance(layer, MORNN):
        return [layer]
    raise TypeError(f"layers must be matrec.keras.MORNN or Bidirectional(MORNN), got {type(layer).__name__}")


def _torch_direction(module, k: int, d: int) -> dict[str, np.ndarray]:
    """Layer ``k``, direction ``d`` of a torch MORNN as float64 arrays in Keras's layout."""
    sfx = f"_l{k}" + ("_reverse" if d else "")
    out = {"kernel": _np(getattr(module, f"weight_ih{sfx}")).T,
           "W": _np(getattr(module, f"weight_hh{sfx}"))}
    if module.bias:
        out["bias"] = _np(getattr(module, f"bias_ih{sfx}")) + _np(getattr(module, f"bias_hh{sfx}"))
    if module.nonlinearity == "modrelu":
        out["modrelu_bias"] = _np(getattr(module, f"modrelu_bias{sfx}"))
    return out


def _assign(layer: MORNN, w: dict[str, np.ndarray]) -> None:
    cell = layer.cell
    if tuple(cell.kernel.shape) != w["kernel"].shape:
        raise ValueError(f"kernel shape mismatch: the Keras layer has {tuple(cell.kernel.shape)}, "
                         f"the PyTorch weights give {w['kernel'].shape}")
    dt = cell.kernel.dtype
    cell.kernel.assign(w["kernel"].astype(dt))
    if cell.use_bias:
        cell.bias.assign(w["bias"].astype(dt))
    if cell.modrelu_bias is not None:
        cell.modrelu_bias.assign(w["modrelu_bias"].astype(dt))
    cell.recurrent_base.assign(project_orthogonal_np(w["W"]).astype(cell.recurrent_base.dtype))
    cell.recurrent_A.assign(np.zeros(cell.recurrent_A.shape, dtype=cell.recurrent_A.dtype))
    cell.recurrent_A_origin.assign(np.zeros(cell.recurrent_A_origin.shape, dtype=cell.recurrent_A_origin.dtype))


def _check_torch_mornn(module) -> None:
    from ..nn.mornn import MORNN as TorchMORNN

    if not isinstance(module, TorchMORNN):
        raise TypeError(f"module must be a PyTorch matrec.MORNN (matrec.nn.MORNN, e.g. the .rnn of a "
                        f"matrec 'mornn' model), got {type(module).__module__}.{type(module).__name__}")


def simplernn_weights(layer) -> list[np.ndarray]:
    """A built MORNN's weights in ``keras.layers.SimpleRNN``'s order and layout, ``[kernel [I, H],
    recurrent_kernel [H, H], bias [H]]`` (no bias without ``use_bias``), for
    ``SimpleRNN.set_weights``: the same outputs for tanh/relu/linear. ``recurrent_kernel`` is
    ``W^T``, computed from ``recurrent_A`` and ``recurrent_base``."""
    cell = _directions(layer)[0].cell
    if cell.activation == "modrelu":
        raise ValueError("activation='modrelu' has no SimpleRNN equivalent (its learned modrelu_bias)")
    out = [ops.convert_to_numpy(cell.kernel), ops.convert_to_numpy(cell.recurrent_kernel)]
    return out + ([ops.convert_to_numpy(cell.bias)] if cell.use_bias else [])


def load_simplernn_weights(layer, weights) -> float:
    """Load a SimpleRNN's ``get_weights()`` (``[kernel, recurrent_kernel, bias]``) into the built
    MORNN ``layer``: kernel and bias as they are; the recurrent matrix becomes the orthogonal
    matrix nearest to ``recurrent_kernel^T`` (polar factor, float64) as the base, with ``A = A0 = 0``.
    Returns ``max |W - recurrent_kernel^T|``: 0 (to rounding) when the SimpleRNN's matrix was
    orthogonal, so the outputs are the same; larger, the orthogonal layer differs by that much."""
    rnn = _directions(layer)[0]
    if len(_directions(layer)) != 1:
        raise ValueError("layer must be one MORNN (load each direction of a Bidirectional separately)")
    if not rnn.built:
        raise ValueError("layer must be built (call it once, or build it) before loading weights")
    n = 3 if rnn.use_bias else 2
    if not isinstance(weights, (list, tuple)) or len(weights) != n:
        raise ValueError(f"weights must be SimpleRNN.get_weights(): {n} arrays [kernel, recurrent_kernel"
                         f"{', bias' if n == 3 else ''}] for use_bias={rnn.use_bias}, got "
                         f"{len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__}")
    w = {"kernel": np.asarray(weights[0], np.float64), "W": np.asarray(weights[1], np.float64).T}
    if rnn.use_bias:
        w["bias"] = np.asarray(weights[2], np.float64)
    if w["W"].shape != (rnn.units, rnn.units):
        raise ValueError(f"recurrent_kernel must be [{rnn.units}, {rnn.units}], got {w['W'].shape}")
    _assign(rnn, w)
    return float(np.abs(ops.convert_to_numpy(ops.cast(rnn.cell.recurrent_weight(), "float64")) - w["W"]).max())


def load_from_torch(layer, module, k: int = 0) -> None:
    """Copy layer ``k`` of the PyTorch ``matrec.MORNN`` ``module`` into the built Keras ``layer``
    (``MORNN``, or ``Bidirectional(MORNN)`` for a bidirectional module)."""
    _check_torch_mornn(module)
    dirs = _directions(layer)
    if len(dirs) != (2 if module.bidirectional else 1):
        raise ValueError(f"module.bidirectional={module.bidirectional} needs "
                         f"{'Bidirectional(MORNN)' if module.bidirectional else 'a MORNN'}, got "
                         f"{type(layer).__name__}")
    for d, rnn in enumerate(dirs):
        if not rnn.built:
            raise ValueError("layer must be built (call it once, or build it) before loading weights")
        if rnn.units != module.hidden_size or rnn.activation != _TO_KERAS_ACT[module.nonlinearity] \
                or rnn.use_bias != module.bias:
            raise ValueError(f"layer (units={rnn.units}, activation={rnn.activation!r}, use_bias="
                             f"{rnn.use_bias}) does not match module (hidden_size={module.hidden_size}, "
                             f"nonlinearity={module.nonlinearity!r}, bias={module.bias})")
        _assign(rnn, _torch_direction(module, k, d))


def from_torch(module, **layer_kwargs) -> list:
    """Keras layers (built, weights loaded) equal to the PyTorch ``matrec.MORNN`` ``module``, one
    per layer, to stack in order; each returns sequences (batch-major ``[B, T, D * H]``).
    ``layer_kwargs`` go to every ``MORNN`` (e.g. ``orthogonal_map``; not units/activation/use_bias)."""
    import torch  # the PyTorch side is matrec's core dependency

    _check_torch_mornn(module)
    layers = []
    in_size = module.input_size
    D = 2 if module.bidirectional else 1
    for k in range(module.num_layers):
        rnn = MORNN(module.hidden_size, activation=_TO_KERAS_ACT[module.nonlinearity],
                    use_bias=module.bias, return_sequences=True, **layer_kwargs)
        layer = keras.layers.Bidirectional(rnn) if module.bidirectional else rnn
        layer.build((None, None, in_size))
        with torch.no_grad():
            load_from_torch(layer, module, k)
        layers.append(layer)
        in_size = module.hidden_size * D
    return layers


def to_torch(layers, **module_kwargs):
    """A PyTorch ``matrec.MORNN`` (``batch_first=True``) holding the weights of the built Keras
    ``layers`` (a list of ``MORNN`` / ``Bidirectional(MORNN)`` stacked in order; one layer may be
    passed alone). All must agree on units, activation, use_bias and directions.
    ``module_kwargs`` go to the constructor (e.g. ``orthogonal_map``, ``dtype``)."""
    import torch

    from ..nn.mornn import MORNN as TorchMORNN

    if not isinstance(layers, (list, tuple)):
        layers = [layers]
    if not layers:
        raise ValueError("layers must hold at least one layer")
    per_layer = [_directions(layer) for layer in layers]
    first = per_layer[0][0]
    D = len(per_layer[0])
    for dirs in per_layer:
        for rnn in dirs:
            if not rnn.built:
                raise ValueError("every layer must be built before conversion")
            if (len(dirs), rnn.units, rnn.activation, rnn.use_bias) != (D, first.units, first.activation, first.use_bias):
                raise ValueError("all layers must have the same units, activation, use_bias and number "
                                 "of directions to form one PyTorch MORNN")
    module = TorchMORNN(int(first.cell.kernel.shape[0]), first.units, len(layers),
                        TORCH_NONLINEARITY[first.activation], first.use_bias, True,
                        bidirectional=D == 2, **module_kwargs)
    values = {}
    for k, dirs in enumerate(per_layer):
        for d, rnn in enumerate(dirs):
            cell = rnn.cell
            sfx = f"_l{k}" + ("_reverse" if d else "")
            W = project_orthogonal_np(ops.convert_to_numpy(ops.cast(cell.recurrent_weight(), "float64")))
            values[f"weight_ih{sfx}"] = ops.convert_to_numpy(cell.kernel).T
            values[f"weight_hh{sfx}"] = W
            if cell.use_bias:
                values[f"bias_ih{sfx}"] = ops.convert_to_numpy(cell.bias)
                values[f"bias_hh{sfx}"] = np.zeros(first.units)
            if cell.modrelu_bias is not None:
                values[f"modrelu_bias{sfx}"] = ops.convert_to_numpy(cell.modrelu_bias)
    # The recurrent matrix is stored as weight_hh{sfx}_base @ f(weight_hh{sfx}_A): it is set through
    # the state dict (base = W, A = 0), the way the module documents for assigning an orthogonal W.
    state = module.state_dict()
    for key, value in values.items():
        if key.startswith("weight_hh"):
            base, A = f"{key}_base", f"{key}_A"
            if base not in state or A not in state:
                raise RuntimeError(f"matrec.MORNN's state dict has no {base} / {A}; this converter "
                                   f"needs updating for its new layout")
            state[base] = torch.as_tensor(value, dtype=state[base].dtype)
            state[A] = torch.zeros_like(state[A])
        else:
            state[key] = torch.as_tensor(np.ascontiguousarray(value), dtype=state[key].dtype)
    module.load_state_dict(state)
    return module.eval()
