"""documents: the standard library corpus (long files only, a fixed split by file, determinism),
and the loss by position on a tiny synthetic corpus where the answer is known: a model that
remembers everything predicts each repeated byte exactly once its first copy lies behind it,
if and only if its state is carried."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from matrec.data.tasks import build_task
from matrec.train.context import loss_by_position


def test_stdlib_corpus_is_long_split_by_file_and_deterministic():
    a = build_task("documents")
    b = build_task("documents")
    assert a.corpus == b.corpus and a.files == b.files
    assert np.array_equal(a.ids["train"], b.ids["train"]) and np.array_equal(a.ids["val"], b.ids["val"])
    assert not set(a.files["train"]) & set(a.files["val"])
    assert len(a.files["val"]) >= 5 and len(a.files["train"]) >= 9 * len(a.files["val"]) - 9
    everything = sorted(a.files["train"] + a.files["val"])
    assert a.files["val"] == everything[9::10]                         # every 10th file in path order
    assert not {part for f in everything for part in f.split("/")[:-1]} & {"test", "tests", "encodings"}
    from matrec.data.tasks.documents import stdlib_root
    assert all((stdlib_root() / f).stat().st_size >= 32768 for f in everything)
    # validation: each document's first doc_len bytes (30,000 rounded up to 128-byte chunks)
    assert a.doc_len == 30080 and len(a.ids["val"]) == 30081 * len(a.files["val"]) + 1
    first = (stdlib_root() / a.files["val"][1]).read_bytes()[:30081]
    assert bytes(a.ids["val"][30081:60162]) == first
    assert a.vocab_size == 256 and 0 < a.baseline < math.log(256)


def _corpus(folder, n_files=20, block=48, repeats=6, seed=0):
    """Files of ``block`` random letters repeated ``repeats`` times (each file its own block)."""
    rng = np.random.default_rng(seed)
    for i in range(n_files):
        text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), block)) * repeats
        (folder / f"doc{i:02d}.txt").write_text(text)


class Recall(nn.Module):
    """Predicts byte t+1 as the byte ``block - 1`` steps before t (certain once that lies inside
    what it has seen since its state was last reset), else uniform; its state is all it has seen."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, state=None):
        seen = x if state is None else torch.cat([state, x], 1)           # [B, S + T]
        B, T = x.shape
        out = torch.zeros(B, T, 256)
        offset = seen.shape[1] - T
        for t in range(T):
            back = offset + t + 1 - self.block
            if back >= 0:
                out[torch.arange(B), t, seen[:, back]] = 100.0
        return out, seen


def test_loss_by_position_bins_on_a_tiny_corpus(tmp_path):
    _corpus(tmp_path)
    task = build_task("documents", root=str(tmp_path), suffix=".txt", min_tokens=48 * 6, doc_len=256,
                      seq_len=16, val_every=10)
    assert task.files["val"] == ["doc09.txt", "doc19.txt"] and task.doc_len == 256
    bins = [0, 16, 48, 64, 256]
    carried = loss_by_position(Recall(48), task, bins, carry=True)
    reset = loss_by_position(Recall(48), task, bins, carry=False)
    assert carried["rows"] == 2 and carried["context"] == 256            # one row per document
    uniform = math.log(256)
    # positions 0..46 have no copy behind them (t + 1 - 48 < 0); from 47 on, carried is exact
    assert carried["loss"][0] == pytest.approx(uniform, rel=1e-4)        # 0-16
    assert carried["loss"][1] == pytest.approx(uniform * 31 / 32, rel=1e-3)   # 16-48: 47 is known
    assert carried["loss"][2] == pytest.approx(0.0, abs=1e-3)
    assert carried["loss"][3] == pytest.approx(0.0, abs=1e-3)   # up to the last target, in-document
    # reset every 16-step chunk: the copy 47 steps back is never in view
    assert reset["loss"] == pytest.approx([uniform] * 4, rel=1e-4)
    assert carried["steps"] == [32, 64, 32, 384]


def test_bad_options_are_named(tmp_path):
    _corpus(tmp_path, n_files=3)
    with pytest.raises(ValueError, match="at least 10 are needed"):
        build_task("documents", root=str(tmp_path), suffix=".txt", min_tokens=100, doc_len=64, seq_len=16)
    with pytest.raises(ValueError, match="min_tokens must be > doc_len"):
        build_task("documents", root=str(tmp_path), suffix=".txt", min_tokens=100, doc_len=200, seq_len=16)
    with pytest.raises(ValueError, match="root must be a folder"):
        build_task("documents", root=str(tmp_path / "nope"))
