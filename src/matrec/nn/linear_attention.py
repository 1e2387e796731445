"""Causal linear attention ("Transformers are RNNs", Katharopoulos et al. 2020).

With the feature map ``phi(x) = elu(x) + 1`` (positive), causal attention becomes a recurrence::

    S_t = S_{t-1} + phi(k_t) v_t^T        # [D, D] per head
    z_t = z_{t-1} + phi(k_t)              # [D]
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

State: ``(S [B, H, D, D], z [B, H, D])``. Two forms compute the same thing: ``recurrent`` (the
definition, one step at a time: the generation path and the reference) and ``chunked`` (the
training path: quadratic attention inside chunks of ``chunk_size``, the recurrence across chunk
totals; memory ``O(T * chunk_size)``, not ``O(T^2)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from ..models.mixers import MIXERS, init_linear

LINEAR_ATTENTION_FORMS: Registry = Registry("linear attention form", argument="form")


@LINEAR_ATTENTION_FORMS.register("recurrent")
def recurrent_form(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float,
                   chunk_size: int = 0):
    """The definition, step by step. ``q, k`` are features ``[B, H, T, D]``; returns ``(y, S, z)``."""
    ys = []
    for t in range(q.shape[-2]):
        S = S + k[..., t, :, None] * v[..., t, None, :]  # [B, H, D, D]
        z = z + k[..., t, :]
        num = (q[..., t, :, None] * S).sum(-2)  # [B, H, D]
        den = (q[..., t, :] * z).sum(-1, keepdim=True)  # [B, H, 1]
        ys.append(num / (den + eps))
    return torch.stack(ys, dim=-2), S, z


@LINEAR_ATTENTION_FORMS.register("chunked")
def chunked_form(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float,
                 chunk_size: int = 64):
    """Chunk-parallel form, equal to :func:`recurrent_form`."""
    B, H, T, D = q.shape
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # zero features contribute nothing to S or z
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    N = (T + pad) // C
    qc, kc, vc = (t.view(B, H, N, C, -1) for t in (q, k, v))  # [B, H, N, C, D]
    kv = kc.transpose(-1, -2) @ vc  # [B, H, N, D, D]: each chunk's total
    ks = kc.sum(-2)  # [B, H, N, D]
    # state entering each chunk: initial state plus the totals of all earlier chunks
    S_in = S[:, :, None] + kv.cumsum(2) - kv  # [B, H, N, D, D]
    z_in = z[:, :, None] + ks.cumsum(2) - ks  # [B, H, N, D]
    A = (qc @ kc.transpose(-1, -2)).tril()  # [B, H, N, C, C]: causal within the chunk
    num = qc @ S_in + A @ vc  # [B, H, N, C, D]
    den = (qc * z_in[..., None, :]).sum(-1) + A.sum(-1)  # [B, H, N, C]
    y = (num / (den[..., None] + eps)).reshape(B, H, N * C, -1)[..., :T, :]
    return y, S_in[:, :, -1] + kv[:, :, -1], z_in[:, :, -1] + ks[:, :, -1]


@MIXERS.register("linear_attn")
class LinearAttention(nn.Module):
    """Multi-head causal linear attention with elu+1 features.

    Args:
        form: "auto" (chunked for T > 1, recurrent for single-token steps), "chunked", "recurrent".
        chunk_size: chunk length of the chunked form.
        eps: added to the normaliser.
    """

    def __init__(self, d_model: int, *, n_heads: int = 1, dropout: float = 0.0, form: str = "auto",
                 chunk_size: int = 64, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model, got d_model={d_model}, n_heads={n_heads}")
        if form != "auto":
            LINEAR_ATTENTION_FORMS.get(form)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.form, self.chunk_size, self.eps = form, chunk_size, eps
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.residual_proj = nn.Linear(d_model, d_model, bias=bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.qkv, std)
        init_linear(self.residual_proj, residual_std)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
        B, T, E = x.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(E, dim=-1))  # [B, H, T, D] each
        # running sums over the whole sequence: kept in at least fp32 under bf16/fp16 autocast
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if state is None:
            S = q.new_zeros(B, self.n_heads, self.head_dim, self.head_dim)
            z = q.new_zeros(B, self.n_heads, self.head_dim)
        else:
            S, z = (t.to(dtype) for t in state)
        form = self.form if self.form != "auto" else ("recurrent" if T == 1 else "chunked")
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k = F.elu(q) + 1, F.elu(k) + 1
            y, S, z = LINEAR_ATTENTION_FORMS.get(form)(q, k, v, S, z, self.eps, self.chunk_size)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, E)
        return self.residual_proj(y), (S, z)
