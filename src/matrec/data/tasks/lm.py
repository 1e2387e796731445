"""Language modelling: characters of tiny-shakespeare, or BPE tokens of any text file.

Both read the text once, keep it as one array of token ids per split, and cut batches from it:
random windows (``shakespeare``, ``text``) or consecutive chunks carried across batches
(``shakespeare_stream``, ``text_stream``; see :mod:`.stream`).
"""
from __future__ import annotations

import codecs
import hashlib
import io
import itertools
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..download import (SHAKESPEARE, DataFileError, atomic_write_bytes, cache_dir, fetch, sha256_of,
                        usable_cache)
from .base import TASKS, Task, check_int, check_number, check_split
from .stream import StreamMixin


class TokenLM(Task):
    """Next-token prediction over ``self.ids[split]`` (1-D numpy arrays of ids < ``vocab_size``).

    Batches: ``x [B, seq_len]`` int64 windows at random offsets, ``y`` the same shifted by one.
    Loss: cross-entropy at every position. ``baseline``: the entropy of the training unigram
    distribution (the best memoryless predictor). Metrics: ``accuracy`` (next token),
    ``bits_per_token`` (loss / ln 2).
    """

    has_vocabulary = True
    ids: dict[str, np.ndarray]
    seq_len: int

    def _set_ids(self, train: np.ndarray, val: np.ndarray, vocab_size: int) -> None:
        for split, ids in (("train", train), ("val", val)):
            if len(ids) < self.seq_len + 2:
                raise ValueError(f"the {split} split has {len(ids):,} tokens, too few for seq_len="
                                 f"{self.seq_len}; use a longer text or a smaller seq_len")
        self.ids = {"train": train, "val": val}
        self.vocab_size = self.output_size = vocab_size
        p = np.bincount(train, minlength=vocab_size).astype(np.float64) / len(train)
        self.baseline = float(-(p[p > 0] * np.log(p[p > 0])).sum())

    def _series(self, split: str) -> np.ndarray:
        return self.ids[split]

    def _pair(self, chunk: np.ndarray) -> tuple[Tensor, Tensor]:
        chunk = torch.from_numpy(chunk.astype(np.int64))                          # [B, T + 1]
        return chunk[:, :-1], chunk[:, 1:]

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = self.ids[check_split(split)]
        starts = torch.randint(0, len(ids) - self.seq_len, (check_int("batch_size", batch_size),),
                               generator=generator).numpy()
        return self._pair(ids[starts[:, None] + np.arange(self.seq_len + 1)])

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))

    def token_losses(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1),
                               reduction="none").view(target.shape)                # [B, T]

    @torch.no_grad()   # plain numbers: no graph, and no warning for a float() of a grad tensor
    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        loss = float(self.loss(output, target))
        return {"loss": loss, "accuracy": float((output.argmax(-1) == target).float().mean()),
                "bits_per_token": loss / math.log(2)}


class CharVocabulary:
    """Characters as tokens: ``self.chars`` (sorted) and ``self.stoi``, shared by the character tasks."""

    def encode(self, text: str) -> Tensor:
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"text has characters outside the {len(self.chars)}-symbol vocabulary: {unknown}")
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def tokenizer_json(self) -> str:
        """The vocabulary as a ``tokenizers`` JSON (checkpoints keep it; see :func:`char_tokenizer`)."""
        return char_tokenizer(self.chars).to_str()


@TASKS.register("shakespeare")
class CharLM(CharVocabulary, TokenLM):
    """Character-level LM on tiny-shakespeare (1,115,394 characters, 65 symbols; first 90% train,
    last 10% val). Tokens ``[B, seq_len]``, targets the next characters. The file is downloaded
    from karpathy/char-rnn and verified (sha256), or read from ``path=`` / ``$MATREC_SHAKESPEARE``.
    ``baseline`` = training unigram entropy (about 3.3 nats); metrics ``accuracy``,
    ``bits_per_token`` (bits per character).
    """

    name = "shakespeare"

    def __init__(self, seq_len: int = 256, path: str | None = None) -> None:
        self.seq_len = check_int("seq_len", seq_len)
        text = fetch(SHAKESPEARE, path).read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        lookup = np.zeros(int(codes.max()) + 1, dtype=np.uint8)
        lookup[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = lookup[codes]
        cut = int(0.9 * len(ids))
        self._set_ids(ids[:cut], ids[cut:], len(self.chars))



@TASKS.register("shakespeare_stream")
class CharStream(StreamMixin, CharLM):
    """Character-level tiny-shakespeare read as ``batch_size`` long streams (about 1M training steps
    in all): each batch continues the previous one, so the trainer carries the recurrent state
    (truncated back-propagation). The position lives in ``state_dict()``. Layout, loss, baseline and
    metrics as for ``shakespeare``.
    """

    name = "shakespeare_stream"


class StoredVocabulary:
    """A text task's vocabulary rebuilt from the tokenizer JSON its checkpoints keep: ``encode``,
    ``decode`` and ``model_io`` as the task has them, without the data file the task was built from
    (what ``matrec sample`` needs)."""

    def __init__(self, tokenizer_json: str) -> None:
        self.tokenizer = _tokenizers().Tokenizer.from_str(tokenizer_json)
        self.vocab_size = self.output_size = self.tokenizer.get_vocab_size()
        self.input_size = None
        self.has_vocabulary = True

    def model_io(self) -> dict[str, int | None]:
        return {"vocab_size": self.vocab_size, "input_size": None, "output_size": self.output_size}

    def encode(self, text: str) -> Tensor:
        try:
            ids = self.tokenizer.encode(text).ids
        except Exception as err:  # the character vocabulary has no unknown token
            raise ValueError(f"text cannot be encoded with this run's vocabulary: {self._unknown(text)} "
                             f"not in it ({err})") from None
        return torch.tensor(ids, dtype=torch.long)

    def _unknown(self, text: str) -> str:
        """The characters of ``text`` the vocabulary cannot encode, e.g. ``'\\n'`` typed as two."""
        bad = []
        for c in dict.fromkeys(text):
            try:
                self.tokenizer.encode(c)
            except Exception:
                bad.append(c)
        return ", ".join(repr(c) for c in bad) if bad else "some character"

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def _tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError("the text task needs the tokenizers library: pip install 'matrec[workbench]'") from err
    return tokenizers


def char_tokenizer(chars):
    """A ``tokenizers.Tokenizer`` whose id ``i`` is the character ``chars[i]``: every character is
    its own pre-token, looked up in a word-level vocabulary, and decoding concatenates."""
    tk = _tokenizers()
    chars = list(chars)
    if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
        raise ValueError(f"chars must be distinct single characters, got {chars[:10]!r}...")
    tokenizer = tk.Tokenizer(tk.models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = tk.decoders.Fuse()
    return tokenizer


def _bpe_tokenizer(train_lines, vocab_size: int):
    tk = _tokenizers()
    Tokenizer, decoders, models, pre_tokenizers, trainers = (
        tk.Tokenizer, tk.decoders, tk.models, tk.pre_tokenizers, tk.trainers)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(train_lines, trainer)
    return tokenizer


def _lines(path: Path, start_byte: int, stop_byte: int, batch: int = 4096):
    """Lists of up to ``batch`` lines (newlines kept) whose first byte lies in [start, stop)."""
    with open(path, "rb") as f:
        f.seek(start_byte)
        lines = []
        while f.tell() < stop_byte:
            line = f.readline()
            if not line:
                break
            lines.append(line.decode("utf-8", errors="replace"))
            if len(lines) == batch:
                yield lines
                lines = []
        if lines:
            yield lines


def check_text(path: Path, block: int = 1 << 20) -> None:
    """Raise :class:`DataFileError` unless ``path`` is UTF-8 text without NUL bytes: a binary or
    otherwise-encoded file would train the tokenizer on replacement characters."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            zero = chunk.find(b"\0")
            if zero >= 0:
                raise DataFileError(f"{path} is not a text file (a NUL byte at byte {offset + zero:,}); "
                                    f"the text task trains on UTF-8 text")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path} is not UTF-8 text (an invalid byte near byte "
                                    f"{offset + e.start:,}); convert it to UTF-8 first") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataFileError(f"{path} is not UTF-8 text (it ends inside a character)") from None


def _line_boundary(path: Path, byte: int) -> int:
    """The first line start at or after ``byte``."""
    if byte == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(byte - 1)
        f.readline()
        return f.tell()


def _tokenize_cached(file: Path, vocab_size: int, val_fraction: float):
    """(tokenizer, train ids, val ids) of ``file``, from the cache or trained, encoded and cached."""
    key = hashlib.sha256(f"{sha256_of(file)}|{vocab_size}|{val_fraction}".encode()).hexdigest()[:20]
    folder = cache_dir() / "text"
    tok_file, ids_file = folder / f"{key}.tokenizer.json", folder / f"{key}.ids.npz"
    Tokenizer = _tokenizers().Tokenizer

    if tok_file.exists() and ids_file.exists():
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
            with np.load(ids_file) as cached:
                train, val = cached["train"], cached["val"]
        except Exception as err:
            raise DataFileError(f"the cached tokenizer {tok_file} or ids {ids_file} are unreadable "
                                f"({err}); delete them and they will be rebuilt") from err
    else:
        check_text(file)
        usable_cache(folder)   # before the training, whose result would be lost
        size = file.stat().st_size
        cut = _line_boundary(file, int(size * (1 - val_fraction)))
        if cut <= 0 or cut >= size:
            raise ValueError(f"{file} has too few lines to split {1 - val_fraction:.0%} / "
                             f"{val_fraction:.0%} at a line boundary")
        print(f"matrec: training a {vocab_size}-token BPE tokenizer on {file} (cached in {folder})",
              file=sys.stderr)
        tokenizer = _bpe_tokenizer((line for b in _lines(file, 0, cut) for line in b), vocab_size)
        dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.int32
        train, val = (np.fromiter(itertools.chain.from_iterable(
            e.ids for b in _lines(file, lo, hi) for e in tokenizer.encode_batch(b)), dtype=dtype)
            for lo, hi in ((0, cut), (cut, size)))
        atomic_write_bytes(tok_file, tokenizer.to_str().encode())
        buffer = io.BytesIO()
        np.savez(buffer, train=train, val=val)
        atomic_write_bytes(ids_file, buffer.getvalue())
    return tokenizer, train, val


@TASKS.register("text")
class TextLM(TokenLM):
    """LM on any UTF-8 text file (e.g. TinyStories' .txt as is) with a byte-level BPE tokenizer
    trained on its first ``1 - val_fraction`` (the train split; the rest, from a line boundary,
    is val) by the ``tokenizers`` library. Tokens ``[B, seq_len]``, targets the next tokens.
    The file comes from ``path=`` or ``$MATREC_TEXT``. The trained tokenizer and the token ids are
    cached in ``$MATREC_CACHE/text/`` under the file's sha256, so later runs skip training.
    ``vocab_size`` is the requested BPE vocabulary (a short text may give fewer tokens);
    ``baseline`` = training unigram entropy; metrics ``accuracy``, ``bits_per_token``.
    """

    name = "text"

    def __init__(self, path: str | None = None, vocab_size: int = 4096, seq_len: int = 256,
                 val_fraction: float = 0.1) -> None:
        self.seq_len = check_int("seq_len", seq_len)
        check_int("vocab_size", vocab_size, 257)
        if not 0 < check_number("val_fraction", val_fraction) < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        source = path or os.environ.get("MATREC_TEXT")
        if not source:
            raise ValueError("the text task needs a text file: pass path=... or set MATREC_TEXT=/path/to/file.txt")
        file = Path(source).expanduser()
        if not file.is_file():
            raise DataFileError(f"text file {file} (from {'path' if path else '$MATREC_TEXT'}) does not exist")
        self.tokenizer, train, val = _tokenize_cached(file, vocab_size, val_fraction)
        self.source = str(file)
        self._set_ids(train, val, self.tokenizer.get_vocab_size())

    def encode(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def tokenizer_json(self) -> str:
        """The trained BPE tokenizer as JSON (checkpoints keep it)."""
        return self.tokenizer.to_str()


@TASKS.register("text_stream")
class TextStream(StreamMixin, TextLM):
    """The ``text`` task read as ``batch_size`` long token streams carried across batches
    (truncated back-propagation; position in ``state_dict()``). Options and metrics as ``text``.
    """

    name = "text_stream"
