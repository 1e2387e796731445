"""Autoregressive sampling for every model that follows the ``forward(x, state) -> (out, state)``
contract with token inputs."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from ..checks import check_int, check_real


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row from ``logits [B, V]`` -> ``[B, 1]``; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def _check(prompt, max_new_tokens, temperature, top_k) -> None:
    # bools are ints to Python, and nan compares False with everything: both would pass a range test
    check_int("max_new_tokens", max_new_tokens, 0)
    check_real("temperature", temperature, minimum=0)
    check_int("top_k", top_k, allow_none=True)
    if not isinstance(prompt, Tensor):
        raise TypeError(f"prompt must be a Tensor of token ids, got {type(prompt).__name__}")
    if (prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool
            or prompt.dim() not in (1, 2) or prompt.shape[-1] < 1):
        raise ValueError(f"prompt must be token ids [B, T0] or [T0] with T0 >= 1, got "
                         f"{tuple(prompt.shape)} {prompt.dtype}")


@torch.no_grad()
def generate_stream(model: nn.Module, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, *, generator: torch.Generator | None = None,
                    use_state: bool = True) -> Iterator[Tensor]:
    """Yield the ``max_new_tokens`` new tokens of :func:`generate` one at a time, each ``[B, 1]``
    (``[1]`` for a 1-D prompt), as soon as it is sampled (for live printing).

    A model that returns no state (``None``) is re-fed its whole context for every token, which is
    always correct, just slower.
    """
    _check(prompt, max_new_tokens, temperature, top_k)
    # a features model ([B, T, F] inputs) cannot be fed its own samples: say so before torch does
    if getattr(model, "vocab_size", 0) is None:
        raise ValueError("model must take token ids (built with vocab_size) to generate, "
                         "got a model of features")
    vocab = getattr(model, "vocab_size", None)
    if isinstance(vocab, int) and (int(prompt.min()) < 0 or int(prompt.max()) >= vocab):
        raise ValueError(f"prompt token ids must be in [0, {vocab}) (the model's vocab_size), got "
                         f"ids from {int(prompt.min())} to {int(prompt.max())}")
    if max_new_tokens == 0:  # nothing to sample: do not run the model on the prompt
        return
    squeeze = prompt.dim() == 1
    tokens = prompt[None] if squeeze else prompt  # [B, T]
    was_training = model.training
    model.eval()
    try:
        logits, state = model(tokens)
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k, generator).to(tokens.dtype)  # [B, 1]
            yield nxt[0] if squeeze else nxt
            if i + 1 == max_new_tokens:
                break
            if use_state and state is not None:
                logits, state = model(nxt, state)
            else:   # only the re-feed path keeps the context (the streamed one stays constant-size)
                tokens = torch.cat((tokens, nxt), dim=1)
                logits, _ = model(tokens)
    finally:
        model.train(was_training)


class Generates:
    """Gives a model ``model.generate(prompt, max_new_tokens, ...)``: :func:`generate` on itself."""

    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, **kwargs) -> Tensor:
        """See :func:`matrec.models.generate`."""
        return generate(self, prompt, max_new_tokens, temperature, top_k, **kwargs)


def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, *, generator: torch.Generator | None = None,
             use_state: bool = True) -> Tensor:
    """Continue ``prompt [B, T0]`` (token ids; 1-D is one sequence) by ``max_new_tokens`` tokens.

    With ``use_state`` (the default) the prompt is read once and each new token is one step that
    passes the model's state along: recurrent mixers stream their state (memory constant in the
    generated length), attention extends its KV cache. ``use_state=False`` re-runs the whole
    sequence for every token: the reference the streamed path equals, except for Transformer-XL
    layers, whose streamed steps see only their last ``mem_len`` tokens (none with ``mem_len=0``).

    Args:
        temperature: softmax temperature; 0 picks the most likely token.
        top_k: sample only among the ``top_k`` most likely tokens.
        generator: a ``torch.Generator`` (on the logits' device) for reproducible sampling.
    Returns:
        ``[B, T0 + max_new_tokens]``: the prompt followed by the new tokens.
    """
    new = list(generate_stream(model, prompt, max_new_tokens, temperature, top_k,
                               generator=generator, use_state=use_state))
    return torch.cat([prompt, *new], dim=-1)
