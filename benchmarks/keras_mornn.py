"""Keras MORNN forward+backward time against keras.layers.SimpleRNN and LSTM, same backend and shapes.

    PYTHONPATH=src python benchmarks/keras_mornn.py --batch 32 --seq 100 --hidden 128 --large-hidden 256
    PYTHONPATH=src KERAS_BACKEND=torch python benchmarks/keras_mornn.py ...   # another backend

Each row times the gradient of ``sum(layer(x))`` with respect to the layer's trainable variables
(TensorFlow: one ``tf.function``, graph mode; torch: eager autograd; JAX: one ``jax.jit``), best of
``--repeats`` after ``--warmup`` calls, the rows taking turns so machine load hits them alike. The
MORNN time includes building ``W = base @ f(A)`` (once per call) and its backward.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import matrec.keras as mk  # before keras: Triton must load before TensorFlow

import keras  # noqa: E402


def _grad_fn(layer, x):
    """A zero-argument callable computing d sum(layer(x)) / d(trainable variables), synchronously."""
    layer(x)  # build
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(xt, training=False))
            return tape.gradient(loss, [v.value for v in layer.trainable_variables])

        return lambda: [g.numpy() for g in step()]
    if backend == "torch":
        import torch

        xt = torch.from_numpy(x)
        params = [v.value for v in layer.trainable_variables]

        def step():
            grads = torch.autograd.grad(layer(xt).sum(), params)
            return [g.numpy() for g in grads]

        return step
    if backend == "jax":
        import jax

        xt = jax.numpy.asarray(x)
        trainable = [v.value for v in layer.trainable_variables]
        fixed = [v.value for v in layer.non_trainable_variables]

        @jax.jit
        def step(tv):
            def loss(tv):
                y, _ = layer.stateless_call(tv, fixed, xt)
                return y.sum()
            return jax.grad(loss)(tv)

        return lambda: [np.asarray(g) for g in step(trainable)]
    raise ValueError(f"unsupported Keras backend {backend!r}")


def models(hidden: int):
    """(row name, layer factory) pairs."""
    return [
        ("SimpleRNN tanh", lambda: keras.layers.SimpleRNN(hidden, return_sequences=True)),
        ("LSTM", lambda: keras.layers.LSTM(hidden, return_sequences=True)),
        ("MORNN tanh", lambda: mk.MORNN(hidden, return_sequences=True)),
        ("MORNN relu", lambda: mk.MORNN(hidden, activation="relu", return_sequences=True)),
        ("MORNN modrelu", lambda: mk.MORNN(hidden, activation="modrelu", return_sequences=True)),
        ("MORNN tanh householder", lambda: mk.MORNN(hidden, orthogonal_map="householder",
                                                    return_sequences=True)),
    ]


def time_shape(batch: int, seq: int, features: int, hidden: int, repeats: int, warmup: int) -> dict[str, float]:
    x = np.random.default_rng(0).standard_normal((batch, seq, features)).astype("float32")
    fns = {name: _grad_fn(make(), x) for name, make in models(hidden)}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: 1e3 * t for name, t in best.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=100)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--large-hidden", type=int, default=256, help="second column's H (0: none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args(argv)
    shapes = [(a.batch, a.seq, H) for H in (a.hidden, a.large_hidden) if H]
    cols = [time_shape(B, T, a.features, H, a.repeats, a.warmup) for B, T, H in shapes]
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"{os.cpu_count()} CPUs visible; input features {a.features}; forward+backward, ms "
          f"(best of {a.repeats}, round-robin)\n")
    print("| model | " + " | ".join(f"B={B}, T={T}, H={H}" for B, T, H in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for name in cols[0]:
        cells = [f"{c[name]:.1f} ({c[name] / c['SimpleRNN tanh']:.2f}x)" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
