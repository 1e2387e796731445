"""Keras 3 MORNN: a drop-in for ``keras.layers.SimpleRNN`` whose recurrent matrix stays orthogonal.

``h_t = phi(x_t @ kernel + bias + h_{t-1} @ W^T)`` with ``W = base @ f(A - A0)`` (PyTorch's
convention ``W_hh``; Keras's ``recurrent_kernel`` is ``W^T``): ``A`` (``recurrent_A``,
``[H(H-1)/2]``) is the trainable parameter, ``f`` an orthogonal map, ``base`` (``recurrent_base``,
``[H, H]``) a non-trainable orthogonal matrix and ``A0`` (``recurrent_A_origin``) the non-trainable
value of ``A`` at the last refold. Every ``refold_every`` training calls the base absorbs
``f(A - A0)`` (``base <- polar(base f(A - A0))`` in float64, ``A0 <- A``), so the map's argument
stays small where the maps are most accurate and rounding never accumulates in the base. The
refold assigns only non-trainable variables, from values computed by a pure ``ops.cond``: JAX's
training step keeps exactly those (an assignment to ``A`` inside it would be dropped). ``W`` is
built once per call, outside the time loop, which is keras.layers.RNN's own (``tf.while_loop`` on
TensorFlow, ``lax.scan`` on JAX).
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops
# The time loop keras.layers.RNN runs (not exported by keras; its version is pinned in matrec[keras]).
from keras.src.backend import rnn as _backend_rnn
# The mixin that gives keras.layers.SimpleRNNCell its per-sequence dropout masks (RNN resets them).
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell

from ..checks import check_int, check_real
from .orthogonal import (KERAS_MORNN_INITS, KERAS_ORTHOGONAL_MAPS, initial_matrix, lower_numel,
                         matmul2d, orthogonal_from, orthogonality_error_np, polar, project_orthogonal_np)

__all__ = ["MORNN", "MORNNCell", "ACTIVATIONS"]

# the one table of the Keras activations: each one's name in matrec.ops.rnn_recurrence.NONLINEARITIES
# (the PyTorch MORNN's nonlinearity; matrec.keras.convert maps through it)
TORCH_NONLINEARITY = {"tanh": "tanh", "relu": "relu", "linear": "identity", "modrelu": "modrelu"}
ACTIVATIONS = tuple(TORCH_NONLINEARITY)
# the Keras functions a user may pass instead of a name (keras.activations.get maps names to them):
# every activation but modReLU, which Keras does not have
_ACTIVATION_FUNCTIONS = tuple(a for a in ACTIVATIONS if a != "modrelu")

# SimpleRNN options that would make the recurrent matrix non-orthogonal, and why.
_REFUSED = {
    "recurrent_initializer": "the recurrent matrix is base @ f(A), initialised by recurrent_init "
                             f"(one of {KERAS_MORNN_INITS}); a free initializer need not be orthogonal",
    "recurrent_regularizer": "the recurrent matrix is exactly orthogonal, so a penalty on it either "
                             "does nothing or pulls against the constraint",
    "recurrent_constraint": "a constraint applied after each update would replace the orthogonal "
                            "parametrisation by a matrix that need not be orthogonal",
}


def _check_refused(kwargs: dict) -> None:
    for key, why in _REFUSED.items():
        if key not in kwargs:
            continue
        value = kwargs.pop(key)
        # The values SimpleRNN.get_config writes for "off" are accepted, so its configs load.
        if value is None:
            continue
        raise ValueError(f"MORNN does not accept {key}={value!r}: {why}")


def _activation_name(activation) -> str:
    """A supported activation's name, from a name, None ("linear") or the Keras function itself."""
    if activation is None:
        return "linear"
    if callable(activation):
        for name in _ACTIVATION_FUNCTIONS:
            if activation is getattr(keras.activations, name):
                return name
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return activation
    raise ValueError(f"activation must be one of {ACTIVATIONS}, None (means 'linear') or one of the functions "
                     f"{', '.join('keras.activations.' + n for n in _ACTIVATION_FUNCTIONS)}, got {activation!r}")


def _check_rate(name: str, value) -> float:
    return check_real(name, value, minimum=0, maximum=1, open_max=True)


def _check_seed(seed):
    return check_int("seed", seed, 0, allow_none=True)


def _modrelu(z, b):
    return ops.sign(z) * ops.relu(ops.abs(z) + b)


class MORNNCell(keras.layers.Layer, DropoutRNNCell):
    """One step of :class:`MORNN`; holds its variables.

    Variables, in ``get_weights()`` order: ``kernel [I, H]``, ``recurrent_A [H(H-1)/2]``,
    ``bias [H]`` (``use_bias``), ``modrelu_bias [H]`` (modrelu) -- trainable -- then
    ``recurrent_base [H, H]``, ``refold_count`` (int: training calls since the layer was built) and
    ``recurrent_A_origin [H(H-1)/2]`` -- not trainable.

    Used alone in ``keras.layers.RNN(MORNNCell(...))`` it rebuilds ``W`` at every step and never
    refolds; :class:`MORNN` builds ``W`` once per call and refolds. ``dropout`` / ``recurrent_dropout``
    act as SimpleRNNCell's: one mask per sequence on ``x_t`` / ``h_{t-1}``, in training only.
    """

    def __init__(self, units, activation="tanh", use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, dropout=0.0, recurrent_dropout=0.0,
                 orthogonal_map="cayley", recurrent_init="henaff", refold_every=100, seed=None, **kwargs):
        _check_refused(kwargs)
        super().__init__(**kwargs)
        check_int("units", units)
        activation = _activation_name(activation)
        self.dropout = _check_rate("dropout", dropout)
        self.recurrent_dropout = _check_rate("recurrent_dropout", recurrent_dropout)
        seed = _check_seed(seed)
        if orthogonal_map not in KERAS_ORTHOGONAL_MAPS:
            extra = (" ('expm' is PyTorch-only: keras.ops has no matrix exponential)"
                     if orthogonal_map == "expm" else "")
            raise ValueError(f"orthogonal_map must be one of {KERAS_ORTHOGONAL_MAPS}, got "
                             f"{orthogonal_map!r}{extra}")
        if recurrent_init not in KERAS_MORNN_INITS:
            raise ValueError(f"recurrent_init must be one of {KERAS_MORNN_INITS}, got {recurrent_init!r}")
        check_int("refold_every", refold_every, 0)   # 0: never
        if not isinstance(use_bias, bool):
            raise ValueError(f"use_bias must be a bool, got {use_bias!r}")
        self.units = int(units)
        self.activation = activation
        self.use_bias = use_bias
        self.orthogonal_map = orthogonal_map
        self.recurrent_init = recurrent_init
        self.refold_every = int(refold_every)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.seed = seed
        self.seed_generator = (keras.random.SeedGenerator(seed)
                               if self.dropout or self.recurrent_dropout else None)
        self.state_size = self.units
        self.output_size = self.units

    def build(self, input_shape):
        H = self.units
        self.kernel = self.add_weight(shape=(input_shape[-1], H), name="kernel",
                                      initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        self.recurrent_A = self.add_weight(shape=(lower_numel(H),), name="recurrent_A",
                                           initializer="zeros")
        # Marks A for orthogonal_optimizer (a smaller learning rate, no weight decay).
        self.recurrent_A._matrec_orthogonal = True
        self.recurrent_base = self.add_weight(shape=(H, H), name="recurrent_base",
                                              initializer=self._base_initializer, trainable=False)
        self.bias = (self.add_weight(shape=(H,), name="bias", initializer=self.bias_initializer,
                                     regularizer=self.bias_regularizer, constraint=self.bias_constraint)
                     if self.use_bias else None)
        self.modrelu_bias = (self.add_weight(shape=(H,), name="modrelu_bias",
                                             initializer=keras.initializers.RandomUniform(
                                                 -0.01, 0.01, seed=self._sub_seed(1)))
                             if self.activation == "modrelu" else None)
        self.refold_count = self.add_weight(shape=(), name="refold_count", dtype="int64",
                                            initializer="zeros", trainable=False)
        # Last, so that a file saved before it existed loads (load_own_variables).
        self.recurrent_A_origin = self.add_weight(shape=(lower_numel(H),), name="recurrent_A_origin",
                                                  initializer="zeros", trainable=False)

    def _sub_seed(self, k: int):
        return None if self.seed is None else int(self.seed) + k

    def _base_initializer(self, shape, dtype=None):
        seed = self._sub_seed(2)
        if seed is None:
            # numpy's global generator: keras.utils.set_random_seed seeds it, and unlike a keras.random
            # draw it gives a number when the layer is built inside a traced function too
            seed = int(np.random.randint(0, 2**31 - 1))
        W = initial_matrix(self.recurrent_init, shape[0], np.random.default_rng(seed))
        return ops.convert_to_tensor(W, dtype=dtype or "float32")

    # --- the orthogonal matrix -------------------------------------------------------------

    def _matrix_dtype(self):
        return "float64" if self.variable_dtype == "float64" else "float32"

    def recurrent_weight(self):
        """``W = base @ f(A - A0)`` ``[H, H]`` (PyTorch's ``weight_hh``; acts as ``h @ W^T``), built
        in float32 (float64 for float64 variables) whatever the compute dtype, as a differentiable
        function of ``A``."""
        dt = self._matrix_dtype()
        A = ops.cast(self.recurrent_A, dt) - ops.cast(self.recurrent_A_origin, dt)
        base = ops.cast(self.recurrent_base, dt)
        return matmul2d(base, orthogonal_from(A, self.units, self.orthogonal_map))

    @property
    def recurrent_kernel(self):
        """Keras's convention: ``h_t = phi(x_t @ kernel + bias + h_{t-1} @ recurrent_kernel)``."""
        return ops.transpose(self.recurrent_weight())

    def _folded(self, base, A, origin):
        """The refold as a pure function of the variables' values: ``(polar(base f(A - A0)), A)``
        computed in float64 (float32 on JAX without x64), in the variables' dtypes."""
        f = orthogonal_from(ops.cast(A, "float64") - ops.cast(origin, "float64"), self.units,
                            self.orthogonal_map)
        W = matmul2d(ops.cast(base, "float64"), f)
        return ops.cast(polar(W), base.dtype), ops.cast(A, origin.dtype)

    def _variable_values(self):
        return tuple(ops.convert_to_tensor(v) for v in (self.recurrent_base, self.recurrent_A,
                                                         self.recurrent_A_origin))

    def refold(self):
        """Fold ``f(A - A0)`` into the base and set ``A0 <- A``: ``W`` is unchanged and the map's
        argument is 0 again."""
        base, origin = self._folded(*self._variable_values())
        self.recurrent_base.assign(base)
        self.recurrent_A_origin.assign(origin)

    def maybe_refold(self):
        """Count one training call; refold on every ``refold_every``-th (inside compiled steps too).

        Trace-safe on every backend: the branches of ``ops.cond`` are pure functions of values read
        before it, and only non-trainable variables are assigned (JAX's stateless training step
        returns those; it drops assignments to trainable ones)."""
        if not self.refold_every:
            return
        count = ops.convert_to_tensor(self.refold_count) + ops.cast(1, self.refold_count.dtype)
        self.refold_count.assign(count)
        base, A, origin = values = self._variable_values()
        base, origin = ops.cond(ops.equal(count % self.refold_every, 0), lambda: self._folded(*values),
                                lambda: (base, origin))
        self.recurrent_base.assign(ops.stop_gradient(base))
        self.recurrent_A_origin.assign(ops.stop_gradient(origin))

    def reproject(self, tol=None):
        """Replace the base by its polar factor if ``max|B^T B - I|`` exceeds ``tol`` (default 32
        eps of its dtype: our own saves stay bit for bit); run eagerly, e.g. after set_weights."""
        base = ops.convert_to_numpy(self.recurrent_base)
        tol = 32 * np.finfo(base.dtype).eps if tol is None else tol
        if orthogonality_error_np(base) > tol:
            self.recurrent_base.assign(project_orthogonal_np(base).astype(base.dtype))

    def load_own_variables(self, store):
        variables = self._trainable_variables + self._non_trainable_variables
        if len(store.keys()) == len(variables) - 1 and self.recurrent_A_origin is variables[-1]:
            # saved before recurrent_A_origin existed: A was zeroed at each refold, so A0 = 0
            for i, v in enumerate(variables[:-1]):
                v.assign(store[f"{i}"])
            self.recurrent_A_origin.assign(np.zeros(self.recurrent_A_origin.shape, "float32"))
        else:
            super().load_own_variables(store)
        # A base from another precision or an edited file is made exactly orthogonal again.
        self.reproject()

    # --- one step --------------------------------------------------------------------------

    def phi(self, z):
        if self.activation == "tanh":
            return ops.tanh(z)
        if self.activation == "relu":
            return ops.relu(z)
        if self.activation == "modrelu":
            return _modrelu(z, ops.cast(self.modrelu_bias, z.dtype))
        return z

    def project_inputs(self, x):
        """``x @ kernel + bias`` for ``x [..., I]`` -> ``[..., H]``, in the compute dtype (inputs
        of any dtype, integers included, are cast to it, as SimpleRNN's are)."""
        dt = self.compute_dtype
        z = ops.matmul(ops.cast(x, dt), ops.cast(self.kernel, dt))
        return z + ops.cast(self.bias, dt) if self.use_bias else z

    def call(self, inputs, states, training=False):
        if not self.built:  # called directly, before any __call__ (SimpleRNNCell's __call__ builds)
            self.build(tuple(inputs.shape))
        h = states[0] if isinstance(states, (list, tuple)) else states
        h = ops.cast(h, self.compute_dtype)
        x = ops.cast(inputs, self.compute_dtype)
        x_mask, h_mask = self.get_dropout_mask(x), self.get_recurrent_dropout_mask(h)
        if training and x_mask is not None:
            x = x * x_mask
        h_in = h * h_mask if training and h_mask is not None else h
        W_t = ops.cast(self.recurrent_kernel, h.dtype)
        h = self.phi(self.project_inputs(x) + ops.matmul(h_in, W_t))
        return h, [h]

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "orthogonal_map": self.orthogonal_map,
            "recurrent_init": self.recurrent_init,
            "refold_every": self.refold_every,
            "seed": self.seed,
        }


_CELL_ARGS = ("units", "activation", "use_bias", "kernel_initializer", "bias_initializer",
              "kernel_regularizer", "bias_regularizer", "kernel_constraint", "bias_constraint",
              "orthogonal_map", "recurrent_init", "refold_every", "seed")


@keras.saving.register_keras_serializable(package="matrec")
class MORNN(keras.layers.RNN):
    """Drop-in for ``keras.layers.SimpleRNN`` with an orthogonal recurrent matrix.

    Args (as SimpleRNN): units, activation ("tanh", "relu", "linear" or None, and "modrelu":
        ``sign(z) relu(|z| + b)`` with a learned ``b [H]``), use_bias, kernel_initializer,
        bias_initializer, kernel/bias regularizer and constraint, activity_regularizer, dropout
        (on the inputs) and recurrent_dropout (on ``h_{t-1}``; one mask per sequence, training
        only), return_sequences, return_state, go_backwards, stateful, unroll, seed. ``activation``
        may also be the function ``keras.activations.tanh`` / ``relu`` / ``linear``.
    Extras: orthogonal_map ("cayley", "householder"), recurrent_init ("henaff", "cayley",
        "random", "identity"), refold_every (training calls between refolds; 0: never).
    Refused (they would break orthogonality): recurrent_initializer, recurrent_regularizer,
        recurrent_constraint.

    Shapes: input ``[B, T, I]``, mask ``[B, T]``, initial_state ``[B, H]`` (or a list of one).
    Output ``[B, T, H]`` (return_sequences) or ``[B, H]``; with return_state, also ``h_T [B, H]``.
    """

    def __init__(self, units, activation="tanh", use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
                 dropout=0.0, recurrent_dropout=0.0, return_sequences=False, return_state=False,
                 go_backwards=False, stateful=False, unroll=False, seed=None, orthogonal_map="cayley",
                 recurrent_init="henaff", refold_every=100, zero_output_for_mask=False, **kwargs):
        _check_refused(kwargs)
        dropout = _check_rate("dropout", dropout)
        recurrent_dropout = _check_rate("recurrent_dropout", recurrent_dropout)
        seed = _check_seed(seed)
        # the cell gets no dropout: inner_loop draws the masks (the cell's own serve keras.layers.RNN)
        cell = MORNNCell(units, activation=activation, use_bias=use_bias,
                         kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
                         kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
                         kernel_constraint=kernel_constraint, bias_constraint=bias_constraint,
                         orthogonal_map=orthogonal_map, recurrent_init=recurrent_init,
                         refold_every=refold_every, seed=seed, dtype=kwargs.get("dtype"),
                         trainable=kwargs.get("trainable", True), name="mornn_cell")
        super().__init__(cell, return_sequences=return_sequences, return_state=return_state,
                         go_backwards=go_backwards, stateful=stateful, unroll=unroll,
                         zero_output_for_mask=zero_output_for_mask,
                         activity_regularizer=activity_regularizer, **kwargs)
        self.dropout, self.recurrent_dropout = dropout, recurrent_dropout
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if dropout or recurrent_dropout else None
        self.input_spec = keras.layers.InputSpec(ndim=3)

    def recurrent_weight(self):
        """The current orthogonal ``[H, H]`` (PyTorch's ``weight_hh`` convention)."""
        return self.cell.recurrent_weight()

    def refold(self):
        self.cell.refold()

    def call(self, sequences, initial_state=None, mask=None, training=False):
        if not self.built:  # called directly, before any __call__: build as SimpleRNN's cell would
            self.build(tuple(sequences.shape))
        T = sequences.shape[1]
        if mask is not None:
            mask = mask[0] if isinstance(mask, (list, tuple)) else mask
            if len(mask.shape) != 2 or (T is not None and mask.shape[1] is not None and mask.shape[1] != T):
                raise ValueError(f"mask must be [batch, timesteps] = [B, {T}] for an input of shape "
                                 f"{tuple(sequences.shape)}, got shape {tuple(mask.shape)}")
        if initial_state is not None:
            states = initial_state if isinstance(initial_state, (list, tuple)) else [initial_state]
            B = sequences.shape[0]
            if len(states) != 1 or len(states[0].shape) != 2 or states[0].shape[-1] != self.units or (
                    B is not None and states[0].shape[0] is not None and states[0].shape[0] != B):
                raise ValueError(f"initial_state must be one tensor [batch, units] = [{B}, {self.units}], "
                                 f"got {[tuple(s.shape) for s in states]}")
        if training and self.trainable and self.cell.refold_every:
            self.cell.maybe_refold()
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        cell = self.cell
        # integer or other-precision inputs compute in the layer's dtype, as SimpleRNN's do
        sequences = ops.cast(sequences, cell.compute_dtype)
        if self.dropout and training:
            # one input mask per sequence, as SimpleRNN's cell draws it once for all steps
            keep = keras.random.dropout(ops.ones_like(sequences[:, 0, :]), self.dropout,
                                        seed=self.seed_generator)
            sequences = sequences * ops.expand_dims(keep, 1)
        h_keep = None
        if self.recurrent_dropout and training:
            h_keep = keras.random.dropout(ops.ones_like(initial_state[0]), self.recurrent_dropout,
                                          seed=self.seed_generator)   # [B, H]
        xp = cell.project_inputs(sequences)                     # [B, T, H], one matmul for all steps
        W_t = ops.cast(cell.recurrent_kernel, xp.dtype)         # [H, H], built once per call
        phi = cell.phi

        def step(x_t, states):
            h = states[0] if h_keep is None else states[0] * h_keep
            h = phi(x_t + ops.matmul(h, W_t))                   # [B, H]
            return h, [h]

        # keras.layers.RNN's own loop (tf.while_loop on TensorFlow, lax.scan on JAX), with its
        # masking, go_backwards and zero_output_for_mask semantics, so they are SimpleRNN's exactly
        return _backend_rnn(step, xp, list(initial_state), go_backwards=self.go_backwards, mask=mask,
                            unroll=self.unroll, input_length=sequences.shape[1],
                            zero_output_for_mask=self.zero_output_for_mask,
                            return_all_outputs=self.return_sequences)

    def get_config(self):
        config = super().get_config()
        config.pop("cell", None)
        cell_config = self.cell.get_config()
        config.update({k: cell_config[k] for k in _CELL_ARGS})
        config["dropout"] = self.dropout
        config["recurrent_dropout"] = self.recurrent_dropout
        config["activity_regularizer"] = keras.regularizers.serialize(self.activity_regularizer)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)


keras.saving.register_keras_serializable(package="matrec")(MORNNCell)


def _read_through(name):
    return property(lambda self: getattr(self.cell, name), doc=f"The cell's ``{name}``.")


# units, activation, orthogonal_map, kernel, ... read through to the cell, as SimpleRNN's properties do
for _name in _CELL_ARGS[:-1] + ("recurrent_A", "recurrent_base", "kernel", "bias", "modrelu_bias",
                                "refold_count", "recurrent_A_origin", "recurrent_kernel"):
    setattr(MORNN, _name, _read_through(_name))
