"""passkey: the episode layout on tiny inputs (the key stated once, nowhere in the filler, never
an input at the answer; the question exactly `distance` after the statement), targets, pooled
metrics, determinism, and stream rows that start at episodes."""
import math

import numpy as np
import pytest
import torch

from matrec.data.tasks import build_task
from matrec.data.tasks.passkey import DIGITS, IGNORE, QUESTION, STATEMENT
from support import SHAKESPEARE_FILE

pytestmark = pytest.mark.skipif(not SHAKESPEARE_FILE.exists(), reason="tiny-shakespeare not beside the repo")


def make(**kw):
    return build_task("passkey", path=str(SHAKESPEARE_FILE), **{"seq_len": 16, "length": 4000,
                                                                  "val_length": 2000, "digits": 5, **kw})


@pytest.mark.parametrize("distance,low", [(0, None), (37, None), (300, 10)])
def test_each_episode_states_the_key_once_and_asks_exactly_distance_later(distance, low):
    task = make(distance=distance, min_distance=low)
    for split in ("train", "val"):
        ep = task.episodes[split]
        text = task.decode(ep["x"])
        digit_ids = set(task.encode(DIGITS).tolist())
        for k in range(len(ep["key_at"])):
            a, q = int(ep["key_at"][k]), int(ep["question_at"][k])
            end = a + 5 + len(STATEMENT[1])                      # the statement's end
            assert q - end == ep["distance"][k]
            assert (low or distance) <= ep["distance"][k] <= distance
            assert text[a - len(STATEMENT[0]):a] == STATEMENT[0] and text[q:q + len(QUESTION)] == QUESTION
            key = text[a:a + 5]
            assert all(c in DIGITS for c in key)
            stop = int(ep["key_at"][k + 1]) - len(STATEMENT[0]) if k + 1 < len(ep["key_at"]) else len(text)
            episode_digits = [i for i in range(a - len(STATEMENT[0]), stop) if int(ep["x"][i]) in digit_ids]
            assert episode_digits == list(range(a, a + 5))       # the key once, and no digit in the filler
            assert text[q + len(QUESTION):q + len(QUESTION) + 5] == "_____"   # the answer is not an input
            # targets: the key's digits from the question's last character on, IGNORE elsewhere
            answer = q + len(QUESTION) - 1
            assert task.decode(ep["y"][answer:answer + 5]) == key
        assert (ep["y"] != IGNORE).sum() == 5 * len(ep["key_at"])


def test_deterministic_per_seed_and_split_filler_from_its_own_text():
    a, b, c = make(distance=50), make(distance=50), make(distance=50, seed=1)
    assert np.array_equal(a.episodes["train"]["x"], b.episodes["train"]["x"])
    assert not np.array_equal(a.episodes["train"]["x"], c.episodes["train"]["x"])
    assert not np.array_equal(a.episodes["train"]["x"][:2000], a.episodes["val"]["x"][:2000])
    # the validation filler comes from the last 10% of the text only
    val_text = a.decode(a.filler["val"])
    ep = a.episodes["val"]
    q, d = int(ep["question_at"][0]), int(ep["distance"][0])
    assert a.decode(ep["x"][q - d:q]) in val_text
    assert "3" not in a.decode(a.filler["train"])


def test_batches_rows_start_at_episodes_and_metrics_pool_the_answers():
    task = make(distance=40)
    ep = task.episodes["val"]
    assert len(ep["key_at"]) % 64 == 0
    E = int(ep["question_at"][1] - ep["question_at"][0])
    segment = (task.stream_length("val") - 1) // 4
    assert segment % E == 0                                        # each row starts at an episode
    x, y = task.batch_at("val", 4, 0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert task.decode(x[1]) == STATEMENT[0][:16] and task.decode(x[3]) == STATEMENT[0][:16]
    # the oracle (the true digit wherever one is due) scores 1, a constant guess about chance
    totals_true, totals_zero, n = {}, {}, 12
    for i in range(n):
        xb, yb = task.batch_at("val", 4, i)
        oracle = torch.nn.functional.one_hot(yb.clamp(min=0), task.vocab_size).float()
        for out, tot in ((oracle, totals_true), (torch.zeros(4, 16, task.vocab_size), totals_zero)):
            for k, v in task.metrics(out, yb).items():
                tot[k] = tot.get(k, 0.0) + (0.0 if math.isnan(v) else v) / n
    assert totals_true["answers"] > 0
    assert task.summarize(totals_true)["accuracy"] == 1.0
    assert task.summarize(totals_zero)["loss"] == pytest.approx(math.log(task.vocab_size))
    # a chunk without answers: zero loss with a graph, so the trainer's backward step still works
    out = torch.randn(4, 16, task.vocab_size, requires_grad=True)
    loss = task.loss(out, torch.full((4, 16), IGNORE))
    loss.backward()
    assert float(loss.detach()) == 0.0 and out.grad.abs().sum() == 0


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="min_distance must be <= distance"):
        make(distance=10, min_distance=20)
    with pytest.raises(ValueError, match="distance must be <="):
        make(distance=10 ** 7)
