"""The vocabularies of matrec's language-model tasks as transformers ``PreTrainedTokenizerFast``.

- ``shakespeare`` (characters): a word-level model over single characters (every character is
  its own pre-token), decoded by concatenation; ids are the task's ids (sorted characters).
- ``text`` (byte-level BPE): the task's trained ``tokenizers.Tokenizer`` as it is.

Both get a ``<pad>`` token with the id just past the model's vocabulary and pad on the left: the
model never sees a pad id (``MatrecForCausalLM`` skips masked positions), so the vocabulary the
model was trained on stays unchanged.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD = "<pad>"


def char_tokenizer(chars) -> PreTrainedTokenizerFast:
    """A tokenizer whose id ``i`` is the character ``chars[i]`` (``chars``: distinct 1-char strings)."""
    from matrec.data.tasks.lm import char_tokenizer as raw

    chars = list(chars)
    return _wrap(raw(chars), base_size=len(chars))


def bpe_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """A trained ``tokenizers.Tokenizer`` (the ``text`` task's byte-level BPE) for transformers."""
    return tokenizer_from_json(tokenizer.to_str())


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """A ``tokenizers`` JSON (what a task's ``tokenizer_json()`` gives and checkpoints keep)."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_str(text)  # a fresh object: the pad token must not land in the task's
    return _wrap(tk, base_size=tk.get_vocab_size())


def _wrap(tk, base_size: int) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False,
                                   padding_side="left", model_max_length=1 << 30)
    fast.add_special_tokens({"pad_token": PAD})
    if fast.pad_token_id != base_size:
        raise ValueError(f"the pad token got id {fast.pad_token_id}, expected {base_size} (just past "
                         f"the vocabulary)")
    return fast


def task_tokenizer(task) -> PreTrainedTokenizerFast:
    """The tokenizer of a matrec LM task: ``shakespeare`` (characters) or ``text`` (BPE)."""
    text = task.tokenizer_json()
    if text is None:
        raise ValueError(f"task {task.name!r} has no vocabulary "
                         f"(a character or BPE language-model task is needed)")
    return tokenizer_from_json(text)


def vocab_size_without_pad(tokenizer) -> int:
    """The tokenizer's vocabulary size, not counting its ``<pad>`` token."""
    n = len(tokenizer)
    return n - 1 if tokenizer.pad_token == PAD and tokenizer.pad_token_id == n - 1 else n


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """Raise when ``tokenizer`` does not fit a model of ``vocab_size`` tokens."""
    n = vocab_size_without_pad(tokenizer)
    if n != vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens (without {PAD}) but the model's vocabulary "
                         f"has {vocab_size}: they do not belong together")
