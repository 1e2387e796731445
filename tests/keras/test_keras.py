"""matrec.keras: the Keras 3 MORNN on the backend KERAS_BACKEND names (default TensorFlow).

The torch and JAX backends run the portable tests of this module in a subprocess
(test_torch_backend, test_jax_backend; JAX only where the optional extra matrec[jax] is installed):
Keras fixes its backend at import, and this process already has TensorFlow's.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# matrec.keras before anything imports keras: Triton must load before TensorFlow (see its __init__)
pytest.importorskip("matrec.keras", reason="matrec[keras] not installed", exc_type=ImportError)

import matrec  # noqa: E402
from matrec.keras import (MORNN, from_torch, load_from_torch, orthogonal_optimizer,  # noqa: E402
                          orthogonality_report, to_torch)

import keras  # noqa: E402  (after matrec.keras: Triton must load before TensorFlow)
from keras import ops  # noqa: E402

BACKEND = keras.backend.backend()
ROOT = Path(__file__).resolve().parents[2]  # the repository
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow-only (SavedModel, tf.function)")
# JAX computes float64 only in its x64 mode, which Keras does not turn on
needs_float64 = pytest.mark.skipif(BACKEND == "jax" and not os.environ.get("JAX_ENABLE_X64"),
                                   reason="float64 needs JAX_ENABLE_X64 on the JAX backend")


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def orth_error(layer) -> float:
    W = np_(layer.recurrent_weight()).astype(np.float64)
    return float(np.abs(W.T @ W - np.eye(W.shape[0])).max())


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((3, 7, 5)).astype("float32")


# --- SimpleRNN surface ----------------------------------------------------------------------

@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_shapes_as_simplernn(x, return_sequences, return_state, go_backwards):
    kw = dict(return_sequences=return_sequences, return_state=return_state, go_backwards=go_backwards)
    ours, theirs = MORNN(6, **kw)(x), keras.layers.SimpleRNN(6, **kw)(x)
    flat = lambda o: [tuple(t.shape) for t in (o if isinstance(o, (list, tuple)) else [o])]  # noqa: E731
    assert flat(ours) == flat(theirs)


@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("activation", ["tanh", "relu", "linear", "modrelu"])
def test_matches_a_plain_loop(activation, T):
    """The scan against the definition, step by step in numpy, with the layer's own weights."""
    keras.utils.set_random_seed(T)
    x = np.random.default_rng(T).standard_normal((2, T, 3)).astype("float32")
    layer = MORNN(5, activation=activation, return_sequences=True, return_state=True, use_bias=True,
                  bias_initializer="random_normal", recurrent_init="random")
    out, h_T = layer(x)
    K, b, W = np_(layer.kernel), np_(layer.bias), np_(layer.recurrent_weight())
    h = np.zeros((2, 5), np.float32)
    ref = []
    for t in range(T):
        z = x[:, t] @ K + b + h @ W.T
        if activation == "tanh":
            h = np.tanh(z)
        elif activation == "relu":
            h = np.maximum(z, 0)
        elif activation == "modrelu":
            h = np.sign(z) * np.maximum(np.abs(z) + np_(layer.modrelu_bias), 0)
        else:
            h = z
        ref.append(h)
    ref = np.stack(ref, 1)
    # linear and modReLU states grow along the sequence: float32 agreement relative to their size
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(np_(out), ref, atol=tol, rtol=0)
    np.testing.assert_allclose(np_(h_T), ref[:, -1], atol=tol, rtol=0)


def test_go_backwards_is_the_reversed_sequence(x):
    fwd = MORNN(4, return_sequences=True, seed=1)
    bwd = MORNN.from_config({**fwd.get_config(), "go_backwards": True})
    fwd(x), bwd(x)
    bwd.set_weights(fwd.get_weights())
    np.testing.assert_allclose(np_(bwd(x)), np_(fwd(x[:, ::-1])), atol=1e-6)


def test_masking_with_embedding_mask_zero():
    """Padding after each sequence changes nothing, as with SimpleRNN: the last output and state
    equal those of the unpadded sequence."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 10, (3, 6))
    lengths = [6, 4, 1]
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    emb = keras.layers.Embedding(10, 4, mask_zero=True)
    rnn = MORNN(5, return_state=True)
    out, h = rnn(emb(ids))
    for i, n in enumerate(lengths):
        o1, h1 = rnn(emb(ids[i:i + 1, :n]))
        np.testing.assert_allclose(np_(out)[i], np_(o1)[0], atol=1e-6)
        np.testing.assert_allclose(np_(h)[i], np_(h1)[0], atol=1e-6)
    # the model-level mask path (Sequential propagates the Embedding's mask)
    model = keras.Sequential([keras.Input((6,), dtype="int32"), emb, MORNN(5, return_sequences=True)])
    assert model(ids).shape == (3, 6, 5)


def test_stateful_continues_the_sequence(x):
    whole = MORNN(4, return_sequences=True, seed=2)
    parts = MORNN.from_config({**whole.get_config(), "stateful": True})
    whole(x), parts(x)
    parts.set_weights(whole.get_weights())
    parts.reset_state()
    y = np.concatenate([np_(parts(x[:, :3])), np_(parts(x[:, 3:]))], axis=1)
    np.testing.assert_allclose(y, np_(whole(x)), atol=1e-6)


def test_initial_state_and_dropout(x):
    layer = MORNN(4, dropout=0.5, seed=3, return_sequences=True)
    h0 = np.ones((3, 4), "float32")
    a, b = np_(layer(x, initial_state=h0)), np_(layer(x))
    assert not np.allclose(a, b)
    # dropout acts in training only
    np.testing.assert_array_equal(np_(layer(x)), b)
    t1, t2 = np_(layer(x, training=True)), np_(layer(x, training=True))
    assert not np.allclose(t1, t2) and not np.allclose(t1, b)


def test_bidirectional_and_config_roundtrip(x):
    layer = MORNN(4, activation="modrelu", orthogonal_map="householder", recurrent_init="cayley",
                  refold_every=7, return_sequences=True, use_bias=False, name="m")
    cfg = layer.get_config()
    again = MORNN.from_config(cfg)
    assert again.get_config() == cfg
    assert (again.units, again.activation, again.orthogonal_map, again.recurrent_init) == \
        (4, "modrelu", "householder", "cayley")
    bi = keras.layers.Bidirectional(layer)
    assert bi(x).shape == (3, 7, 8)
    assert bi.backward_layer.go_backwards and bi.backward_layer.orthogonal_map == "householder"
    # a SimpleRNN config's "off" values load (a config written for SimpleRNN, units/activation kept)
    simple = {k: v for k, v in keras.layers.SimpleRNN(4).get_config().items() if k != "recurrent_initializer"}
    assert MORNN.from_config(simple).units == 4


def test_cell_alone_in_keras_rnn_matches_the_layer(x):
    from matrec.keras import MORNNCell

    layer = MORNN(4, activation="modrelu", return_sequences=True, seed=4)
    generic = keras.layers.RNN(MORNNCell(4, activation="modrelu"), return_sequences=True)
    layer(x), generic(x)
    generic.set_weights(layer.get_weights())
    np.testing.assert_allclose(np_(generic(x)), np_(layer(x)), atol=1e-6)


def test_inputs_are_cast_to_the_compute_dtype(x):
    """Keras's own Bidirectional test feeds int64; TimeDistributed under mixed_float16 feeds half
    inputs: both run, as with SimpleRNN, and compute in the layer's dtype."""
    ids = np.random.default_rng(0).integers(0, 5, (2, 4, 5)).astype("int64")
    bi = keras.layers.Bidirectional(MORNN(3, seed=0))
    out = bi(ids)
    assert out.shape == (2, 6) and keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(np_(out), np_(bi(ids.astype("float32"))), atol=1e-6)
    td = keras.layers.TimeDistributed(MORNN(3, seed=0), dtype="mixed_float16")
    y = td(np.stack([x, x], axis=1))   # [3, 2, 7, 5] -> [3, 2, 3]
    simple = keras.layers.TimeDistributed(keras.layers.SimpleRNN(3), dtype="mixed_float16")(np.stack([x, x], 1))
    assert y.shape == (3, 2, 3) and y.dtype == simple.dtype
    np.testing.assert_allclose(np_(y)[:, 0].astype("float32"), np_(td.layer(x)), atol=1e-2)


def test_activation_given_as_a_keras_function(x):
    for fn, name in ((keras.activations.tanh, "tanh"), (keras.activations.relu, "relu"),
                     (keras.activations.linear, "linear")):
        layer = MORNN(4, activation=fn, seed=1)
        assert layer.activation == name and layer.get_config()["activation"] == name
    a, b = MORNN(4, activation=keras.activations.relu, seed=1), MORNN(4, activation="relu", seed=1)
    a(x), b(x)
    b.set_weights(a.get_weights())
    np.testing.assert_array_equal(np_(a(x)), np_(b(x)))


def test_calling_an_unbuilt_layer_builds_it(x):
    from matrec.keras import MORNNCell

    layer = MORNN(4)
    out = layer.call(ops.convert_to_tensor(x))
    assert layer.built and out.shape == (3, 4)
    cell = MORNNCell(4)
    h, _ = cell.call(ops.convert_to_tensor(x[:, 0]), [ops.zeros((3, 4))])
    assert cell.built and h.shape == (3, 4)


def test_cell_dropout_and_recurrent_dropout_as_simplernncell(x):
    """Keras's stacked-cells test: RNN([MORNNCell(3, dropout=0.1, recurrent_dropout=0.1), ...])."""
    from matrec.keras import MORNNCell

    cells = [MORNNCell(n, dropout=0.1, recurrent_dropout=0.1, seed=n) for n in (3, 4, 5)]
    rnn = keras.layers.RNN(cells, return_sequences=True)
    y = np_(rnn(x))
    assert y.shape == (3, 7, 5)
    np.testing.assert_array_equal(np_(rnn(x)), y)             # inference: no dropout
    assert not np.allclose(np_(rnn(x, training=True)), y)
    assert cells[0].get_config()["recurrent_dropout"] == 0.1
    # the layer: recurrent dropout acts in training only, and round-trips through its config
    layer = MORNN(4, recurrent_dropout=0.5, seed=3, return_sequences=True)
    b = np_(layer(x))
    np.testing.assert_array_equal(np_(layer(x)), b)
    assert not np.allclose(np_(layer(x, training=True)), b)
    assert MORNN.from_config(layer.get_config()).recurrent_dropout == 0.5


def test_recurrent_init_schemes_are_orthogonal(x):
    for init in ("henaff", "cayley", "random", "identity"):
        layer = MORNN(9, recurrent_init=init)
        layer(x)
        assert orth_error(layer) <= 1e-6
        if init == "identity":
            np.testing.assert_array_equal(np_(layer.recurrent_weight()), np.eye(9))


# --- refused options and bad input ------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("recurrent_initializer", "orthogonal"),
                                       ("recurrent_regularizer", "l2"),
                                       ("recurrent_constraint", "max_norm")])
def test_options_that_break_orthogonality_are_refused(key, value):
    with pytest.raises(ValueError, match=f"MORNN does not accept {key}=.*orthogonal"):
        MORNN(4, **{key: value})


@pytest.mark.parametrize("kwargs,match", [
    ({"activation": "sigmoid"}, "activation must be one of"),
    ({"orthogonal_map": "expm"}, "orthogonal_map must be one of .*keras.ops has no matrix exponential"),
    ({"orthogonal_map": "qr"}, "orthogonal_map must be one of"),
    ({"recurrent_init": "xavier"}, "recurrent_init must be one of"),
    ({"refold_every": -1}, "refold_every must be an int >= 0"),
    ({"dropout": 1.5}, "dropout must be a finite number in"),
    ({"recurrent_dropout": -0.1}, "recurrent_dropout must be a finite number in"),
    ({"seed": "abc"}, "seed must be an int >= 0 or None, got 'abc'"),
    ({"activation": keras.activations.sigmoid}, "activation must be one of .*keras.activations.tanh"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MORNN(4, **kwargs)


@pytest.mark.parametrize("units", [0, -3, 2.5, True])
def test_bad_units(units):
    with pytest.raises(ValueError, match="units must be an int >= 1"):
        MORNN(units)


def test_bad_shapes(x):
    layer = MORNN(4)
    with pytest.raises(ValueError, match="ndim=3"):
        layer(x[:, 0])
    with pytest.raises(ValueError, match=r"initial_state must be one tensor \[batch, units\] = \[3, 4\]"):
        layer(x, initial_state=np.zeros((3, 5), "float32"))
    with pytest.raises(ValueError, match=r"mask must be \[batch, timesteps\] = \[B, 7\]"):
        layer(x, mask=np.ones((3, 6), bool))


# --- orthogonality: once per call, after training, after save/load ---------------------------

def test_recurrent_matrix_is_built_once_per_call(x, monkeypatch):
    layer = MORNN(4)
    layer(x)
    calls = []
    original = type(layer.cell).recurrent_weight
    monkeypatch.setattr(type(layer.cell), "recurrent_weight",
                        lambda self: calls.append(1) or original(self))
    layer(np.concatenate([x] * 5, axis=1))  # 35 steps
    assert len(calls) == 1


@pytest.mark.parametrize("orthogonal_map", ["cayley", "householder"])
def test_orthogonal_after_500_steps_and_after_save_load(orthogonal_map, tmp_path):
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16 * 500, 6, 3)).astype("float32")
    y = np.tanh(x.sum(1) @ rng.standard_normal((3, 8))).astype("float32")
    model = keras.Sequential([keras.Input((6, 3)),
                              MORNN(8, orthogonal_map=orthogonal_map, recurrent_init="random")])
    # a high learning rate, on the orthogonal parameters too (the recipe would use a tenth)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = model.evaluate(x[:256], y[:256], verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)   # 500 steps
    layer = model.layers[0]
    assert int(np_(layer.refold_count)) == 500  # so 5 refolds happened
    assert model.evaluate(x[:256], y[:256], verbose=0) < 0.5 * before
    assert orth_error(layer) <= 1e-5
    report = orthogonality_report(model)
    assert list(report) == [f"{layer.cell.path}/orth_error"] and report[f"{layer.cell.path}/orth_error"] <= 1e-5
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert orth_error(loaded.layers[0]) <= 1e-5
    np.testing.assert_allclose(loaded.predict(x[:32], verbose=0), model.predict(x[:32], verbose=0), atol=1e-6)


def test_loading_without_importing_matrec_keras(x, tmp_path):
    """In a process that never imported matrec.keras, Keras cannot find MORNN and says so, naming
    the module to import (docs/keras.md); matrec.keras.load_model is the call with it done."""
    import matrec.keras

    model = keras.Sequential([keras.Input((None, 5)), MORNN(4, seed=0)])
    model.compile(optimizer=orthogonal_optimizer("rmsprop"), loss="mse")
    model.save(tmp_path / "m.keras")
    code = (f"import keras\ntry:\n    keras.models.load_model({str(tmp_path / 'm.keras')!r})\n"
            f"except Exception as e:\n    print('ERROR', e)\n")
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERROR" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "Could not locate class 'MORNN'" in r.stdout and "'module': 'matrec.keras.layers'" in r.stdout
    loaded = matrec.keras.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer).__name__ == "OrthogonalRMSprop"
    np.testing.assert_allclose(np_(loaded(x)), np_(model(x)), atol=1e-6)


def test_simplernn_weights_both_ways(x):
    """SimpleRNN's list is [kernel, recurrent_kernel, bias]; a MORNN's get_weights() is not (its
    recurrent matrix is computed). load_simplernn_weights / simplernn_weights convert."""
    from matrec.keras import load_simplernn_weights, simplernn_weights

    mornn = MORNN(4, recurrent_init="random", seed=0)
    mornn(x)
    names = [w.path.split("/")[-1] for w in mornn.weights]
    assert names == ["kernel", "recurrent_A", "bias", "recurrent_base", "refold_count", "recurrent_A_origin"]
    simple = keras.layers.SimpleRNN(4)
    simple(x)
    with pytest.raises(ValueError):   # the lists differ: SimpleRNN's set_weights refuses ours
        simple.set_weights(mornn.get_weights())
    simple.set_weights(simplernn_weights(mornn))
    np.testing.assert_allclose(np_(simple(x)), np_(mornn(x)), atol=1e-6)
    # back: an orthogonal recurrent_kernel gives the same outputs; a general one its nearest orthogonal
    again = MORNN(4, seed=1)
    again(x)
    assert load_simplernn_weights(again, simple.get_weights()) < 1e-6
    np.testing.assert_allclose(np_(again(x)), np_(simple(x)), atol=1e-6)
    general = keras.layers.SimpleRNN(4)
    general(x)
    k, rk, b = general.get_weights()   # rk: SimpleRNN's orthogonal init; 1.1 rk is not orthogonal,
    # its nearest orthogonal matrix is rk, so the returned distance is max |0.1 rk|
    assert load_simplernn_weights(again, [k, rk * 1.1, b]) == pytest.approx(0.1 * np.abs(rk).max(), rel=1e-3)
    assert orth_error(again) <= 1e-6
    with pytest.raises(ValueError, match=r"weights must be SimpleRNN.get_weights\(\): 3 arrays"):
        load_simplernn_weights(again, [k, rk])


def test_from_torch_refuses_other_modules():
    with pytest.raises(TypeError, match=r"module must be a PyTorch matrec.MORNN .*got torch.nn.modules.rnn.LSTM"):
        from_torch(torch.nn.LSTM(3, 4))
    layer = MORNN(4)
    layer.build((None, None, 3))
    with pytest.raises(TypeError, match="module must be a PyTorch matrec.MORNN"):
        load_from_torch(layer, torch.nn.RNN(3, 4))


def test_a_file_saved_before_the_origin_variable_loads(x):
    """Saves made when a refold zeroed A (no recurrent_A_origin) load with A0 = 0."""
    layer = MORNN(4, activation="modrelu", seed=0)
    layer(x)
    layer.recurrent_A.assign(np.random.default_rng(0).normal(0, 0.1, 6).astype("float32"))
    store = {}
    layer.cell.save_own_variables(store)
    old = {k: v for k, v in store.items() if int(k) < len(store) - 1}   # the layout without A0
    again = MORNN(4, activation="modrelu", seed=5)
    again(x)
    again.cell.load_own_variables(old)
    np.testing.assert_array_equal(np_(again.recurrent_A_origin), 0)
    np.testing.assert_allclose(np_(again(x)), np_(layer(x)), atol=1e-6)


def test_refold_keeps_the_matrix_and_zeroes_A(x):
    layer = MORNN(6, orthogonal_map="householder")
    layer(x)
    layer.recurrent_A.assign(np.random.default_rng(0).normal(0, 0.3, 15).astype("float32"))
    W = np_(layer.recurrent_weight())
    layer.refold()
    # the map's argument A - A0 is zero again (A itself is left to the optimizer)
    np.testing.assert_array_equal(np_(layer.recurrent_A_origin), np_(layer.recurrent_A))
    np.testing.assert_allclose(np_(layer.recurrent_weight()), W, atol=2e-6)
    assert orth_error(layer) <= 1e-6


def test_load_reprojects_a_perturbed_base(x, tmp_path):
    model = keras.Sequential([keras.Input((7, 5)), MORNN(6)])
    base = model.layers[0].recurrent_base
    base.assign(np_(base) + 1e-3 * np.random.default_rng(0).standard_normal((6, 6)).astype("float32"))
    assert orth_error(model.layers[0]) > 1e-4
    model.save(tmp_path / "p.keras")
    assert orth_error(keras.models.load_model(tmp_path / "p.keras").layers[0]) <= 1e-6


def test_orthogonal_optimizer_is_the_recipe(x, tmp_path):
    """SGD: the orthogonal parameters move by exactly a tenth of what plain SGD moves them; the
    other variables as plain SGD; the optimizer saves and loads with the model."""
    def make():
        keras.utils.set_random_seed(7)
        m = keras.Sequential([keras.Input((7, 5)), MORNN(4, refold_every=0), keras.layers.Dense(1)])
        return m

    y = np.ones((3, 1), "float32")
    moved = {}
    for name, opt in (("plain", keras.optimizers.SGD(0.5)), ("recipe", orthogonal_optimizer("sgd", 0.5))):
        m = make()
        start = [np_(v) for v in m.trainable_variables]
        m.compile(optimizer=opt, loss="mse")
        m.train_on_batch(x, y)
        moved[name] = {v.name: np_(v) - s for v, s in zip(m.trainable_variables, start)}
    np.testing.assert_allclose(moved["recipe"]["recurrent_A"], 0.1 * moved["plain"]["recurrent_A"],
                               rtol=1e-4, atol=1e-9)
    assert np.abs(moved["plain"]["recurrent_A"]).max() > 1e-4
    np.testing.assert_allclose(moved["recipe"]["kernel"], moved["plain"]["kernel"], rtol=1e-5, atol=1e-9)
    m.save(tmp_path / "o.keras")
    loaded = keras.models.load_model(tmp_path / "o.keras")
    assert type(loaded.optimizer).__name__ == "OrthogonalSGD" and loaded.optimizer.orthogonal_scale == 0.1
    with pytest.raises(ValueError, match="optimizer must be one of"):
        orthogonal_optimizer("lion")
    with pytest.raises(ValueError, match="orthogonal_scale must be a positive number"):
        orthogonal_optimizer("adam", orthogonal_scale=0)


# --- parity with the PyTorch MORNN ------------------------------------------------------------

@needs_float64
@pytest.mark.parametrize("orthogonal_map", ["cayley", "householder"])
def test_orthogonal_maps_match_pytorch(orthogonal_map):
    from matrec.keras.orthogonal import orthogonal_from
    from matrec.ops.orthogonal import lower_to_square
    from matrec.ops.orthogonal import orthogonal_from as torch_orthogonal_from

    for n in (1, 2, 7):
        A = np.random.default_rng(n).normal(0, 0.7, n * (n - 1) // 2)
        ref = torch_orthogonal_from(lower_to_square(torch.from_numpy(A), n), orthogonal_map).numpy()
        got = np_(orthogonal_from(ops.convert_to_tensor(A, dtype="float64"), n, orthogonal_map))
        np.testing.assert_allclose(got, ref, atol=1e-12)
        np.testing.assert_allclose(np_(orthogonal_from(ops.zeros((n * (n - 1) // 2,), "float64"), n,
                                                        orthogonal_map)), np.eye(n), atol=0)


def _torch_mornn(activation, layers, bidirectional, seed=0):
    torch.manual_seed(seed)
    m = matrec.MORNN(5, 8, layers, nonlinearity=activation, batch_first=True,
                     bidirectional=bidirectional, init="random").eval()
    with torch.no_grad():  # a W away from the base, so the map itself is exercised by the conversion
        for name, p in m.named_parameters():
            if name.endswith("_A"):
                p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity", "modrelu"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_parity_with_pytorch_both_ways(activation, layers, bidirectional, x):
    tm = _torch_mornn(activation, layers, bidirectional)
    with torch.no_grad():
        ref, h_ref = (t.numpy() for t in tm(torch.from_numpy(x)))
    stack = from_torch(tm)
    y = x
    for layer in stack:
        y = layer(y)
    np.testing.assert_allclose(np_(y), ref, atol=1e-5)
    # the final state of the last layer's forward direction
    last = stack[-1].forward_layer if bidirectional else stack[-1]
    cfg = {**last.get_config(), "return_state": True}
    probe = MORNN.from_config(cfg)
    probe(np_(stack[-2](x)) if layers == 2 else x)
    probe.set_weights(last.get_weights())
    _, h = probe(np_(stack[-2](x)) if layers == 2 else x)
    np.testing.assert_allclose(np_(h), h_ref[(layers - 1) * (2 if bidirectional else 1)], atol=1e-5)
    # and back: Keras -> PyTorch gives the same outputs
    back = to_torch(stack)
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x))[0].numpy(), ref, atol=1e-5)


def test_parity_after_keras_training_and_masked_bidirectional():
    """Keras-trained weights (A away from 0, any map) move to PyTorch; with padding, Keras's masked
    Bidirectional equals PyTorch on a PackedSequence at every valid step."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 6, 5)).astype("float32")
    lengths = [6, 3, 1]
    mask = np.arange(6)[None, :] < np.array(lengths)[:, None]
    bi = keras.layers.Bidirectional(MORNN(8, activation="modrelu", orthogonal_map="householder",
                                          return_sequences=True))
    bi(x)
    for rnn in (bi.forward_layer, bi.backward_layer):
        rnn.recurrent_A.assign(rng.normal(0, 0.1, rnn.recurrent_A.shape).astype("float32"))
    y = np_(bi(x, mask=mask))
    tm = to_torch(bi)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x), torch.tensor(lengths),
                                                     batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        ref = torch.nn.utils.rnn.pad_packed_sequence(tm(packed)[0], batch_first=True)[0].numpy()
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(y[i, :n], ref[i, :n], atol=1e-5)
    # and a torch module's weights load into an existing layer
    bi2 = keras.layers.Bidirectional(MORNN(8, activation="modrelu", return_sequences=True))
    bi2(x)
    load_from_torch(bi2, tm)
    np.testing.assert_allclose(np_(bi2(x, mask=mask)), y, atol=1e-5)
    tanh = keras.layers.Bidirectional(MORNN(8, return_sequences=True))
    tanh(x)
    with pytest.raises(ValueError, match="does not match module"):
        load_from_torch(tanh, tm)


# --- compiled loop, training example, deployment --------------------------------------------------

@tf_only
def test_time_loop_is_a_graph_loop_on_tensorflow():
    import tensorflow as tf

    layer = MORNN(4)
    sizes = []
    for T in (5, 50):
        graph = tf.function(layer).get_concrete_function(tf.TensorSpec((2, T, 3), tf.float32)).graph
        ops_ = graph.get_operations()
        assert any(op.type in ("While", "StatelessWhile") for op in ops_)
        sizes.append(len(ops_))
    assert sizes[0] == sizes[1]  # not unrolled: the graph does not grow with T


def test_readme_snippet_trains_and_stays_orthogonal(capsys):
    """The README's Keras example as written (on every backend this module runs on): model.fit
    with the recipe's optimizer, then the printed max |W^T W - I| (the README states it)."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                 if "from matrec.keras import" in b)
    exec(compile(block, "README.md[keras]", "exec"), {})
    # the snippet's data is random, so the figure varies from run to run: 0.9e-6-2.5e-6 seen (float32
    # rounding); a recurrent matrix that left the orthogonal group would be off by 1e-3 and more
    assert float(capsys.readouterr().out.split()[-1]) <= 1e-5


def test_fit_with_plain_rmsprop_refolds_and_saves(x, tmp_path):
    """model.fit with a plain "rmsprop" (no recipe): the refold runs inside the compiled step, keeps
    W and the loss, and the trained model saves and loads (on JAX, the refold's case in point)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((7, 5)), MORNN(6, activation="modrelu", refold_every=3),
                              keras.layers.Dense(1)])
    model.compile(optimizer="rmsprop", loss="mse")
    y = np.random.default_rng(0).standard_normal((48, 1)).astype("float32")
    xs = np.concatenate([x] * 16)
    model.fit(xs, y, batch_size=6, epochs=1, verbose=0)   # 8 steps: refolds at 3 and 6
    layer = model.layers[0]
    assert int(np_(layer.refold_count)) == 8
    A0 = np_(layer.recurrent_A_origin)
    assert np.abs(A0).max() > 0 and not np.allclose(np_(layer.recurrent_A), A0)
    assert orth_error(layer) <= 1e-5
    model.save(tmp_path / "r.keras")
    loaded = keras.models.load_model(tmp_path / "r.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_copy_task_small_delay():
    """examples/keras_copy.py: model.fit on matrec's copy task, delay 10, recall >= 0.99."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import keras_copy
    finally:
        sys.path.pop(0)
    task = matrec.data.tasks.build_task("copy", delay=10)
    model = keras_copy.build_model("mornn", 64, task, lr=3e-3, seed=0)
    rows = keras_copy.train(model, task, steps=300, batch_size=32, every=300, log=lambda s: None)
    assert rows[-1][3] >= 0.99


@tf_only
def test_savedmodel_export_reloads_with_the_same_outputs(x, tmp_path):
    import tensorflow as tf

    model = keras.Sequential([keras.Input((7, 5)), MORNN(6, activation="modrelu", return_sequences=True),
                              keras.layers.Dense(2)])
    model.export(str(tmp_path / "saved"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(reloaded.serve(tf.constant(x)).numpy(), np_(model(x)), atol=1e-6)


def test_speed_benchmark_prints_every_row(capsys):
    from support import load_benchmark

    load_benchmark("keras_mornn").main(["--batch", "2", "--seq", "3", "--hidden", "4", "--large-hidden", "0",
                                        "--repeats", "1", "--warmup", "0"])
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "model" not in line}
    assert set(rows) == {"SimpleRNN tanh", "LSTM", "MORNN tanh", "MORNN relu", "MORNN modrelu",
                         "MORNN tanh householder"}
    assert all(len(line.split("|")[2:-1]) == 1 for line in rows.values())
    assert "(1.00x)" in rows["SimpleRNN tanh"]


@tf_only
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_tflite_builtins_convert_a_fixed_batch_model(x):
    """Recorded in benchmarks/results/keras_export.md: with static shapes the time loop converts to
    TFLite builtin ops and runs in the interpreter with the Keras outputs."""
    import tensorflow as tf

    model = keras.Sequential([keras.Input(batch_shape=x.shape), MORNN(6, activation="modrelu",
                                                                     return_sequences=True)])
    interp = tf.lite.Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(model).convert())
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, np_(model(x)), atol=1e-5)


# --- the other backend --------------------------------------------------------------------------

@tf_only
@pytest.mark.slow
def test_torch_backend():
    """This module's backend-independent tests on Keras's torch backend, in a subprocess (less the
    copy task and the benchmark smoke test, to keep the suite short)."""
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        "-k", "not backend and not copy_task and not speed_benchmark"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


@tf_only
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed (pip install 'matrec[jax]')")
def test_jax_backend():
    """The tests of this module that matter on Keras's JAX backend (CPU), in a subprocess: fit with
    the refold in the compiled step (recipe and plain optimizers), save/load, the README example,
    masking, dropout, dtypes, parity with PyTorch. (All of its backend-independent tests pass on JAX;
    the subset keeps the suite's time down: JAX compiles each new shape.)"""
    path = os.pathsep.join([str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        "-k", "500_steps or plain_rmsprop or readme or refold or optimizer or parity_after or "
                        "loading or masking or dropout or cast or stateful or simplernn_weights",
                        "-W", "ignore::UserWarning:jax"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
