"""Sequential and permuted digits (docs/tasks.md, "The tasks"): classify an image read one pixel per step.

Two image sources, chosen with ``dataset=``: scikit-learn's bundled 8x8 digits (T = 64, offline,
1,797 images: a fixed shuffle gives 1,500 train / 297 val) and MNIST (T = 784, 60,000 train /
10,000 test as val) from the four IDX files: ``path=`` or ``$MATREC_MNIST`` names a folder holding
them (``.gz`` as distributed, checksum-verified, or unpacked), else they are downloaded and cached.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...registry import Registry
from ..download import MNIST, DataFileError, fetch
from .base import TASKS, Task, check_int, check_split

# dataset name -> loader(path) -> (train_x [N, T] float in [0, 1], train_y [N], val_x, val_y)
DIGIT_SOURCES: Registry = Registry("digits dataset", argument="dataset")


@DIGIT_SOURCES.register("sklearn")
@functools.lru_cache(maxsize=1)
def load_sklearn_digits(path: str | None = None):
    if path is not None:
        raise ValueError("path applies to dataset='mnist' only; the sklearn digits ship with scikit-learn")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("dataset='sklearn' needs scikit-learn: pip install 'matrec[workbench]'") from err
    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)          # [1797, 64], pixels 0..16
    y = torch.from_numpy(digits.target.astype(np.int64))                 # [1797]
    # The bundled file is ordered by writer; a fixed shuffle keeps both splits representative.
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:1500], order[1500:]
    return x[train], y[train], x[val], y[val]


def _read_idx(raw: bytes, name: str, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, count, item dimensions) holding uint8 items."""
    header = 4 * (2 + len(item_shape))
    dims = np.frombuffer(raw[:header], dtype=">u4").tolist() if len(raw) >= header else []
    count = dims[1] if len(dims) > 1 else 0
    if dims[:1] != [magic] or dims[2:] != list(item_shape) or len(raw) != header + count * int(np.prod(item_shape)):
        raise DataFileError(f"{name} is not a valid MNIST IDX file (header {dims}, {len(raw):,} bytes; "
                            f"expected magic {magic}, items of shape {list(item_shape)}); "
                            f"replace it with the original file")
    return np.frombuffer(raw[header:], dtype=np.uint8).reshape(count, *item_shape)


def _mnist_bytes(key: str, folder: Path | None) -> tuple[bytes, str]:
    spec = MNIST[key]
    if folder is None:
        try:
            path = fetch(spec)
        except DataFileError as err:
            raise DataFileError(f"{err} Or set MATREC_MNIST (or pass path=) to a folder holding the "
                                f"four MNIST IDX files, .gz or unpacked.") from None
    else:
        packed, unpacked = folder / spec.name, folder / spec.name.removesuffix(".gz")
        if packed.is_file():
            path = fetch(spec, packed)
        elif unpacked.is_file():
            return unpacked.read_bytes(), str(unpacked)
        else:
            raise DataFileError(f"MNIST folder {folder} holds neither {spec.name} nor {unpacked.name}; "
                                f"download it from {spec.urls[0]} (sha256 {spec.sha256})")
    return gzip.decompress(path.read_bytes()), str(path)


@DIGIT_SOURCES.register("mnist")
def load_mnist(path: str | None = None):
    folder = path or os.environ.get("MATREC_MNIST")
    folder = Path(folder).expanduser() if folder else None
    if folder is not None and not folder.is_dir():
        raise DataFileError(f"MNIST folder {folder} (from {'path' if path else '$MATREC_MNIST'}) "
                            f"does not exist; point it at the folder holding the four IDX files")
    return _load_mnist(folder)


@functools.lru_cache(maxsize=1)
def _load_mnist(folder: Path | None):
    out = []
    for split in ("train", "test"):
        images = _read_idx(*_mnist_bytes(f"{split}_images", folder), magic=2051, item_shape=(28, 28))
        labels = _read_idx(*_mnist_bytes(f"{split}_labels", folder), magic=2049, item_shape=())
        if len(images) != len(labels):
            raise DataFileError(f"MNIST {split} files disagree: {len(images)} images, {len(labels)} labels")
        out += [torch.from_numpy(images.reshape(len(images), 784).astype(np.float32) / 255.0),
                torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)


@TASKS.register("seq_digits")
class SequentialDigits(Task):
    """Features ``[B, T, 1]``: a digit image's pixels (scaled to [0, 1]) one per step, row by row
    (T = 64 for ``dataset='sklearn'``, 784 for ``'mnist'``). Target ``[B]``: the digit 0..9, read
    from the model's last output ``out[:, -1]``.

    Loss: cross-entropy; memoryless ``baseline``: the entropy of the training labels (predicting
    the class frequencies, about ln 10). Metric: ``accuracy`` (chance 0.1).
    """

    name = "seq_digits"
    input_size = 1
    output_size = 10
    permuted = False

    def __init__(self, dataset: str = "sklearn", path: str | None = None, permutation_seed: int = 0) -> None:
        loader = DIGIT_SOURCES.get(dataset)
        self.dataset = dataset
        self.train_x, self.train_y, self.val_x, self.val_y = loader(None if path is None else str(path))
        self.length = self.train_x.shape[1]
        if self.permuted:
            check_int("permutation_seed", permutation_seed, 0)
            # One fixed pixel order for the whole run (and every run with the same seed).
            self.permutation = torch.randperm(self.length, generator=torch.Generator().manual_seed(permutation_seed))
        else:
            if permutation_seed != 0:   # accepted only so both tasks share one signature
                raise ValueError(f"permutation_seed applies to perm_digits only, got {permutation_seed!r}")
            self.permutation = None
        prior = torch.bincount(self.train_y, minlength=10).float() / len(self.train_y)
        self.baseline = float(-(prior[prior > 0] * prior[prior > 0].log()).sum())

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        images, labels = (self.train_x, self.train_y) if check_split(split) == "train" else (self.val_x, self.val_y)
        idx = torch.randint(0, len(labels), (check_int("batch_size", batch_size),), generator=generator)
        x = images[idx]                                                       # [B, T]
        if self.permutation is not None:
            x = x[:, self.permutation]
        return x.unsqueeze(-1), labels[idx]                                   # [B, T, 1], [B]

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output[:, -1].float(), target)

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        accuracy = (output[:, -1].argmax(-1) == target).float().mean()
        return {"loss": float(self.loss(output, target)), "accuracy": float(accuracy)}


@TASKS.register("perm_digits")
class PermutedDigits(SequentialDigits):
    """Sequential digits with the pixels in one fixed random order (``permutation_seed``), which
    spreads each stroke across the whole sequence and so needs longer memory. Layout, loss,
    ``baseline`` and ``accuracy`` as for ``seq_digits``.
    """

    name = "perm_digits"
    permuted = True
