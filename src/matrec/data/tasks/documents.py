"""Language modelling on long documents every machine has: the Python standard library's own
source files, byte by byte.

A module's identifiers, imports and definitions recur across thousands of lines, so a model that
keeps its state across a whole file can predict a long file's later bytes better than its first
ones; the loss by position (:mod:`matrec.train.context`) with the state carried vs reset measures it.
"""
from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import numpy as np
import torch

from .base import TASKS, check_int
from .lm import TokenLM
from .stream import StreamMixin

# folders left out wherever they are: tests (absent from some installations), installed packages,
# generated tables (code pages) and one giant string (pydoc's topics)
SKIP_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"})
SEPARATOR = 0   # the byte between training documents (source files hold no NUL)


def stdlib_root() -> Path:
    """The folder of this Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def long_files(root: Path, min_tokens: int, suffix: str = ".py") -> list[Path]:
    """Files under ``root`` ending in ``suffix`` with at least ``min_tokens`` bytes, outside
    :data:`SKIP_FOLDERS`, sorted by their path relative to ``root`` (the same order everywhere)."""
    files = [p for p in root.rglob(f"*{suffix}")
             if p.is_file() and not set(p.relative_to(root).parts[:-1]) & SKIP_FOLDERS]
    return sorted((p for p in files if p.stat().st_size >= min_tokens), key=lambda p: p.relative_to(root).as_posix())


@TASKS.register("documents")
class Documents(StreamMixin, TokenLM):
    """Byte-level LM on long documents: by default the Python standard library's ``.py`` files of
    at least ``min_tokens`` bytes (tests, site-packages, ``encodings`` and ``pydoc_data`` left
    out), or those under ``root=``. Files sorted by relative path; every ``val_every``-th one
    (the ``val_every``-th, the ``2 val_every``-th, ...) is validation, the rest train (a fixed
    split by file). Vocabulary: the 256 byte values.

    Train: the training files end to end, each followed by a NUL byte (its end, a target predicted
    from inside the file), read as ``batch_size`` streams carried across batches (``stream =
    True``). Packed (``pack=True``, the default): :meth:`get_packed_batch` marks each file's first
    byte in ``starts [B, T]``, and the trainer passes them to the model, which restarts its state
    there (the mixer protocol's packed documents): no information crosses from one file into the
    next, while the state is carried across chunks inside a file. ``pack=False`` gives no starts
    (the state then runs on from one file into the next). Validation: each validation file's first
    ``doc_len`` bytes rounded up to whole ``seq_len`` chunks, end to end, each file a document
    (starts at its first byte), so a row of the loss by position (``position_eval`` with bins
    ending at ``doc_len`` and ``rows`` unset) is one document read from its first byte with the
    state carried, its one boundary where the row starts. Attributes: ``files`` (per split, relative paths),
    ``corpus`` (a sha256 of the file list and contents: the corpus differs between Python
    versions), ``baseline`` (training unigram entropy). Metrics as ``text``.
    """

    name = "documents"

    def __init__(self, seq_len: int = 128, root: str | None = None, min_tokens: int = 32768,
                 doc_len: int = 30000, val_every: int = 10, suffix: str = ".py", pack: bool = True) -> None:
        self.seq_len = check_int("seq_len", seq_len)
        check_int("min_tokens", min_tokens)
        check_int("val_every", val_every, 2)
        if not isinstance(pack, bool):
            raise TypeError(f"pack must be a bool, got {pack!r}")
        self.doc_len = math.ceil(check_int("doc_len", doc_len) / seq_len) * seq_len
        if self.doc_len + 1 > min_tokens:
            raise ValueError(f"min_tokens must be > doc_len rounded up to whole seq_len chunks "
                             f"({self.doc_len}) so every validation document fills it, got {min_tokens}")
        folder = stdlib_root() if root is None else Path(root).expanduser()
        if not folder.is_dir():
            raise ValueError(f"root must be a folder of documents, got {str(folder)!r}")
        paths = long_files(folder, min_tokens, suffix)
        val = [p for i, p in enumerate(paths, 1) if i % val_every == 0]
        train = [p for i, p in enumerate(paths, 1) if i % val_every != 0]
        if not val or not train:
            raise ValueError(f"{str(folder)!r} holds {len(paths)} '*{suffix}' file(s) of >= {min_tokens} bytes; "
                             f"at least {val_every} are needed (one in {val_every} validates)")
        digest = hashlib.sha256()
        texts = {}
        for p in paths:
            data = p.read_bytes()
            digest.update(p.relative_to(folder).as_posix().encode() + b"\0" + data)
            texts[p] = np.frombuffer(data, dtype=np.uint8)
        self.corpus = digest.hexdigest()
        self.files = {"train": [p.relative_to(folder).as_posix() for p in train],
                      "val": [p.relative_to(folder).as_posix() for p in val]}
        sep = np.array([SEPARATOR], dtype=np.uint8)
        train_ids = np.concatenate([part for p in train for part in (texts[p], sep)])
        # doc_len + 1 bytes each: a row's last target is still its own document's byte (the
        # stream reads chunks of T + 1 steps, and a segment's last whole chunk ends one step early)
        val_ids = np.concatenate([texts[p][:self.doc_len + 1] for p in val] + [sep])
        self._set_ids(train_ids, val_ids, 256)
        lengths = {"train": [len(texts[p]) + 1 for p in train], "val": [self.doc_len + 1] * len(val)}
        self.doc_starts = {split: self._first_steps(lengths[split], len(self.ids[split])) for split in lengths}
        self.pack = pack

    @staticmethod
    def _first_steps(lengths: list[int], total: int) -> np.ndarray:
        """Bool ``[total]``: True at the first step of each of the documents of ``lengths``, end to end."""
        marks = np.zeros(total, dtype=bool)
        marks[np.cumsum([0] + lengths[:-1])] = True
        return marks

    def _starts(self, split: str) -> np.ndarray | None:
        return self.doc_starts[split] if self.pack else None

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
