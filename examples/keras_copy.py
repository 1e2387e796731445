"""The copy task in Keras: MORNN (one line changed from SimpleRNN) against SimpleRNN and LSTM.

    pip install "matrec[keras]"
    PYTHONPATH=src python examples/keras_copy.py --delay 300 --steps 2000 --every 250

The task is matrec's (``matrec.data.tasks.copy``): 10 symbols from 1..8, ``delay - 1`` blanks, the
marker, 10 blanks; the model must output the symbols in the last 10 positions. Every model is
Embedding -> RNN -> Dense, trained with ``model.fit`` on fresh batches; recall is the accuracy on
the last 10 positions of a fixed held-out batch (chance 1/8). The MORNN uses the recipe: modReLU,
Henaff init, RMSprop with the orthogonal parameters at lr / 10 (``orthogonal_optimizer``),
gradient norm clipped at 1. SimpleRNN and LSTM get plain RMSprop with the same clipping, and the
LSTM a hidden size with at least the MORNN's parameter count.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from matrec.data.tasks import build_task
from matrec.keras import MORNN, orthogonal_optimizer

import keras  # after matrec.keras: see the note on Triton and TensorFlow in matrec/keras/__init__.py


def build_model(kind: str, hidden: int, task, embed: int = 10, lr: float = 1e-3, seed: int = 0,
                batch_size: int | None = None):
    """Embedding -> ``kind`` ("mornn", "simplernn", "lstm") -> Dense logits, compiled
    (``batch_size``: a fixed batch dimension, for exporters that need static shapes)."""
    keras.utils.set_random_seed(seed)
    if kind == "mornn":
        rnn = MORNN(hidden, activation="modrelu", recurrent_init="henaff", return_sequences=True)
        opt = orthogonal_optimizer("rmsprop", lr, clipnorm=1.0)
    elif kind == "simplernn":
        rnn = keras.layers.SimpleRNN(hidden, return_sequences=True)
        opt = keras.optimizers.RMSprop(lr, clipnorm=1.0)
    elif kind == "lstm":
        rnn = keras.layers.LSTM(hidden, return_sequences=True)
        opt = keras.optimizers.RMSprop(lr, clipnorm=1.0)
    else:
        raise ValueError(f"kind must be 'mornn', 'simplernn' or 'lstm', got {kind!r}")
    model = keras.Sequential([keras.Input(batch_shape=(batch_size, task.length), dtype="int32"),
                              keras.layers.Embedding(task.vocab_size, embed), rnn,
                              keras.layers.Dense(task.output_size)])
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def evaluate(model, task, seed: int = 1, batch_size: int = 256) -> dict[str, float]:
    """matrec's copy metrics (loss over every position, recall on the last 10) on a fixed batch."""
    x, y = task.get_batch("val", batch_size, torch.Generator().manual_seed(seed))
    logits = model.predict(x.numpy().astype("int32"), batch_size=batch_size, verbose=0)
    return task.metrics(torch.from_numpy(np.asarray(logits, dtype=np.float32)), y)


def lstm_hidden_for(n_params: int, embed: int, vocab: int, out: int) -> int:
    """Smallest LSTM hidden size whose model has at least ``n_params`` parameters."""
    H = 1
    while vocab * embed + 4 * H * (embed + H + 1) + H * out + out < n_params:
        H += 1
    return H


def train(model, task, steps: int, batch_size: int = 32, every: int = 100, seed: int = 0,
          log=print) -> list[tuple[int, float, float, float]]:
    """``model.fit`` for ``steps`` batches, evaluating every ``every``; rows (step, s, loss, recall)."""
    gen = torch.Generator().manual_seed(seed)
    rows, done, t0 = [], 0, time.perf_counter()
    while done < steps:
        n = min(every, steps - done)
        # n fresh batches as arrays, in order (a Python generator would let fit read ahead and drop
        # batches, so the data would depend on how often we evaluate)
        x, y = (t.numpy().astype("int32") for t in task.get_batch("train", n * batch_size, gen))
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
        done += n
        m = evaluate(model, task)
        rows.append((done, time.perf_counter() - t0, m["loss"], m["recall"]))
        log(f"| {model.layers[1].__class__.__name__} | {done} | {rows[-1][1]:.0f} | {m['loss']:.4f} | "
            f"{m['recall']:.3f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay", type=int, default=300)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--embed", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="mornn,simplernn,lstm")
    a = p.parse_args(argv)
    task = build_task("copy", delay=a.delay)
    mornn = build_model("mornn", a.hidden, task, a.embed, a.lr, a.seed)
    n = mornn.count_params()
    H = lstm_hidden_for(n, a.embed, task.vocab_size, task.output_size)
    print(f"copy delay {a.delay} (length {task.length}), memoryless loss {task.baseline:.4f}, chance "
          f"recall 0.125; keras {keras.__version__} ({keras.backend.backend()}); MORNN H={a.hidden} "
          f"({n} params), SimpleRNN H={a.hidden}, LSTM H={H}; batch {a.batch}, RMSprop lr {a.lr}\n")
    print("| model | step | seconds | val loss | recall |\n|---|---|---|---|---|")
    for kind in a.models.split(","):
        model = mornn if kind == "mornn" else build_model(kind, H if kind == "lstm" else a.hidden, task,
                                                          a.embed, a.lr, a.seed)
        train(model, task, a.steps, a.batch, a.every, a.seed)


if __name__ == "__main__":
    main()
