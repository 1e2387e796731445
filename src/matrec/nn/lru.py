"""The Linear Recurrent Unit (Orvieto et al., 2023): a diagonal complex linear recurrence.

    h_t = lambda * h_{t-1} + gamma * (B x_t)          h [B, N] complex, lambda, gamma [N]
    y_t = Re(C h_t) + D * x_t                          y [B, T, E]

``lambda = exp(-exp(nu_log) + i exp(theta_log))`` stays inside the unit disc whatever the
parameters, so the recurrence cannot blow up. At initialisation ``|lambda|`` is drawn uniformly on
the ring ``r_min <= |lambda| <= r_max`` and the phase in ``[0, max_phase]``; ``gamma =
sqrt(1 - |lambda|^2)`` keeps a unit's state at the scale of its input however close ``|lambda|`` is
to 1. A unit forgets a factor ``|lambda|`` per step, so ``r_max`` bounds the memory at
initialisation: after ``T`` steps the slowest unit keeps ``r_max^T`` of what it stored (0.999: 37 %
after 1,000 steps, 0.005 % after 10,000); training can move it.

All ``h_t`` come from one parallel scan (:func:`matrec.ops.diagonal_scan.diagonal_scan`), computed
in complex64 (complex128 for float64 inputs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int, check_real
from ..ops.diagonal_scan import diagonal_scan
from ..ops.precision import compute_dtype
from ..ops.backends import exporting
from .init import init_linear
from .protocol import NoExportForm, StateSpec, check_mask


class LRU(nn.Module):
    """The LRU recurrence ``x [B, T, E] -> y [B, T, E]`` with state ``h [B, N]`` (complex).

    Args:
        d_model: width ``E``.
        state_size: ``N``, complex state units (default ``E``).
        r_min, r_max: the ring ``|lambda|`` is drawn from (``0 <= r_min < r_max < 1``).
        max_phase: phases drawn from ``[0, max_phase]``.
    """

    def __init__(self, d_model: int, *, state_size: int | None = None, r_min: float = 0.9,
                 r_max: float = 0.999, max_phase: float = 2 * math.pi) -> None:
        super().__init__()
        check_int("d_model", d_model)
        N = check_int("state_size", state_size, allow_none=True) or d_model
        check_real("r_min", r_min, minimum=0, maximum=1, open_max=True)
        check_real("r_max", r_max, minimum=0, maximum=1, open_max=True)
        if not r_min < r_max:
            raise ValueError(f"r_min and r_max must satisfy 0 <= r_min < r_max < 1, got r_min={r_min!r}, "
                             f"r_max={r_max!r}")
        check_real("max_phase", max_phase, minimum=0, open_min=True)
        self.d_model, self.state_size = d_model, N
        self.r_min, self.r_max, self.max_phase = float(r_min), float(r_max), float(max_phase)
        self.nu_log = nn.Parameter(torch.empty(N))
        self.theta_log = nn.Parameter(torch.empty(N))
        self.gamma_log = nn.Parameter(torch.empty(N))
        self.B_re = nn.Parameter(torch.empty(N, d_model))
        self.B_im = nn.Parameter(torch.empty(N, d_model))
        self.C_re = nn.Parameter(torch.empty(d_model, N))
        self.C_im = nn.Parameter(torch.empty(d_model, N))
        self.D = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        N, E = self.state_size, self.d_model
        with torch.no_grad():
            # |lambda|^2 uniform on [r_min^2, r_max^2]: uniform over the ring's area
            u1, u2 = torch.rand(N, dtype=torch.float64), torch.rand(N, dtype=torch.float64)
            nu = -0.5 * torch.log(u1 * (self.r_max ** 2 - self.r_min ** 2) + self.r_min ** 2)
            self.nu_log.copy_(nu.log())
            self.theta_log.copy_((self.max_phase * u2).clamp_min(1e-12).log())
            self.gamma_log.copy_(0.5 * torch.log1p(-torch.exp(-2 * nu)))  # log sqrt(1 - |lambda|^2)
            for w in (self.B_re, self.B_im):
                nn.init.normal_(w, std=1 / math.sqrt(2 * E))
            for w in (self.C_re, self.C_im):
                nn.init.normal_(w, std=1 / math.sqrt(N))
            nn.init.normal_(self.D)

    def lambdas(self, dtype: torch.dtype = torch.complex64) -> Tensor:
        """``lambda [N]``, complex."""
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        return torch.polar(torch.exp(-self.nu_log.to(real).exp()), self.theta_log.to(real).exp())

    def inputs(self, x: Tensor) -> Tensor:
        """``gamma * (B x_t)``: ``x [B, T, E]`` (real, compute dtype) -> ``[B, T, N]`` complex."""
        Bc = torch.complex(self.B_re.to(x.dtype), self.B_im.to(x.dtype))  # [N, E]
        return self.gamma_log.to(x.dtype).exp() * (x.to(Bc.dtype) @ Bc.T)

    def readout(self, h: Tensor, x: Tensor) -> Tensor:
        """``Re(C h_t) + D x_t``: ``h [B, T, N]`` complex -> ``[B, T, E]`` real."""
        Cc = torch.complex(self.C_re.to(x.dtype), self.C_im.to(x.dtype))  # [E, N]
        return (h @ Cc.T).real + self.D.to(x.dtype) * x

    def forward(self, x: Tensor, state: Tensor | None = None, *, scan=diagonal_scan,
                mask: Tensor | None = None, starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A padded step (``mask [B, T]`` False) multiplies by 1 and adds 0: the state stays; a
        document start (``starts [B, T]``) multiplies the carried state by 0."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, {self.d_model}], got {tuple(x.shape)}")
        check_mask(mask, x)
        check_mask(starts, x, "starts")
        if exporting():
            raise NoExportForm("the LRU has no export form: its state is complex (ONNX and ExecuTorch have "
                               "no complex tensors) and diagonal_scan no export-safe backend")
        dtype = x.dtype
        xc = x.to(compute_dtype(dtype))
        # complex64 unless the input is float64; autocast must not touch the complex arithmetic
        with torch.autocast(device_type=x.device.type, enabled=False):
            cdtype = torch.complex128 if xc.dtype == torch.float64 else torch.complex64
            xc = xc.float() if cdtype == torch.complex64 else xc
            if state is not None and (not isinstance(state, Tensor) or not state.is_complex()
                                      or state.shape != (x.shape[0], self.state_size)):
                raise ValueError(f"state must be None or the complex LRU state [{x.shape[0]}, "
                                 f"{self.state_size}] this layer returned, got "
                                 f"{getattr(state, 'shape', type(state).__name__)}")
            lam, u = self.lambdas(cdtype), self.inputs(xc)  # [N], [B, T, N]
            if starts is not None:
                lam = torch.where(starts[..., None], torch.zeros_like(lam), lam)  # [B, T, N]
            if mask is not None:
                keep = mask[..., None]  # [B, T, 1]
                lam = torch.where(keep, lam, torch.ones_like(lam))  # [B, T, N]
                u = torch.where(keep, u, torch.zeros_like(u))
            h = scan(lam, u, None if state is None else state.to(cdtype))  # [B, T, N]
            y = self.readout(h, xc)
        return y.to(dtype), h[:, -1]


class LRUMixer(nn.Module):
    """The LRU as a :class:`~matrec.models.SequenceModel` mixer: ``W_o GELU(LRU(x))``, the LRU block
    of the paper with the GELU before the residual projection ``W_o`` (the MLP sublayer that follows in
    the pattern plays the paper's GLU). State: the LRU's ``h [B, N]``."""

    def __init__(self, d_model: int, *, n_heads: int | None = None, dropout: float = 0.0, **options) -> None:
        super().__init__()
        self.lru = LRU(d_model, **options)
        self.residual_proj = nn.Linear(d_model, d_model)

    def init_weights(self, std: float, residual_std: float) -> None:
        """The LRU keeps its own initialisation (the ring); the residual projection gets the residual init."""
        init_linear(self.residual_proj, residual_std)

    def state_spec(self) -> list[StateSpec]:
        """``h [B, N]``, complex64, zeros at the start."""
        return [StateSpec("h", ("B", self.lru.state_size), "zeros", torch.complex64)]

    def forward(self, x: Tensor, state: Tensor | None = None, *, mask: Tensor | None = None,
                starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, h = self.lru(x, state, mask=mask, starts=starts)
        return self.residual_proj(F.gelu(y)), h
