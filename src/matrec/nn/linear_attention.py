"""Causal linear attention ("Transformers are RNNs", Katharopoulos et al. 2020).

With the feature map ``phi(x) = elu(x) + 1`` (positive), causal attention becomes a recurrence::

    S_t = S_{t-1} + phi(k_t) v_t^T        # [D, D] per head
    z_t = z_{t-1} + phi(k_t)              # [D]
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

State: ``(S [B, H, D, D], z [B, H, D])``. A padded step (mask False) has its key features zeroed, so it
adds nothing to ``S`` or ``z``. The two forms that compute it (``recurrent``, the
definition; ``chunked``, the training path) are ops: :mod:`matrec.ops.linear_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_divides, check_int
from ..ops.linear_attention import LINEAR_ATTENTION_FORMS
from ..ops.precision import compute_dtype
from .init import init_linear
from .protocol import StateSpec, check_mask


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
        check_int("d_model", d_model)
        check_int("n_heads", n_heads)
        check_divides("n_heads", n_heads, "d_model", d_model)
        LINEAR_ATTENTION_FORMS.check(form)
        check_int("chunk_size", chunk_size)
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.form, self.chunk_size, self.eps = form, chunk_size, eps
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.residual_proj = nn.Linear(d_model, d_model, bias=bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.qkv, std)
        init_linear(self.residual_proj, residual_std)

    def state_spec(self) -> list[StateSpec]:
        """The mixer protocol's state: ``S [B, H, D, D]`` and ``z [B, H, D]``, zeros at the start."""
        H, D = self.n_heads, self.head_dim
        return [StateSpec("S", ("B", H, D, D)), StateSpec("z", ("B", H, D))]

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, *, mask: Tensor | None = None,
                starts: Tensor | None = None):
        """``starts [B, T]`` (bool): packed documents, each starting from a zero state (every form)."""
        check_mask(mask, x)
        check_mask(starts, x, "starts")
        B, T, E = x.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(E, dim=-1))  # [B, H, T, D] each
        # running sums over the whole sequence: kept in at least fp32 under bf16/fp16 autocast
        dtype = compute_dtype(q.dtype)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if state is None:
            S = q.new_zeros(B, self.n_heads, self.head_dim, self.head_dim)
            z = q.new_zeros(B, self.n_heads, self.head_dim)
        else:
            S, z = (t.to(dtype) for t in state)
        _, form = LINEAR_ATTENTION_FORMS.resolve(self.form, x.device, T=T)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k = F.elu(q) + 1, F.elu(k) + 1
            if mask is not None:
                k = k * mask[:, None, :, None].to(k.dtype)  # [B, H, T, D]
            y, S, z = (form(q, k, v, S, z, self.eps, self.chunk_size) if starts is None
                       else form(q, k, v, S, z, self.eps, self.chunk_size, starts=starts))
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, E)
        return self.residual_proj(y), (S, z)
