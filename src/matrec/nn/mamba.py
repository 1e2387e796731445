"""Mamba (Gu & Dao, 2023) as a mixer, from the ``mambapy`` package (pure PyTorch; the ``mamba`` extra).

``mambapy``'s :class:`MambaBlock` holds the parameters and their initialisation and computes a
whole sequence from a zero state; it has no entry for a chunk that continues a sequence. The
mixer convention (docs/architecture.md) needs one, so :class:`MambaMixer` runs the block's own
modules and ``mambapy``'s parallel scan with a carried state ``(h, conv_inputs)``: the selective
state ``h [B, 2E, d_state]`` enters as the first step's input (``h_0 = dA_0 h + dB_0 x_0``) and
the last ``d_conv - 1`` inner inputs feed the causal convolution of the next chunk. With no state
it equals the block's own ``forward`` (tests/nn/test_mamba.py checks both, and chunks against one
call), except that a float64 mixer computes in float64 (``mambapy`` rounds ``A`` and ``D`` to
float32). ``mambapy`` is imported when a mixer is built, never by ``import matrec``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int
from ..ops.precision import compute_dtype
from .init import init_linear
from .protocol import NoExportForm, StateSpec, check_mask

EXTRA = "mamba"


def _mambapy():
    try:
        from mambapy import mamba
        from mambapy.pscan import pscan
    except ImportError as e:
        raise ImportError(f"the mamba mixer needs the mambapy package: pip install 'matrec[{EXTRA}]' "
                          f"({e})") from None
    return mamba, pscan


class MambaMixer(nn.Module):
    """One Mamba block (``mambapy.mamba.MambaBlock``): ``x [B, T, E] -> y [B, T, E]``.

    Args:
        d_model: width ``E``.
        d_state: selective state size per inner channel (16, Mamba's default).
        expand: inner width ``expand * E`` (2).
        d_conv: causal convolution width (4).
        **options: other ``mambapy.mamba.MambaConfig`` fields (``dt_rank``, ``dt_min`` ...).

    State: ``(h [B, expand*E, d_state], conv_inputs [B, expand*E, d_conv - 1])``.
    """

    def __init__(self, d_model: int, *, n_heads: int | None = None, dropout: float = 0.0, d_state: int = 16,
                 expand: int = 2, d_conv: int = 4, **options) -> None:
        super().__init__()
        for arg, value in (("d_model", d_model), ("d_state", d_state), ("expand", expand), ("d_conv", d_conv)):
            check_int(arg, value)
        mamba, _ = _mambapy()
        for bad in ("n_layers", "use_cuda", "pscan", "d_inner"):
            if bad in options:
                raise ValueError(f"{bad} is not an option of the mamba mixer (one block, mambapy's "
                                 f"parallel scan)")
        self.config = mamba.MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand,
                                        d_conv=d_conv, **options)
        self.block = mamba.MambaBlock(self.config)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Mamba keeps ``mambapy``'s initialisation (its dt and A ranges are the method); the output
        projection writes into the residual stream and gets the residual init."""
        init_linear(self.block.out_proj, residual_std)

    def state_spec(self) -> list[StateSpec]:
        """``h [B, expand*E, d_state]`` and ``conv_inputs [B, expand*E, d_conv - 1]``, zeros at the start."""
        cfg = self.config
        return [StateSpec("h", ("B", cfg.d_inner, cfg.d_state)),
                StateSpec("conv_inputs", ("B", cfg.d_inner, cfg.d_conv - 1))]

    def forward(self, x: Tensor, state: tuple | None = None, *, mask: Tensor | None = None) -> tuple[Tensor, tuple]:
        check_mask(mask, x)
        if mask is not None:
            raise NoExportForm("MambaMixer takes no mask: its causal convolution reads the last d_conv - 1 "
                               "inputs by count, padded or not (and mambapy's scan does not export)")
        _, pscan = _mambapy()
        blk, cfg = self.block, self.config
        B, T, _ = x.shape
        K = cfg.d_conv - 1
        xi, z = blk.in_proj(x).chunk(2, dim=-1)  # [B, T, ED] each
        xi = xi.transpose(1, 2)  # [B, ED, T]
        if state is None:
            h0, past = None, xi.new_zeros(B, cfg.d_inner, K)
        else:
            h0, past = state
        seq = torch.cat((past.to(xi.dtype), xi), dim=2)  # [B, ED, K + T]
        # conv1d pads K on both sides: output k covers seq[k - K .. k]; the T new steps are k = K .. K+T-1
        u = F.silu(blk.conv1d(seq)[:, :, K:K + T].transpose(1, 2))  # [B, T, ED]

        # mambapy casts A and D to float32; at least float32 here, so a float64 mixer stays float64
        real = compute_dtype(blk.A_log.dtype)
        A = -torch.exp(blk.A_log.to(real))  # [ED, N]
        dt, Bs, Cs = torch.split(blk.x_proj(u), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt, Bs, Cs = blk._apply_layernorms(dt, Bs, Cs)
        delta = F.softplus(blk.dt_proj(dt))  # [B, T, ED]
        dA = torch.exp(delta.unsqueeze(-1) * A)  # [B, T, ED, N]
        BX = delta.unsqueeze(-1) * Bs.unsqueeze(2) * u.unsqueeze(-1)  # [B, T, ED, N]
        if h0 is not None:  # fold the carried state into the first step
            BX = torch.cat(((BX[:, 0] + dA[:, 0] * h0.to(BX.dtype)).unsqueeze(1), BX[:, 1:]), dim=1)
        hs = pscan(dA, BX)  # [B, T, ED, N]
        y = (hs @ Cs.unsqueeze(-1)).squeeze(-1) + blk.D.to(real) * u  # [B, T, ED]
        out = blk.out_proj(y * F.silu(z))
        return out, (hs[:, -1], seq[:, :, -K:] if K else seq[:, :, :0])
