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


# ------------------------------------------------------------------ packed documents

def _tiny(tmp_path, **options):
    _corpus(tmp_path)   # 20 files of 288 bytes: 18 train (289 steps each with its NUL), 2 validate
    return build_task("documents", root=str(tmp_path), suffix=".txt", min_tokens=48 * 6, doc_len=256,
                      seq_len=16, val_every=10, **options)


def test_starts_land_where_each_document_starts(tmp_path):
    task = _tiny(tmp_path)
    ids = task.ids["train"]
    assert np.flatnonzero(task.doc_starts["train"]).tolist() == list(range(0, 18 * 289, 289))
    assert (ids[np.flatnonzero(task.doc_starts["train"])[1:] - 1] == 0).all()   # a NUL ends each file
    assert np.flatnonzero(task.doc_starts["val"]).tolist() == [0, 257]           # doc_len + 1 steps each
    segment = (len(ids) - 1) // 2                                                # 2 rows: 2600 steps each
    assert task.chunks_per_pass("train", 2) == 162
    for index in (0, 1, 18, 161, 162, 180):
        x, y, starts = task.packed_batch_at("train", 2, index)
        assert torch.equal(x, task.batch_at("train", 2, index)[0])
        first = np.arange(2)[:, None] * segment + index % 162 * 16 + np.arange(16)  # stream steps of x
        want = first % 289 == 0
        want[:, 0] |= index % 162 == 0                                              # a pass begins
        assert starts.dtype == torch.bool and np.array_equal(starts.numpy(), want), index
    assert task.packed_batch_at("train", 2, 18)[2][0].nonzero().flatten().tolist() == [1]   # 289 = 18 * 16 + 1
    # get_packed_batch reads the cursor as get_batch does
    task.reset()
    assert torch.equal(task.get_packed_batch("train", 2)[2], task.packed_batch_at("train", 2, 0)[2])
    assert torch.equal(task.get_packed_batch("train", 2)[0], task.batch_at("train", 2, 1)[0])
    assert _tiny(tmp_path, pack=False).packed_batch_at("train", 2, 18)[2] is None
    with pytest.raises(TypeError, match="pack must be a bool"):
        _tiny(tmp_path, pack="yes")


def test_the_loss_by_position_rows_hold_one_boundary_each_where_the_file_starts(tmp_path):
    task = _tiny(tmp_path)
    for index in range(256 // 16):   # rows = the 2 validation files, read chunk by chunk
        starts = task.packed_batch_at("val", 2, index)[2]
        assert starts.nonzero().tolist() == ([[0, 0], [1, 0]] if index == 0 else []), index


EXPERIMENT_MODELS = {   # experiments/stdlib_documents.toml's models, small
    "mornn": dict(hidden_size=8), "lstm": dict(hidden_size=8), "gru": dict(hidden_size=8),
    "mru": dict(d_model=8, n_layers=2, n_heads=2), "txl": dict(d_model=8, n_layers=2, n_heads=2, mem_len=8),
    "attn": dict(d_model=8, n_layers=2, n_heads=2, window=8)}


@pytest.mark.parametrize("name", sorted(EXPERIMENT_MODELS))
def test_no_information_crosses_a_document_boundary(tmp_path, name):
    """Batches 17, 18 of the stream (row 0 holds file 1's start at step 1 of batch 18) read with the
    state carried and the batch's starts: from the start on, the model's outputs are those of file
    1 read alone from a fresh state; without the starts they are not."""
    from matrec.models import build_model
    task = _tiny(tmp_path)
    torch.manual_seed(0)
    model = build_model(name, **task.model_io(), **EXPERIMENT_MODELS[name]).double().eval()
    with torch.no_grad():
        for p in model.parameters():   # off the initialisation (an MRU's W_in starts at zero)
            p.add_(0.1 * torch.randn_like(p))
        x0, _, s0 = task.packed_batch_at("train", 2, 17)
        x1, _, s1 = task.packed_batch_at("train", 2, 18)
        _, state = model(x0, None, starts=s0)
        out, _ = model(x1, state, starts=s1)
        alone, _ = model(x1[:1, 1:], None)
        torch.testing.assert_close(out[0, 1:], alone[0], atol=1e-10, rtol=1e-10)
        _, state = model(x0, None)
        leaky, _ = model(x1, state)
        assert (leaky[0, 1:] - alone[0]).abs().max() > 1e-6


def test_the_trainer_passes_the_starts_to_the_model(tmp_path):
    from support import tiny_config
    from matrec.train import Trainer
    (tmp_path / "corpus").mkdir()
    _corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path, "docs", task="documents", model="lstm", batch_size=2, steps=2,
                      task_args=dict(root=str(tmp_path / "corpus"), suffix=".txt", min_tokens=288, doc_len=256,
                                     seq_len=16))
    trainer = Trainer(cfg)
    trainer.task.load_state_dict({"cursor": {"train": 18, "val": 0}})
    x, y, kwargs = trainer._batch("train", trainer.data_gen)
    assert torch.equal(kwargs["starts"], trainer.task.packed_batch_at("train", 2, 18)[2])
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("starts")), with_kwargs=True)
    trainer.train()
    evaluated = seen[2:]   # the end-of-run evaluation: 2 validation batches from the stream's start
    assert torch.equal(seen[0], trainer.task.packed_batch_at("train", 2, 19)[2])
    assert len(evaluated) == 2 and torch.equal(evaluated[0], trainer.task.packed_batch_at("val", 2, 0)[2])
