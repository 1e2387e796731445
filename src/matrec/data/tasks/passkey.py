"""Retrieval across long distances in real text: a pass key stated once, natural filler text, then
the question, read as a stream carried across chunks (truncated back-propagation).

Each episode is ``statement + filler + question + blanks``: the statement holds the key's digits,
the filler is ``distance`` characters of tiny-shakespeare with its digits removed (so the key can
appear nowhere else), and the question is followed by one blank per digit, where the model must
write the key from memory (the blanks hide the answer from the input: it is stated only once).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..download import SHAKESPEARE, fetch
from .base import TASKS, Task, check_int
from .lm import CharVocabulary
from .stream import StreamMixin

DIGITS = "0123456789"
BLANK = "_"
STATEMENT = ("\nThe pass key is ", ". Remember it.\n")
QUESTION = "\nWhat is the pass key? The pass key is "
IGNORE = -100
EPISODE_MULTIPLE = 64   # validation episodes: a multiple of every power-of-two batch size up to 64


def episodes(filler: np.ndarray, n: int, lo: int, hi: int, digits: int, ids: dict[str, np.ndarray],
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` episodes laid end to end: ``{"x": inputs, "y": targets (IGNORE off the answers),
    "key_at": first key digit of each, "question_at": first question token of each, "distance":
    filler length of each}`` (numpy arrays; inputs and targets int16 ``[steps]``).

    ``ids`` maps "head", "tail", "question", "blank" and "digits" to token ids. Episode ``k``'s
    filler (``U[lo, hi]`` characters) is a window of ``filler`` at a random offset.
    """
    head, tail, question = ids["head"], ids["tail"], ids["question"]
    distance = rng.integers(lo, hi + 1, n)
    keys = rng.integers(0, 10, (n, digits))
    offsets = rng.integers(0, len(filler) - hi + 1, n)
    fixed = len(head) + digits + len(tail) + len(question) + digits
    lengths = fixed + distance
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    x = np.empty(int(lengths.sum()), dtype=np.int16)
    y = np.full(len(x), IGNORE, dtype=np.int16)
    key_at, question_at = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    for k in range(n):
        key = ids["digits"][keys[k]]
        parts = [head, key, tail, filler[offsets[k]:offsets[k] + distance[k]], question,
                 np.full(digits, ids["blank"], dtype=np.int16)]
        at = starts[k]
        key_at[k] = at + len(head)
        question_at[k] = at + len(head) + digits + len(tail) + distance[k]
        x[at:at + lengths[k]] = np.concatenate(parts)
        # digit i is due at the step before its place: the question's last token, then the blanks
        answer = question_at[k] + len(question) - 1
        y[answer:answer + digits] = key
    return {"x": x, "y": y, "key_at": key_at, "question_at": question_at, "distance": distance}


@TASKS.register("passkey")
class Passkey(CharVocabulary, StreamMixin, Task):
    """Pass-key retrieval in natural text, character level. Each episode: "The pass key is 48213.
    Remember it." (a new random key of ``digits`` digits), then filler text (tiny-shakespeare
    with its digits removed, a window at a random place of the split's text), then "What is the
    pass key? The pass key is " followed by ``digits`` blanks; at the question's last character and
    the blanks the model must output the key's digits in order. The question starts exactly
    ``distance`` characters after the statement ends (a fixed distance, or one drawn uniformly from
    ``[min_distance, distance]`` per episode: train on short, evaluate on long ones with
    ``eval_at``). The key appears once: nowhere in the filler, and never as an input at the answer.

    Episodes are laid end to end in one stream per split (``length`` / ``val_length`` characters
    at least; the validation split holds a multiple of 64 episodes, so ``batch_size`` rows of a
    power of two each start at an episode) read in ``seq_len`` chunks with the state carried across
    batches (``stream = True``). Tokens ``[B, seq_len]``; targets ``[B, seq_len]`` are the digit ids
    at the answer positions and -100 elsewhere. Loss: cross-entropy on the answers (0 for a chunk
    without any). ``baseline`` = ln 10 (a digit guessed). Metrics, pooled over an evaluation:
    ``accuracy`` (per digit; chance 0.1) and ``loss``. Filler from ``path=`` /
    ``$MATREC_SHAKESPEARE`` or the verified download, as for ``shakespeare``.
    """

    name = "passkey"
    has_vocabulary = True

    def __init__(self, seq_len: int = 128, distance: int = 1024, min_distance: int | None = None,
                 digits: int = 5, length: int = 1 << 20, val_length: int = 1 << 18, seed: int = 0,
                 path: str | None = None) -> None:
        self.seq_len = check_int("seq_len", seq_len)
        self.distance = check_int("distance", distance, 0)
        self.min_distance = distance if min_distance is None else check_int("min_distance", min_distance, 0)
        if self.min_distance > distance:
            raise ValueError(f"min_distance must be <= distance ({distance}), got {min_distance}")
        self.digits = check_int("digits", digits)
        check_int("length", length)
        check_int("val_length", val_length)
        check_int("seed", seed, 0)
        text = fetch(SHAKESPEARE, path).read_text(encoding="utf-8")
        text = text.translate({ord(d): None for d in DIGITS})      # the key's digits appear nowhere else
        self.chars = sorted(set(text) | set(DIGITS) | set("".join(STATEMENT) + QUESTION)) + [BLANK]
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = self.output_size = len(self.chars)
        self.baseline = math.log(10)
        filler = self._ids(text)
        cut = int(0.9 * len(filler))
        self.filler = {"train": filler[:cut], "val": filler[cut:]}
        for split, part in self.filler.items():
            if len(part) < distance:
                raise ValueError(f"distance must be <= {len(part):,} (the {split} filler text), got {distance}")
        ids = {"head": self._ids(STATEMENT[0]), "tail": self._ids(STATEMENT[1]), "question": self._ids(QUESTION),
               "blank": self.stoi[BLANK], "digits": self._ids(DIGITS)}
        mean = len(STATEMENT[0] + STATEMENT[1] + QUESTION) + 2 * digits + (self.min_distance + distance) / 2
        self.episodes = {}
        for i, (split, steps) in enumerate((("train", length), ("val", val_length))):
            n = max(1, math.ceil(steps / mean))
            if split == "val":
                n = math.ceil(n / EPISODE_MULTIPLE) * EPISODE_MULTIPLE
            rng = np.random.default_rng([seed, i])
            self.episodes[split] = episodes(self.filler[split], n, self.min_distance, distance, digits, ids, rng)
        for split, ep in self.episodes.items():   # one more step: the stream reads seq_len + 1 at a time
            ep["series"] = np.stack([np.append(ep["x"], ep["x"][:1]), np.append(ep["y"], IGNORE)], axis=1)

    def _ids(self, text: str) -> np.ndarray:
        return np.array([self.stoi[c] for c in text], dtype=np.int16)

    def _series(self, split: str) -> np.ndarray:
        return self.episodes[split]["series"]                                     # [steps + 1, 2]

    def _pair(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        chunk = torch.from_numpy(chunk[:, :-1].astype(np.int64))                  # [B, T, 2]
        return chunk[..., 0], chunk[..., 1]                                       # [B, T], [B, T]

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        logits = output.reshape(-1, output.shape[-1]).float()
        scored = target.reshape(-1) != IGNORE
        if not scored.any():   # no answer in this chunk: a zero that keeps the graph
            return logits.sum() * 0.0
        return F.cross_entropy(logits[scored], target.reshape(-1)[scored])

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        scored = target != IGNORE
        logits = output[scored].float()                                           # [answers, V]
        truth = target[scored]
        sums = {"answers": float(scored.sum()),
                "hits": float((logits.argmax(-1) == truth).sum()),
                "nll": float(F.cross_entropy(logits, truth, reduction="sum")) if len(truth) else 0.0}
        return self.summarize(sums)

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """Accuracy and loss pooled over the answers of every batch averaged (most chunks hold
        none when the distance is long), not means of per-batch ratios."""
        count = means["answers"]
        return {**means, "loss": means["nll"] / count if count else math.nan,
                "accuracy": means["hits"] / count if count else math.nan}

