import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from matrec.data.download import DataFileError
from matrec.data.tasks import build_task, lm
from support import SHAKESPEARE_FILE

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE_FILE.exists(),
                                       reason="shared/data/tinyshakespeare.txt not beside the repo")


@needs_shakespeare
def test_shakespeare_layout_split_and_baseline():
    task = build_task("shakespeare", seq_len=32, path=str(SHAKESPEARE_FILE))
    text = SHAKESPEARE_FILE.read_text()
    assert task.vocab_size == task.output_size == 65
    assert (len(task.ids["train"]), len(task.ids["val"])) == (1_003_854, 111_540)   # 90% / 10%
    assert task.decode(task.ids["val"][:50]) == text[1_003_854:1_003_904]
    x, y = task.get_batch("train", 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(task.get_batch("train", 8, torch.Generator().manual_seed(0))[0], x)   # deterministic
    for row in range(8):
        assert task.decode(x[row].tolist() + [y[row, -1].item()]) in text[:1_003_854]
    assert torch.equal(task.encode("To be"), torch.tensor([task.stoi[c] for c in "To be"]))
    # Baseline: the unigram log-frequencies as logits score the training-unigram entropy.
    train = torch.from_numpy(task.ids["train"].astype(np.int64))
    logp = (torch.bincount(train, minlength=65).double() / len(train)).log()
    out = logp.float().expand(1, len(train), 65)
    assert float(task.loss(out, train[None])) == pytest.approx(task.baseline, rel=1e-4)
    assert 3.2 < task.baseline < 3.4
    metrics = task.metrics(out[:, :1000], train[None, :1000])
    assert metrics["bits_per_token"] == pytest.approx(metrics["loss"] / math.log(2))


@needs_shakespeare
def test_shakespeare_corrupt_copy_is_a_clear_error(tmp_path):
    corrupt = tmp_path / "input.txt"
    corrupt.write_bytes(SHAKESPEARE_FILE.read_bytes()[:-1] + b"?")
    with pytest.raises(DataFileError, match=r"input.txt is corrupt.*expected 86c4e6aa"):
        build_task("shakespeare", path=str(corrupt))


def test_shakespeare_offline_without_file_says_how(tmp_path, monkeypatch):
    monkeypatch.delenv("MATREC_SHAKESPEARE", raising=False)
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path))
    monkeypatch.setenv("MATREC_OFFLINE", "1")
    with pytest.raises(DataFileError, match="set MATREC_SHAKESPEARE=.*raw.githubusercontent.com/karpathy"):
        build_task("shakespeare")


def _write_text(path: Path, lines: int = 3000) -> str:
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "away", "quickly",
             "dog", "saw", "bird", "flew", "over", "tree", "é"]
    text = "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ".\n"
                   for _ in range(lines))
    path.write_text(text, encoding="utf-8")
    return text


def test_text_bpe_task_trains_caches_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    text = _write_text(tmp_path / "stories.txt")
    task = build_task("text", path=str(tmp_path / "stories.txt"), vocab_size=300, seq_len=16)
    assert 256 < task.vocab_size <= 300 and task.output_size == task.vocab_size
    # Train and val are the file's two parts, cut at a line boundary near 90%.
    train_text, val_text = task.decode(task.ids["train"]), task.decode(task.ids["val"])
    assert train_text + val_text == text and train_text.endswith("\n")
    assert abs(len(train_text.encode()) / len(text.encode()) - 0.9) < 0.01
    assert task.decode(task.encode("the cat sat é")) == "the cat sat é"
    x, y = task.get_batch("val", 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(task.get_batch("val", 4, torch.Generator().manual_seed(0))[0], x)   # deterministic
    # A second build reuses the cached tokenizer and ids instead of training again.
    monkeypatch.setattr(lm, "_bpe_tokenizer", lambda *a: pytest.fail("tokenizer retrained"))
    again = build_task("text", path=str(tmp_path / "stories.txt"), vocab_size=300, seq_len=16)
    assert np.array_equal(again.ids["train"], task.ids["train"])
    # A damaged cache entry is an error naming it, never used.
    next((tmp_path / "cache" / "text").glob("*.ids.npz")).write_bytes(b"not a numpy file")
    with pytest.raises(DataFileError, match=r"ids .*\.ids\.npz are unreadable.*delete them"):
        build_task("text", path=str(tmp_path / "stories.txt"), vocab_size=300, seq_len=16)


def test_text_task_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.delenv("MATREC_TEXT", raising=False)
    with pytest.raises(ValueError, match="needs a text file: pass path=.*MATREC_TEXT"):
        build_task("text")
    with pytest.raises(DataFileError, match="does not exist"):
        build_task("text", path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        build_task("text", path=str(tmp_path), vocab_size=100)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        build_task("text", path=str(tmp_path), val_fraction=1.5)


@needs_shakespeare
def test_shakespeare_downloads_into_the_cache_when_missing(tmp_path, monkeypatch):
    from matrec.data import download
    monkeypatch.delenv("MATREC_SHAKESPEARE", raising=False)
    monkeypatch.delenv("MATREC_OFFLINE", raising=False)
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path))
    urls = []
    monkeypatch.setattr(download, "_urlopen", lambda url: urls.append(url) or open(SHAKESPEARE_FILE, "rb"))
    task = build_task("shakespeare", seq_len=8)
    assert urls == [download.SHAKESPEARE.urls[0]] and task.vocab_size == 65
    assert (tmp_path / "tinyshakespeare.txt").read_bytes() == SHAKESPEARE_FILE.read_bytes()
