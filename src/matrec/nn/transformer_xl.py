"""Transformer-XL attention (Dai et al. 2019): segment-level memory and relative positions.

Each call attends over ``[memory; x]`` where ``memory [B, M, E]`` holds the (detached) inputs of
this layer for the previous ``mem_len`` tokens. Scores use relative positions::

    score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_r R_(i - j)

with sinusoidal ``R`` and learned ``u, v`` per head. The new memory is the last ``mem_len`` rows of
``[memory; x]``, detached: gradients never cross a segment boundary (the stop-gradient of the
paper), which is what lets training run segment by segment in constant memory.

Packed documents (``starts [B, T]``, the mixer protocol): a query sees the keys of its own document
only (memory slots included), so each document computes as if run alone (relative positions need
no restart). The state is then ``(memory, valid)``, ``valid [B, M]`` marking the memory slots of
each row's last document, which the next call continues; a plain memory counts as all valid.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checks import check_divides, check_int
from .init import init_linear
from .protocol import NoExportForm, StateSpec, check_mask


def sinusoid(n: int, dim: int, device, dtype) -> Tensor:
    """Sinusoidal embeddings of distances ``0 .. n-1``: ``[n, dim]``."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    # ceil(dim / 2) frequencies give dim + 1 columns when dim is odd: drop the last cosine
    return torch.cat((pos.sin(), pos.cos()), dim=-1)[:, :dim].to(dtype)


class TransformerXLAttention(nn.Module):
    """Relative multi-head attention with segment memory. State: memory ``[B, <=mem_len, E]``.

    Args:
        mem_len: how many past layer inputs to keep (0: no memory).
    """

    def __init__(self, d_model: int, *, n_heads: int = 1, dropout: float = 0.0, mem_len: int = 256,
                 bias: bool = False) -> None:
        super().__init__()
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        check_divides("n_heads", n_heads, "d_model", d_model)
        check_int("mem_len", mem_len, minimum=0)
        self.n_heads, self.head_dim, self.mem_len = n_heads, d_model // n_heads, mem_len
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.r = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.v = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.attn_dropout = nn.Dropout(dropout)
        self.residual_proj = nn.Linear(d_model, d_model, bias=bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        for lin in (self.q, self.kv, self.r):
            init_linear(lin, std)
        init_linear(self.residual_proj, residual_std)
        nn.init.zeros_(self.u)
        nn.init.zeros_(self.v)

    def state_spec(self) -> list[StateSpec]:
        """The memory ``[B, M, E]`` (``M`` grows to ``mem_len``); none with ``mem_len=0``."""
        return [StateSpec("memory", ("B", "P", self.kv.in_features))] if self.mem_len > 0 else []

    def forward(self, x: Tensor, state: Tensor | tuple | None = None, *, mask: Tensor | None = None,
                starts: Tensor | None = None) -> tuple[Tensor, Tensor | tuple | None]:
        check_mask(mask, x)
        check_mask(starts, x, "starts")
        if mask is not None:
            raise NoExportForm("TransformerXLAttention takes no mask: its memory keeps the last mem_len "
                               "inputs by count, which padding would make per-row")
        B, T, E = x.shape
        valid = None  # [B, M]: the memory slots of each row's last document (packed documents)
        if isinstance(state, tuple):
            state, valid = state
        H, D = self.n_heads, self.head_dim
        # the memory is cast to x's float dtype (bf16 runs keep an fp32 memory); an integer one is
        # not a memory this layer returned
        if state is not None and (not isinstance(state, Tensor) or not state.is_floating_point()):
            got = state.dtype if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(f"state must be None or a floating-point memory [B, M, {E}], got {got}")
        h = x if state is None else torch.cat((state.to(x.dtype), x), dim=1)  # [B, K, E]
        K = h.shape[1]
        M = K - T
        q = self.q(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k, v = (t.view(B, K, H, D).transpose(1, 2) for t in self.kv(h).split(E, dim=-1))  # [B, H, K, D]
        # R's rows run from distance K - 1 down to 0, which is what the skew below needs
        r = self.r(sinusoid(K, E, x.device, x.dtype).flip(0)).view(K, H, D).transpose(0, 1)  # [H, K, D]
        scale = 1 / math.sqrt(D)  # on the [B, H, T, D] queries, not the [B, H, T, K] scores
        by_dist = ((q + self.v[:, None, :]) * scale) @ r.transpose(-1, -2)  # [B, H, T, K]: column c = distance K-1-c
        # Query i sits at position M + i, so key j needs column K - 1 - (M + i - j) = j + (T - 1 - i):
        # row i shifted left by T - 1 - i. With one pad column per row, laid out flat, that entry is at
        # i * K + j + T - 1, so one slice and a view do the shift (views: the backward is a copy, not
        # the scatter a gather would need). Entries with j > M + i read the pad or the next row: they
        # are the causal mask's, set to -inf below.
        position = F.pad(by_dist, (0, 1)).flatten(-2)[..., T - 1:T - 1 + T * K].view(B, H, T, K)
        future = torch.ones(T, K, dtype=torch.bool, device=x.device).triu(M + 1)  # key after the query
        scores = ((q + self.u[:, None, :]) * scale) @ k.transpose(-1, -2)  # [B, H, T, K]
        scores = scores.add_(position).masked_fill_(future, float("-inf"))
        docs = None
        if starts is not None or valid is not None:
            # memory slots: document 0 where valid, -1 (no query's) elsewhere; this call's tokens:
            # the number of starts up to them
            past = torch.zeros(B, M, dtype=torch.long, device=x.device) if valid is None else valid.long() - 1
            now = torch.zeros(B, T, dtype=torch.long, device=x.device) if starts is None else starts.long().cumsum(-1)
            docs = torch.cat((past, now), dim=-1)  # [B, K]
            scores = scores.masked_fill((docs[:, None, :] != now[:, :, None])[:, None], float("-inf"))
        y = self.attn_dropout(scores.softmax(-1)) @ v  # [B, H, T, D]
        y = self.residual_proj(y.transpose(1, 2).reshape(B, T, E))
        if self.mem_len == 0:
            return y, None
        new_memory = h[:, -self.mem_len:].detach()
        if docs is None:
            return y, new_memory
        return y, (new_memory, (docs == docs[:, -1:])[:, -self.mem_len:])
