import gzip

import numpy as np
import pytest
import torch

from matrec.data.download import DataFileError
from matrec.data.tasks import build_task


def test_sequential_digits_layout_and_baseline():
    task = build_task("seq_digits")
    assert task.model_io() == {"vocab_size": None, "input_size": 1, "output_size": 10}
    assert (len(task.train_y), len(task.val_y)) == (1500, 297)
    x, y = task.get_batch("train", 16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 64, 1) and y.shape == (16,) and y.dtype == torch.long
    assert x.min() >= 0 and x.max() <= 1
    # Each row is one of the training images, pixels in reading order.
    for row in range(16):
        assert (task.train_x == x[row, :, 0]).all(1).any()
    # Baseline: predicting the training class frequencies (log-prior logits) scores it exactly.
    prior = torch.bincount(task.train_y, minlength=10).float() / 1500
    out = prior.log().expand(1500, 64, 10)
    assert float(task.loss(out, task.train_y)) == pytest.approx(task.baseline, rel=1e-5)
    assert task.baseline == pytest.approx(np.log(10), abs=0.01)
    assert task.metrics(out, task.train_y)["accuracy"] < 0.2


def test_permuted_digits_use_one_fixed_permutation():
    seq, perm = build_task("seq_digits"), build_task("perm_digits", permutation_seed=3)
    xs, ys = seq.get_batch("val", 8, torch.Generator().manual_seed(5))
    xp, yp = perm.get_batch("val", 8, torch.Generator().manual_seed(5))
    assert torch.equal(ys, yp) and torch.equal(xp[:, :, 0], xs[:, perm.permutation, 0])
    assert sorted(perm.permutation.tolist()) == list(range(64)) and not torch.equal(xp, xs)
    assert torch.equal(build_task("perm_digits", permutation_seed=3).permutation, perm.permutation)


def _idx(magic: int, shape: tuple[int, ...], data: np.ndarray) -> bytes:
    return np.array([magic, *shape], dtype=">u4").tobytes() + data.astype(np.uint8).tobytes()


def _fake_mnist(folder, n_train=12, n_test=6, packed=False):
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": _idx(2051, (n_train, 28, 28), rng.integers(0, 256, (n_train, 28, 28))),
             "train-labels-idx1-ubyte": _idx(2049, (n_train,), rng.integers(0, 10, n_train)),
             "t10k-images-idx3-ubyte": _idx(2051, (n_test, 28, 28), rng.integers(0, 256, (n_test, 28, 28))),
             "t10k-labels-idx1-ubyte": _idx(2049, (n_test,), rng.integers(0, 10, n_test))}
    for name, raw in files.items():
        if packed:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return files


def test_mnist_from_unpacked_idx_folder(tmp_path, monkeypatch):
    files = _fake_mnist(tmp_path)
    monkeypatch.setenv("MATREC_MNIST", str(tmp_path))
    task = build_task("perm_digits", dataset="mnist")
    assert task.length == 784 and task.train_x.shape == (12, 784) and task.val_x.shape == (6, 784)
    first = np.frombuffer(files["train-images-idx3-ubyte"][16:16 + 784], dtype=np.uint8) / 255.0
    assert np.allclose(task.train_x[0].numpy(), first)
    x, y = task.get_batch("train", 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 784, 1)


def test_mnist_corrupt_or_missing_files_are_clear_errors(tmp_path):
    _fake_mnist(tmp_path, packed=True)     # gzipped but not the real archives: checksum mismatch
    with pytest.raises(DataFileError, match="train-images-idx3-ubyte.gz is corrupt.*expected 440fcabf"):
        build_task("seq_digits", dataset="mnist", path=str(tmp_path))
    bad = tmp_path / "raw"
    bad.mkdir()
    _fake_mnist(bad)
    (bad / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01junk")
    with pytest.raises(DataFileError, match="t10k-labels-idx1-ubyte is not a valid MNIST IDX file"):
        build_task("seq_digits", dataset="mnist", path=str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFileError, match="holds neither train-images-idx3-ubyte.gz nor"):
        build_task("seq_digits", dataset="mnist", path=str(empty))
    with pytest.raises(DataFileError, match="does not exist"):
        build_task("seq_digits", dataset="mnist", path=str(tmp_path / "nope"))


def test_mnist_offline_without_files_says_how_to_supply(tmp_path, monkeypatch):
    monkeypatch.delenv("MATREC_MNIST", raising=False)
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path))
    monkeypatch.setenv("MATREC_OFFLINE", "1")
    with pytest.raises(DataFileError,
        match="train-images-idx3-ubyte.gz is not in the cache.*MATREC_OFFLINE.*set MATREC_MNIST"):
        build_task("seq_digits", dataset="mnist")


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match=r"dataset must be one of \['sklearn', 'mnist'\], got 'cifar'"):
        build_task("seq_digits", dataset="cifar")
    with pytest.raises(ValueError, match="path applies to dataset='mnist' only"):
        build_task("seq_digits", path="/tmp")
    with pytest.raises(ValueError, match="permutation_seed must be an int >= 0"):
        build_task("perm_digits", permutation_seed=-1)
    with pytest.raises(ValueError, match="permutation_seed applies to perm_digits only"):
        build_task("seq_digits", permutation_seed=3)


def test_mnist_is_downloaded_verified_and_cached_when_missing(tmp_path, monkeypatch):
    """The download path end to end, with the four archives served by a fake network."""
    import dataclasses
    import hashlib
    import io

    from matrec.data import download
    from matrec.data.tasks import digits

    raw = tmp_path / "raw"
    raw.mkdir()
    files = _fake_mnist(raw, packed=True)
    served = {}
    for key, spec in list(download.MNIST.items()):
        payload = (raw / spec.name).read_bytes()
        served[spec.urls[0]] = payload
        monkeypatch.setitem(download.MNIST, key, dataclasses.replace(
            spec, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload)))
    monkeypatch.delenv("MATREC_MNIST", raising=False)
    monkeypatch.delenv("MATREC_OFFLINE", raising=False)
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "_urlopen", lambda url: io.BytesIO(served[url]))
    digits._load_mnist.cache_clear()     # the loader caches by folder; None is "the cache"
    try:
        task = build_task("seq_digits", dataset="mnist")
        assert task.train_x.shape == (12, 784) and task.val_x.shape == (6, 784)
        first = np.frombuffer(files["t10k-images-idx3-ubyte"][16:16 + 784], dtype=np.uint8) / 255.0
        assert np.allclose(task.val_x[0].numpy(), first)
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
            spec.name for spec in download.MNIST.values())
    finally:
        digits._load_mnist.cache_clear()
