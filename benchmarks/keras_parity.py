"""Keras MORNN vs the PyTorch matrec.MORNN with the same weights: max |output difference|.

    PYTHONPATH=src python benchmarks/keras_parity.py

For every activation and for (1 layer, 1 direction), (2 layers, bidirectional), (3 layers, 1
direction): a PyTorch MORNN (random init, ``A`` drawn away from 0) is converted with
``matrec.keras.from_torch``, the Keras stack is run on the same float32 input, and then converted
back with ``to_torch`` (the matrix moves as a matrix, so the orthogonal map plays no part here;
tests/keras/test_keras.py compares the maps themselves). Prints the largest absolute difference of
each direction of conversion, and the largest output magnitude (linear and modReLU states grow along
the sequence, and float32 rounding with them).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from _harness import Table

import matrec
from matrec.keras import from_torch, to_torch

import keras  # noqa: E402  (after matrec.keras)


def parity(activation: str, layers: int, bidirectional: bool, B: int, T: int,
           seed: int = 0) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    tm = matrec.MORNN(16, 32, layers, nonlinearity=activation, batch_first=True,
                      bidirectional=bidirectional, init="random").eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("_A"):
                p.normal_(0, 0.1)
        x = torch.randn(B, T, 16)
        ref = tm(x)[0].numpy()
    y = x.numpy()
    stack = from_torch(tm)
    for layer in stack:
        y = layer(y)
    to_keras = float(np.abs(keras.ops.convert_to_numpy(y) - ref).max())
    with torch.no_grad():
        back = float(np.abs(to_torch(stack)(x)[0].numpy() - ref).max())
    return to_keras, back, float(np.abs(ref).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=100)
    a = p.parse_args(argv)
    print(f"keras {keras.__version__} ({keras.backend.backend()}), torch {torch.__version__}; "
          f"input [{a.batch}, {a.seq}, 16], H = 32, float32; each cell: max |Keras - PyTorch| after "
          f"torch -> keras, after keras -> torch; max |output|\n")
    configs = [(1, False), (2, True), (3, False)]
    names = [f"{L} layer{'s' * (L > 1)}{', bidirectional' * bi}" for L, bi in configs]
    table = Table({"activation": "activation", **{n: n for n in names}}, stream=True)
    for act in ("tanh", "relu", "identity", "modrelu"):
        cells = [parity(act, L, bi, a.batch, a.seq) for L, bi in configs]
        table.add(activation=act, **{n: f"{k:.1e}, {t:.1e}; {m:.0f}" for n, (k, t, m) in zip(names, cells)})
    return table


if __name__ == "__main__":
    main()
