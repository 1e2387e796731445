"""The Matrix Recurrent Unit layer (docs/design.md §1): a causal sequence mixer, linear in T."""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ..checks import check_int, check_number, check_real
from ..ops.backends import exporting
from ..ops.mru_scan import SCAN_BACKENDS, direction_scan, mru_scan
from ..ops.precision import compute_dtype
from ..ops.state_matrix import (STATE_MATRICES, STATE_NORMALIZATIONS, StateMatrix, normalize_states,
                                state_matrix, state_matrix_numel)
from .init import init_linear
from .protocol import StateSpec, check_mask


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: T above which an MRU without ``normalize`` warns (once per layer) for a construction whose running
#: product may grow: trained shearing constructions grew 0.012-0.017 decades per token and left
#: float32's range after roughly 2,000-3,500 tokens (docs/results.md, "Stability").
LONG_SEQUENCE_WARNING = 2048

# keys of checkpoints saved before the output projection took every layer's name (residual_proj)
_OLD_KEYS = {"out_proj.weight": "residual_proj.weight", "out_proj.bias": "residual_proj.bias"}


def _rename_old_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                     error_msgs) -> None:
    for old, new in _OLD_KEYS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def default_order(embed_dim: int, num_heads: int) -> int:
    """Default matrix order ``d``: the largest divisor of ``E / h`` that is at most ``sqrt(E / h)``.

    So ``state_size = h d^2 <= E``, equal to ``E`` when ``E / h`` is a perfect square (e.g. E = 384,
    h = 6 gives d = 8, the configuration of docs/design.md §1), and the read-out width ``E / (h d)`` is an integer.
    """
    per_head = embed_dim // num_heads
    d = math.isqrt(per_head)
    while per_head % d:
        d -= 1
    return d


def _check_order(d: int, embed_dim: int, num_heads: int, state_size: int | None, state_matrix: str,
                 construction: StateMatrix, normalize: str | None) -> None:
    """A ValueError when the heads' matrices are too small to depend on the input: a 1 x 1 matrix
    with |det| = 1, orthogonal, or spectrally normalised is +-1 whatever the token (no gradient
    reaches ``W_in``), and an MRU built from it passes nothing learnable along the sequence."""
    floor = max(construction.min_order, 2 if normalize is not None else 1)
    if d >= floor:
        return
    why = (f"state_matrix={state_matrix!r}" if normalize is None else f"normalize={normalize!r}")
    if state_size is None:
        given = (f"embed_dim={embed_dim}, num_heads={num_heads} give order d={d} (the largest divisor "
                 f"of E/h = {embed_dim // num_heads} that is at most its square root)")
    else:
        given = f"state_size={state_size}, num_heads={num_heads} give order d={d}"
    fits = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0 and default_order(embed_dim, h) >= floor]
    hint = ("; at this width " + ", ".join(f"num_heads={h} gives d={default_order(embed_dim, h)}" for h in fits)
            if fits else "")
    raise ValueError(
        f"{given}, but {why} needs d >= {floor}: its 1 x 1 matrices are +-1 whatever the token, so the "
        f"MRU would carry nothing learnable from one token to the next. Choose embed_dim and num_heads "
        f"so that E/h has a divisor d >= {floor} with d * d <= E/h, or pass state_size{hint}")


class MRU(nn.Module):
    """Matrix Recurrent Unit: per head, ``H_t = H_{t-1} @ M_t`` with ``M_t`` built from ``x_t``.

    ``W_in: E -> h * n`` gives each head's raw elements (``n = state_matrix_numel(state_matrix, d)``),
    a construction of :data:`matrec.ops.state_matrix.STATE_MATRICES` turns them into ``M_t [d, d]``,
    :func:`matrec.mru_scan` forms all ``H_t``, the read-out ``H_t @ W_down[head]`` (``d x E/(h d)``)
    is flattened back to ``E`` and an output projection ``E -> E`` (``residual_proj``) follows.
    ``W_in`` starts at zero, so every ``M_t`` starts as the identity. The scan runs in float32 for
    bf16/fp16 activations (also under autocast).

    Args:
        embed_dim: ``E``, input and output width.
        num_heads: ``h``; must divide ``E``.
        state_size: ``S = h d^2`` (``S / h`` a perfect square, ``h d`` dividing ``E``); default
            ``h * default_order(E, h)^2`` (see :func:`default_order`).
        state_matrix: construction name (default ``"ldu"``: det 1, can shear).
        dropout: dropout on the output.
        backend: :func:`matrec.mru_scan` backend.
        element_scale: factor on ``W_in``'s output before the construction; default
            ``1 / E``. Why: ``W_in`` starts at zero and Adam's first steps move all of its
            entries by about the learning rate *with the same sign*, so without the factor every
            ``M_t`` receives a shear of order ``lr * E`` at once and the product of a few hundred of
            them overflows (docs/models.md, "State growth", measured with
            ``benchmarks/mru_stability.py``; regression test in tests/nn/test_mru.py).
        normalize: ``None`` (default) or a name in
            :data:`matrec.ops.state_matrix.STATE_NORMALIZATIONS`: ``"spectral"`` divides every
            ``M_t`` by its largest singular value, so the running product has spectral norm <= 1
            at any length (docs/mru.md, "A running product that stays finite"); ``"direction"``
            does the same and reads out every ``H_t`` rescaled to ``||H_t||_F = sqrt(d)``, so a state
            carried over a long stream neither overflows nor fades to zero (docs/mru.md, "Reading
            out the state's direction"). Without either, a
            construction that is not orthogonal warns once when ``T`` exceeds
            :data:`LONG_SEQUENCE_WARNING`.

    Shapes:
        ``forward(x [B, T, E], state [B, h, d, d] | None, *, mask [B, T] | None) -> (y [B, T, E],
        new_state [B, h, d, d])``; a padded step (mask False) multiplies by the identity, so it
        leaves the state as it was (the mixer protocol, :mod:`matrec.nn.protocol`).
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int = 1,
        state_size: int | None = None,
        state_matrix: str = "ldu",
        dropout: float = 0.0,
        backend: str = "auto",
        element_scale: float | None = None,
        normalize: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for arg, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            check_int(arg, value)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads must divide embed_dim={embed_dim}, got {num_heads}")
        if state_size is None:
            d = default_order(embed_dim, num_heads)
        else:
            check_int("state_size", state_size, allow_none=True)
            if state_size % num_heads:
                raise ValueError(
                    f"state_size must be divisible by num_heads={num_heads}, got {state_size}"
                )
            d = math.isqrt(state_size // num_heads)
            if d * d != state_size // num_heads:
                raise ValueError(
                    f"state_size / num_heads must be a perfect square (the head's d x d state), "
                    f"got {state_size} / {num_heads} = {state_size // num_heads}"
                )
        if embed_dim % (num_heads * d):
            raise ValueError(
                f"embed_dim must be divisible by num_heads * d = {num_heads * d} for the read-out, "
                f"got embed_dim={embed_dim} (state_size={num_heads * d * d})"
            )
        construction = STATE_MATRICES.get(state_matrix)  # unknown name -> ValueError naming state_matrix
        SCAN_BACKENDS.check(backend)
        if normalize is not None:
            STATE_NORMALIZATIONS.get(normalize)  # unknown name -> ValueError naming normalize
        _check_order(d, embed_dim, num_heads, state_size, state_matrix, construction, normalize)
        self.normalize = normalize
        self._warned_long = False
        if element_scale is None:
            element_scale = 1.0 / embed_dim
        self.element_scale = check_real("element_scale", element_scale, minimum=0, open_min=True, allow_none=True)
        if not 0.0 <= check_number("dropout", dropout) < 1.0:   # TypeError naming it for a non-number
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.order = embed_dim, num_heads, d
        self.state_size = num_heads * d * d
        self.state_matrix, self.backend = state_matrix, backend
        self.numel = state_matrix_numel(state_matrix, d)
        self.in_proj = nn.Linear(embed_dim, num_heads * self.numel, **factory)  # W_in
        self.down = nn.Parameter(torch.empty(num_heads, d, embed_dim // (num_heads * d), **factory))
        self.residual_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.in_proj.weight)  # every M_t = identity at step 0
        nn.init.zeros_(self.in_proj.bias)
        # H_t is near-orthogonal-scale at init, so W_down like a Linear with fan-in d
        nn.init.uniform_(self.down, -1 / math.sqrt(self.order), 1 / math.sqrt(self.order))
        self.residual_proj.reset_parameters()

    def init_weights(self, std: float, residual_std: float) -> None:
        """GPT-2 init inside a :class:`~matrec.models.SequenceModel` (:mod:`matrec.nn.init`): the MRU
        keeps its own initialisation (every ``M_t`` starts at the identity), except that
        ``residual_proj`` writes into the residual stream and gets N(0, residual_std)."""
        init_linear(self.residual_proj, residual_std)

    def extra_repr(self) -> str:
        return (
            f"{self.embed_dim}, num_heads={self.num_heads}, state_size={self.state_size} "
            f"(d={self.order}), state_matrix={self.state_matrix!r}, backend={self.backend!r}, "
            f"element_scale={self.element_scale:.4g}"
            + ("" if self.normalize is None else f", normalize={self.normalize!r}")
        )

    def state_spec(self) -> list[StateSpec]:
        """The mixer protocol's state: ``H [B, h, d, d]``, the identity at the start."""
        return [StateSpec("H", ("B", self.num_heads, self.order, self.order), "identity")]

    def forward(self, x: Tensor, state: Tensor | None = None, *, mask: Tensor | None = None,
                starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, E]``, ``state [B, h, d, d]`` or None (identity), ``mask [B, T]`` (bool) or None
        -> ``(y [B, T, E], H_T [B, h, d, d])``. ``starts [B, T]`` (bool): packed documents, each
        product restarting from the identity (a segmented scan; not on the Triton kernel).

        ``H_T`` (the state after the last step) is in the scan's dtype (float32 for bf16/fp16 input);
        pass it back as ``state`` to continue the sequence.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor [B, T, {self.embed_dim}], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape [B, T, {self.embed_dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor [B, T, {self.embed_dim}] (embed token "
                             f"ids first), got {x.dtype}")
        # as nn.Linear: no silent cast (autocast casts the 16/32-bit floats on purpose)
        weight_dtype = self.in_proj.weight.dtype
        autocast = torch.is_autocast_enabled(x.device.type) and x.dtype in _AUTOCAST_DTYPES
        if x.dtype != weight_dtype and not autocast:
            raise ValueError(f"x must have the layer's dtype {weight_dtype} (convert the layer with "
                             f".to(dtype), or run under autocast), got {x.dtype}")
        B, T, E = x.shape
        if T < 1:
            raise ValueError(f"x must have sequence length T >= 1, got {tuple(x.shape)}")
        h, d = self.num_heads, self.order
        if state is not None and (not isinstance(state, Tensor) or state.shape != (B, h, d, d)):
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(f"state must be None or a tensor of shape {(B, h, d, d)}, got {got}")
        if state is not None and not state.is_floating_point():
            raise ValueError(f"state must be a floating-point tensor (an H_T this layer returned), "
                             f"got {state.dtype}")
        check_mask(mask, x)
        check_mask(starts, x, "starts")
        if (not exporting() and T > LONG_SEQUENCE_WARNING and self.normalize is None and not self._warned_long
                and not STATE_MATRICES.get(self.state_matrix).norm_preserving):
            self._warned_long = True
            warnings.warn(
                f"MRU with state_matrix={self.state_matrix!r} on T={T} > {LONG_SEQUENCE_WARNING} tokens "
                f"without normalize: its running product is not bounded, and trained models' products "
                f"left float32's range after about 2,000-3,500 tokens (docs/results.md, 'Stability'). "
                f"Pass normalize='spectral' (or use cayley, expm or householder) to keep it finite.",
                RuntimeWarning, stacklevel=2)
        raw = self.in_proj(x) * self.element_scale
        raw = raw.view(B, T, h, self.numel).transpose(1, 2)  # [B, h, T, n]
        compute = compute_dtype(raw.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            M = state_matrix(self.state_matrix, raw.to(compute), d)  # [B, h, T, d, d]
            if self.normalize is not None:
                M = normalize_states(self.normalize, M)  # every sigma_max(M_t) = 1
            if mask is not None:  # a padded step multiplies by the identity: the state stays
                eye = torch.eye(d, dtype=M.dtype, device=M.device)
                M = torch.where(mask[:, None, :, None, None], M, eye)
            h0 = None if state is None else state.to(compute)
            resets = None if starts is None else starts[:, None, :].expand(B, h, T)
            direction = self.normalize is not None and STATE_NORMALIZATIONS.get(self.normalize).direction
            scan = direction_scan if direction else mru_scan
            H = scan(M, h0, backend=self.backend, resets=resets)  # [B, h, T, d, d]
        # read-out per head: [B, h, T, d, d] @ [h, 1, d, E/(h d)] -> [B, h, T, d, E/(h d)]
        # (in the parameters' dtype; under autocast the matmul itself drops to bf16/fp16 as usual)
        y = H.to(self.down.dtype) @ self.down.unsqueeze(1)
        y = y.flatten(-2).transpose(1, 2).reshape(B, T, E)  # [B, T, E]
        y = self.dropout(self.residual_proj(y))
        return y, H[:, :, -1]
