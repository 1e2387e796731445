"""Causal softmax self-attention with a KV cache, and MRU-rotary attention (docs/design.md §4).

State (cache) of ``attn``: ``(k, v, position)``: keys and values ``[B, H, S, head_dim]`` of the
``S`` most recent tokens (all of them, or the last ``window``), keys already position-encoded, and
``position``, a 0-dim int64 tensor, the absolute position of the next token. MRU-rotary adds the
running product of rotations: ``(k, v, position, P)`` with ``P [B, H, C, d, d]``.

With a padding ``mask`` (the mixer protocol, :mod:`matrec.nn.protocol`) rows are padded differently,
so one position no longer fits all: the cache is then ``(k, v, valid)``, ``valid [B, S]`` marking the
slots that hold tokens, and a token's position is the number of valid slots before it. A call with
such a cache takes the masked path too (an ``(k, v, position)`` cache is accepted there, every slot
valid). Sliding-window attention with packed documents (``starts``, no mask) keeps absolute
positions (every encoding here scores relative ones) and trims its cache to the window: its cache is
``(k, v, position, valid)``, ``valid [B, S]`` marking each row's slots of its last document.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_divides, check_int
from ..ops.attention import causal_attention, causal_mask, padded_causal_attention
from ..ops.mru_scan import mru_scan
from ..ops.orthogonal import ORTHOGONAL_MAPS, lower_numel, lower_to_square, orthogonal_from
from ..ops.precision import compute_dtype
from .init import init_linear
from .positional import POSITIONS
from .protocol import NoExportForm, StateSpec, check_mask


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (GPT-2 style) with RoPE / xPos / no positions and a KV cache.

    Args:
        d_model: width ``E``; ``n_heads`` must divide it.
        pos: positional encoding, one of ``POSITIONS`` ("rope", "xpos", "none").
        pos_options: keyword options of the encoding (``base``, ``scale_base``).
        window: if set, each token attends to itself and the ``window - 1`` tokens before it
            (sliding-window attention); the cache then stays at ``window`` tokens, which bounds
            memory when the state is carried across the batches of a long stream.
        dropout: attention-probability dropout (training only).
    """

    def __init__(self, d_model: int, *, n_heads: int = 1, dropout: float = 0.0, pos: str = "rope",
                 pos_options: dict | None = None, window: int | None = None, bias: bool = False) -> None:
        super().__init__()
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        check_divides("n_heads", n_heads, "d_model", d_model)
        check_int("window", window, allow_none=True)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout, self.window = dropout, window
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.residual_proj = nn.Linear(d_model, d_model, bias=bias)
        position_cls = POSITIONS.get(pos)
        try:
            self.position = position_cls(self.head_dim, **(pos_options or {}))
        except ValueError as e:  # the head size is derived: name what the caller passed
            raise ValueError(f"pos={pos!r} with d_model={d_model}, n_heads={n_heads} (head size "
                             f"{self.head_dim}): {e}") from e

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.qkv, std)
        init_linear(self.residual_proj, residual_std)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def encode_positions(self, x: Tensor, q: Tensor, k: Tensor, offset: int, extra: tuple):
        """Position-encode ``q, k [B, H, T, D]``; returns ``(q, k, extra_state)``."""
        q, k = self.position(q, k, offset)
        return q, k, ()

    def state_spec(self) -> list[StateSpec]:
        """The mixer protocol's state (the masked layout): ``k, v [B, H, P, D]`` and ``valid [B, P]``
        over ``P`` cache slots, each call appending its ``T`` tokens."""
        H, D = self.n_heads, self.head_dim
        return [StateSpec("k", ("B", H, "P", D)), StateSpec("v", ("B", H, "P", D)),
                StateSpec("valid", ("B", "P"), "false", torch.bool)]

    def as_masked_state(self, state: tuple) -> tuple:
        """``(k, v, position)`` -> ``(k, v, valid)`` with every slot valid."""
        k, v, third = state[:3]
        if third.dim() == 0:
            third = torch.ones(k.shape[0], k.shape[-2], dtype=torch.bool, device=k.device)
        return (k, v, third)

    def forward(self, x: Tensor, state: tuple | None = None, *, mask: Tensor | None = None,
                starts: Tensor | None = None) -> tuple[Tensor, tuple]:
        check_mask(mask, x)
        check_mask(starts, x, "starts")
        B, T, E = x.shape
        q, k, v = (self._heads(t) for t in self.qkv(x).split(E, dim=-1))  # [B, H, T, D] each
        plain = type(self).encode_positions is CausalSelfAttention.encode_positions  # no positions' state
        if self.window is not None and mask is None and plain and (starts is not None or (
                state is not None and len(state) == 4)):
            return self._forward_packed_window(x, q, k, v, state, starts)
        if mask is not None or starts is not None or (state is not None and state[2].dim() > 0):
            return self._forward_masked(x, q, k, v, state, mask, starts)
        past_k = past_v = None
        offset, extra = 0, ()
        if state is not None:
            past_k, past_v, position, *extra = state
            offset = int(position)
        q, k, extra = self.encode_positions(x, q, k, offset, tuple(extra))
        if past_k is not None:
            k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
        y = causal_attention(q, k, v, offset, self.window,
                             self.dropout if self.training else 0.0)  # [B, H, T, D]
        y = self.residual_proj(y.transpose(1, 2).reshape(B, T, E))
        if self.window is not None:  # older keys can never be seen again
            k, v = k[..., -self.window:, :], v[..., -self.window:, :]
        position = torch.tensor(offset + T, device=x.device)
        return y, (k, v, position, *extra)

    def _forward_packed_window(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, state,
                               starts: Tensor | None):
        """Sliding-window attention over packed documents (see the module docstring): the window's
        causal mask, and a query sees its own document only."""
        B, T, E = x.shape
        offset, past_valid = 0, x.new_ones(B, 0, dtype=torch.bool)
        if state is not None:
            past_k, past_v, position, *rest = state
            offset = int(position)
            past_valid = rest[0] if rest else x.new_ones(B, past_k.shape[-2], dtype=torch.bool)
        q, k = self.position(q, k, offset)
        if state is not None:
            k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)  # [B, H, S, D]
        now = x.new_zeros(B, T, dtype=torch.long) if starts is None else starts.long().cumsum(-1)
        docs = torch.cat((past_valid.long() - 1, now), dim=-1)  # [B, S]: -1 for slots of no query's
        see = causal_mask(T, k.shape[-2], offset, self.window, x.device) & (docs[:, None, :] == now[:, :, None])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=see[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, D]
        valid = (docs == docs[:, -1:])[:, -self.window:]
        position = torch.tensor(offset + T, device=x.device)
        return (self.residual_proj(y.transpose(1, 2).reshape(B, T, E)),
                (k[..., -self.window:, :], v[..., -self.window:, :], position, valid))

    def _forward_masked(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, state, mask: Tensor | None,
                        starts: Tensor | None = None):
        """The forward over an ``(k, v, valid)`` cache (see the module docstring). With packed
        documents (``starts``) a query sees its own document only and positions restart at each."""
        if self.window is not None:
            raise NoExportForm(f"sliding-window attention (window={self.window}) takes no mask: its cache "
                               f"is trimmed by position, which padding makes per-row")
        if type(self).encode_positions is not CausalSelfAttention.encode_positions:
            raise NoExportForm(f"{type(self).__name__} takes no mask: its positions carry their own state")
        B, T, E = x.shape
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if state is None:
            past_k, past_v = k[..., :0, :], v[..., :0, :]
            past_valid = mask[:, :0]
        else:
            past_k, past_v, past_valid = self.as_masked_state(state)
        m = mask.long()
        count = m.cumsum(-1)  # [B, T]: valid tokens of this call up to each
        past = past_valid.sum(-1, keepdim=True)  # [B, 1]
        docs = None
        if starts is None:
            positions = past + count - 1  # [B, T]
        else:  # count from the latest document start (the carried cache for the first document)
            positions = count - torch.where(starts, count - m, -past).cummax(-1).values - 1
            docs = torch.cat((past_valid.long() * 0, starts.long().cumsum(-1)), dim=-1)  # [B, S + T]
        q, k = self.position(q, k, positions)
        k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)  # [B, H, S + T, D]
        valid = torch.cat((past_valid, mask), dim=-1)  # [B, S + T]
        y = padded_causal_attention(q, k, v, valid, self.dropout if self.training else 0.0, docs)  # [B, H, T, D]
        if docs is not None:  # a next call continues the last document only
            valid = valid & (docs == docs[:, -1:])
        return self.residual_proj(y.transpose(1, 2).reshape(B, T, E)), (k, v, valid)


def rotate_chunks(x: Tensor, P: Tensor) -> Tensor:
    """Apply ``P [B, H, C, T, d, d]`` to the ``C`` chunks of size ``d`` of ``x [B, H, T, C*d]``.

    Each chunk ``u`` (a column vector) becomes ``P u``.
    """
    B, H, T, D = x.shape
    C, d = P.shape[2], P.shape[-1]
    u = x.view(B, H, T, C, d).transpose(2, 3)  # [B, H, C, T, d]
    out = (P @ u.unsqueeze(-1)).squeeze(-1)  # [B, H, C, T, d]
    return out.transpose(2, 3).reshape(B, H, T, D)


class MRURotaryAttention(CausalSelfAttention):
    """Causal attention whose q and k are rotated chunk-wise by MRU running products (docs/design.md §4).

    Every token emits, per head and per chunk ``c`` of ``d = chunk_size`` dimensions, an orthogonal
    ``M_t = orthogonal_map(W x_t + b)``; the running product ``P_t = P_{t-1} M_t`` (an MRU scan) rotates
    the chunk: ``q_c -> P_t q_c``, ``k_c -> P_t k_c``. For orthogonal ``P``,
    ``(P_i q)^T (P_j k) = q^T (M_{j+1} ... M_i)^T k``: like RoPE the score depends on what lies
    between the two tokens, but through data-dependent, non-commuting d-dimensional rotations.
    Norms of q and k are unchanged. No other positional encoding is used.

    The bias ``b`` starts random with a scale falling geometrically over chunks (``10^(-4c/C)``), so
    at initialisation the model is a RoPE-like multi-scale rotation even before ``W`` learns.

    Args:
        chunk_size: ``d``, must divide the head size.
        orthogonal_map: one of ``matrec.ORTHOGONAL_MAPS`` ("cayley", "expm", "householder"), the
            argument's name in MORNN too (``construction``, its old name here, still works, with a
            DeprecationWarning).
        backend: the ``matrec.mru_scan`` backend.
        window: sliding-window attention, as in :class:`CausalSelfAttention`.
    """

    def __init__(self, d_model: int, *, n_heads: int = 1, dropout: float = 0.0, chunk_size: int = 8,
                 orthogonal_map: str = "cayley", backend: str = "auto", window: int | None = None,
                 bias: bool = False, construction: str | None = None) -> None:
        super().__init__(d_model, n_heads=n_heads, dropout=dropout, pos="none", window=window, bias=bias)
        check_int("chunk_size", chunk_size)
        if self.head_dim % chunk_size:
            raise ValueError(
                f"chunk_size must divide the head size {self.head_dim}, got chunk_size={chunk_size}")
        if construction is not None:
            warnings.warn("MRURotaryAttention(construction=...) is now orthogonal_map=...", DeprecationWarning,
                          stacklevel=2)
            orthogonal_map = construction
        ORTHOGONAL_MAPS.get(orthogonal_map)  # fail early with the list of valid names
        self.orthogonal_map, self.backend, self.chunk_size = orthogonal_map, backend, chunk_size
        self.n_chunks = self.head_dim // chunk_size
        self.rotation = nn.Linear(d_model, n_heads * self.n_chunks * lower_numel(chunk_size))

    def init_weights(self, std: float, residual_std: float) -> None:
        super().init_weights(std, residual_std)
        nn.init.normal_(self.rotation.weight, std=std)
        scale = 10.0 ** (-4.0 * torch.arange(self.n_chunks, dtype=torch.float32) / self.n_chunks)
        bias = torch.randn(self.n_heads, self.n_chunks, lower_numel(self.chunk_size)) * scale[:, None]
        with torch.no_grad():
            self.rotation.bias.copy_(bias.flatten())

    def state_spec(self) -> list[StateSpec]:
        """As :class:`CausalSelfAttention`'s, plus the running rotations ``R [B, H, C, d, d]``
        (this layer takes no mask yet: see ``_forward_masked``)."""
        d = self.chunk_size
        return super().state_spec() + [StateSpec("R", ("B", self.n_heads, self.n_chunks, d, d), "identity")]

    def rotations(self, x: Tensor) -> Tensor:
        """Per-token orthogonal ``M_t``: ``x [B, T, E]`` -> ``[B, H, C, T, d, d]`` (float32 or wider)."""
        B, T, _ = x.shape
        a = self.rotation(x).view(B, T, self.n_heads, self.n_chunks, -1).permute(0, 2, 3, 1, 4)
        a = a.to(compute_dtype(a.dtype))  # [B, H, C, T, d(d-1)/2]
        # the maps (solve, matrix_exp) and the running product stay in fp32 under autocast (docs/design.md §2.3)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return orthogonal_from(lower_to_square(a, self.chunk_size), self.orthogonal_map)

    def encode_positions(self, x, q, k, offset, extra):
        M = self.rotations(x)  # [B, H, C, T, d, d], at least fp32
        P0 = extra[0].to(M.dtype) if extra else None  # [B, H, C, d, d]
        with torch.autocast(device_type=x.device.type, enabled=False):
            P = mru_scan(M, P0, backend=self.backend)  # [B, H, C, T, d, d]
        q = rotate_chunks(q, P.to(q.dtype))
        k = rotate_chunks(k, P.to(k.dtype))
        return q, k, (P[..., -1, :, :],)
