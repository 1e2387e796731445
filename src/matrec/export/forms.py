"""Export-only forms of matrec's models: the same weights, plain-tensor state, a dynamic length.

:func:`exportable` wraps a :class:`~matrec.models.SequenceModel` or
:class:`~matrec.models.RecurrentModel` (eval mode) in an :class:`ExportForm`::

    out, *new_state = form(x, mask, *state)

- ``x``: token ids ``[B, T]`` (int64) or features ``[B, T, F]`` (float32);
- ``mask [B, T]`` (bool): False marks padding; a padded step leaves every state unchanged (its
  output is computed but meaningless);
- ``state``: the flat list of tensors :meth:`ExportForm.initial_state` starts with, named by
  :attr:`ExportForm.state_names`; ``new_state`` has the same layout, to pass back for the next call.

The recurrences run through the ``scan_form`` of their op (PyTorch's ``scan`` higher-order op), so
``torch.export`` keeps ``T`` dynamic; ``mode="step"`` fixes ``T = 1`` and unrolls it (a smaller
graph for token-by-token decoding). The MORNN's orthogonal matrix is materialised once, at wrap
time, as a constant. Softmax attention keeps a growing KV cache ``k, v [B, h, P, D]`` with a
validity mask ``[B, P]`` (its first slot a placeholder, so ``P >= 1``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.mixers import RNNMixer
from ..models.recurrent import RecurrentModel
from ..models.sequence import SequenceModel
from ..nn.attention import CausalSelfAttention
from ..nn.linear_attention import LinearAttention
from ..nn.mlp import MLP
from ..nn.mornn import MORNN
from ..nn.mru import MRU
from ..nn.positional import NoPosition, Rotary, XPos
from ..ops.linear_attention.scan_form import linear_attention_scan
from ..ops.mru_scan.scan_form import mru_scan_form
from ..ops.rnn_recurrence.scan_form import recurrence_scan
from ..ops.state_matrix_export import STATE_MATRIX_FORMS, state_matrix_form

MODES = ("sequence", "step")


class UnsupportedModelError(ValueError):
    """The model (or one of its layers) has no export form."""


def _unsupported(what: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"model cannot be exported: {what} {why}. Supported: SequenceModel with mixers mru "
        f"({', '.join(STATE_MATRIX_FORMS.names())}), mlp, "
        f"linear_attn, attn (rope or no positions, no window), rnn, mornn; RecurrentModel with "
        f"nn.RNN or MORNN (one direction)")


class _RNNForm(nn.Module):
    """nn.RNN or MORNN (batch_first, one direction). State ``h [L, B, H]``."""

    def __init__(self, rnn: nn.Module, unrolled: bool) -> None:
        super().__init__()
        if type(rnn) not in (nn.RNN, MORNN):
            raise _unsupported(f"recurrent layer {type(rnn).__name__}", "has no export form")
        if rnn.bidirectional:
            raise _unsupported("a bidirectional RNN", "cannot stream (it reads the future)")
        if not rnn.batch_first:
            raise _unsupported("an RNN", "must be batch_first")
        self.unrolled, self.num_layers, self.hidden_size = unrolled, rnn.num_layers, rnn.hidden_size
        self.nonlinearity = rnn.nonlinearity.lower()
        if isinstance(rnn, MORNN):
            weights, biases = rnn._weights(), rnn._modrelu_biases()
        else:
            weights, biases = rnn.all_weights, [None] * rnn.num_layers
        self.w_ih = nn.ParameterList()
        for k, ws in enumerate(weights):
            self.w_ih.append(ws[0])
            # the orthogonal matrix built once, here: the exported graph holds it as a constant
            self.register_buffer(f"w_hh_{k}", ws[1].detach().clone())
            self.register_buffer(f"b_{k}", (ws[2] + ws[3]).detach().clone() if len(ws) == 4 else None)
            self.register_buffer(f"phi_bias_{k}", None if biases[k] is None else biases[k].detach().clone())

    def state_shapes(self, B: int) -> list[tuple[str, tuple, str]]:
        return [("h", (self.num_layers, B, self.hidden_size), "zeros")]

    def forward(self, x: Tensor, mask: Tensor, h: Tensor) -> tuple[Tensor, list[Tensor]]:
        inp = x.transpose(0, 1)  # [T, B, I]
        h_n = []
        for k in range(self.num_layers):
            xp = F.linear(inp, self.w_ih[k], getattr(self, f"b_{k}"))  # [T, B, H]
            inp, h_k = recurrence_scan(xp, getattr(self, f"w_hh_{k}"), h[k], getattr(self, f"phi_bias_{k}"),
                                       self.nonlinearity, mask.t(), unrolled=self.unrolled)
            h_n.append(h_k)
        return inp.transpose(0, 1), [torch.stack(h_n)]


class _MRUForm(nn.Module):
    """:class:`matrec.MRU` with the scan as :func:`mru_scan_form`. State ``H [B, h, d, d]`` (identity at start)."""

    def __init__(self, mru: MRU, unrolled: bool) -> None:
        super().__init__()
        # a construction registered from user code has a form only if it registers one too
        if mru.state_matrix not in STATE_MATRIX_FORMS:
            raise _unsupported(f"an MRU with state_matrix={mru.state_matrix!r}",
                               f"has no export form (register one in matrec.ops.state_matrix_export."
                               f"STATE_MATRIX_FORMS; exportable: {STATE_MATRIX_FORMS.names()})")
        # sigma_max needs an eigen-solver; ONNX has no such operator
        if getattr(mru, "normalize", None) is not None:
            raise _unsupported(f"an MRU with normalize={mru.normalize!r}",
                               "has no export form (its per-token sigma_max needs an eigen-solver)")
        self.mru, self.unrolled = mru, unrolled

    def state_shapes(self, B: int):
        m = self.mru
        return [("H", (B, m.num_heads, m.order, m.order), "identity")]

    def forward(self, x: Tensor, mask: Tensor, H0: Tensor):
        m = self.mru
        B, T, E = x.shape
        raw = m.in_proj(x) * m.element_scale
        raw = raw.view(B, T, m.num_heads, m.numel).transpose(1, 2)  # [B, h, T, n]
        M = state_matrix_form(m.state_matrix, raw, m.order)  # [B, h, T, d, d]
        H, H_T = mru_scan_form(M, H0, mask, unrolled=self.unrolled)
        y = H @ m.down.unsqueeze(1)  # [B, h, T, d, E/(h d)]
        y = y.flatten(-2).transpose(1, 2).reshape(B, T, E)
        return m.residual_proj(y), [H_T]


class _LinearAttentionForm(nn.Module):
    """:class:`LinearAttention` through :func:`linear_attention_scan`. State ``S [B, h, D, D]``, ``z [B, h, D]``."""

    def __init__(self, la: LinearAttention, unrolled: bool) -> None:
        super().__init__()
        self.la, self.unrolled = la, unrolled

    def state_shapes(self, B: int):
        la = self.la
        return [("S", (B, la.n_heads, la.head_dim, la.head_dim), "zeros"),
                ("z", (B, la.n_heads, la.head_dim), "zeros")]

    def forward(self, x: Tensor, mask: Tensor, S: Tensor, z: Tensor):
        la = self.la
        B, T, E = x.shape
        q, k, v = (t.view(B, T, la.n_heads, la.head_dim).transpose(1, 2)
                   for t in la.qkv(x).split(E, dim=-1))  # [B, h, T, D] each
        q, k = F.elu(q) + 1, F.elu(k) + 1
        y, S, z = linear_attention_scan(q, k, v, S, z, la.eps, mask, unrolled=self.unrolled)
        return la.residual_proj(y.transpose(1, 2).reshape(B, T, E)), [S, z]


class _AttentionForm(nn.Module):
    """:class:`CausalSelfAttention` with its cache as plain tensors: ``k, v [B, h, P, D]`` (keys
    position-encoded) and ``valid [B, P]``; a call appends its ``T`` tokens (padding marked invalid).
    A token's position is the number of valid tokens before it."""

    def __init__(self, attn: CausalSelfAttention, unrolled: bool) -> None:
        super().__init__()
        if type(attn) is not CausalSelfAttention:
            raise _unsupported(f"attention {type(attn).__name__}", "has no export form")
        if attn.window is not None:
            raise _unsupported("sliding-window attention", "has no export form (its cache is trimmed)")
        if type(attn.position) not in (Rotary, NoPosition) or isinstance(attn.position, XPos):
            raise _unsupported(f"attention with {type(attn.position).__name__} positions", "has no export form")
        self.attn = attn

    def state_shapes(self, B: int):
        a = self.attn
        return [("k", (B, a.n_heads, 1, a.head_dim), "zeros"), ("v", (B, a.n_heads, 1, a.head_dim), "zeros"),
                ("valid", (B, 1), "false")]

    def forward(self, x: Tensor, mask: Tensor, past_k: Tensor, past_v: Tensor, past_valid: Tensor):
        a = self.attn
        B, T, E = x.shape
        P = past_k.shape[-2]
        q, k, v = (t.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
                   for t in a.qkv(x).split(E, dim=-1))  # [B, h, T, D] each
        if isinstance(a.position, Rotary):
            pos = past_valid.sum(-1, keepdim=True) + mask.long().cumsum(-1) - 1  # [B, T]
            theta = pos.to(torch.float32)[..., None] * a.position.inv_freq  # [B, T, D/2]
            cos, sin = theta.cos()[:, None], theta.sin()[:, None]  # [B, 1, T, D/2]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)  # [B, h, P + T, D]
        valid = torch.cat((past_valid, mask), dim=-1)  # [B, P + T]
        key = torch.arange(P + T, device=x.device)  # buffer index of each key
        query = key[P:, None]  # [T, 1]
        # a query sees valid keys up to itself, and itself always (so a padded row stays finite)
        see = (key[None, :] <= query) & (valid[:, None, :] | (key[None, :] == query))  # [B, T, P + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=see[:, None])  # [B, h, T, D]
        return a.residual_proj(y.transpose(1, 2).reshape(B, T, E)), [k, v, valid]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class _MLPForm(nn.Module):
    def __init__(self, mlp: MLP, unrolled: bool) -> None:
        super().__init__()
        self.mlp = mlp

    def state_shapes(self, B: int):
        return []

    def forward(self, x: Tensor, mask: Tensor):
        return self.mlp(x)[0], []


def _mixer_form(mixer: nn.Module, unrolled: bool) -> nn.Module:
    if isinstance(mixer, RNNMixer):
        return _RNNForm(mixer.rnn, unrolled)
    for cls, form in ((MRU, _MRUForm), (LinearAttention, _LinearAttentionForm),
                      (CausalSelfAttention, _AttentionForm), (MLP, _MLPForm)):
        if type(mixer) is cls:
            return form(mixer, unrolled)
    raise _unsupported(f"mixer {type(mixer).__name__}", "has no export form")


class ExportForm(nn.Module):
    """``out, *new_state = form(x, mask, *state)``; see the module docstring. Built by :func:`exportable`."""

    def __init__(self, model: nn.Module, mode: str = "sequence") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        unrolled = mode == "step"
        self.mode = mode
        # the model's pieces, not the model: a MORNN's training-time parameters (the skew part, the
        # base) would otherwise travel into the exported program unused
        if isinstance(model, SequenceModel):
            self.kind = "sequence"
            self.forms = nn.ModuleList(_mixer_form(layer.mixer, unrolled) for layer in model.layers)
            self.norms = nn.ModuleList(layer.norm for layer in model.layers)
            self.final_norm = model.norm
        elif isinstance(model, RecurrentModel):
            self.kind = "recurrent"
            self.forms = nn.ModuleList([_RNNForm(model.rnn, unrolled)])
        else:
            raise _unsupported(f"model {type(model).__name__}",
                               "is neither a matrec SequenceModel nor a RecurrentModel")
        self.encoder, self.head = model.encoder, model.head
        self.vocab_size = model.vocab_size
        self.input_size = None if self.vocab_size is not None else (
            model.input_size if self.kind == "sequence" else model.rnn.input_size)
        self._counts = [len(f.state_shapes(1)) for f in self.forms]

    @property
    def state_names(self) -> list[str]:
        """One name per state tensor, ``"<layer>.<name>"`` (e.g. ``"0.H"``, ``"2.k"``)."""
        return [f"{i}.{name}" for i, f in enumerate(self.forms) for name, _, _ in f.state_shapes(1)]

    def state_spec(self, batch_size: int = 1) -> list[dict]:
        """Per state tensor: ``name``, ``shape``, ``dtype`` and ``init`` ("zeros", "identity" over
        the last two dims, or "false"), what a runtime without matrec needs to start a sequence."""
        return [{"name": f"{i}.{name}", "shape": list(shape), "init": init,
                 "dtype": "bool" if init == "false" else "float32"}
                for i, f in enumerate(self.forms) for name, shape, init in f.state_shapes(batch_size)]

    def initial_state(self, batch_size: int = 1) -> list[Tensor]:
        """The state before the first token (float32; the attention's validity mask is bool)."""
        return [initial_tensor(s) for s in self.state_spec(batch_size)]

    def example_inputs(self, batch_size: int = 1, length: int = 8) -> tuple[Tensor, ...]:
        """``(x, mask, *state)`` for tracing: a sequence of ``length`` tokens from :meth:`initial_state`,
        except that attention caches get two placeholder slots so their length traces as dynamic."""
        g = torch.Generator().manual_seed(0)
        if self.vocab_size is not None:
            x = torch.randint(0, self.vocab_size, (batch_size, length), generator=g)
        else:
            x = torch.randn(batch_size, length, self.input_size, generator=g)
        state = self.initial_state(batch_size)
        state = [torch.cat((s, s), dim=-2 if s.dim() == 4 else -1) if n.endswith((".k", ".v", ".valid")) else s
                 for n, s in zip(self.state_names, state)]
        return (x, torch.ones(batch_size, length, dtype=torch.bool), *state)

    def dynamic_shapes(self, max_length: int) -> tuple:
        """``torch.export`` dynamic shapes: ``T`` (sequence mode) and each attention cache's length."""
        T = torch.export.Dim("T", min=1, max=max_length) if self.mode == "sequence" else None
        P = torch.export.Dim("P", min=1, max=max_length + 1)
        x_shape = {1: T} if T is not None else None
        # {} (no dynamic axis) rather than None: torch.onnx.export turns an all-None group into a list
        state = [({2: P} if n.endswith((".k", ".v")) else {1: P} if n.endswith(".valid") else {})
                 for n in self.state_names]
        return (x_shape, x_shape, tuple(state))  # forward(x, mask, *state): the state is one group

    def forward(self, x: Tensor, mask: Tensor, *state: Tensor):
        h = self.encoder(x)  # [B, T, E]
        if self.kind == "recurrent":
            y, new = self.forms[0](h, mask, *state)
            return (self.head(y), *new)
        new_state: list[Tensor] = []
        i = 0
        for norm, form, n in zip(self.norms, self.forms, self._counts):
            y, s = form(norm(h), mask, *state[i:i + n])
            h = h + y
            new_state += s
            i += n
        return (self.head(self.final_norm(h)), *new_state)


def export_state(form: ExportForm, state) -> list[Tensor]:
    """The flat state of ``form`` from its model's own state (what ``model(x, state)`` returned), to
    continue in a runtime a sequence begun in PyTorch. An attention cache ``(k, v, position)`` gets
    every slot marked valid."""
    if form.kind == "recurrent":
        return [state]
    flat: list[Tensor] = []
    for form_i, s in zip(form.forms, state):
        if isinstance(form_i, _AttentionForm):
            k, v, _ = s
            flat += [k, v, torch.ones(k.shape[0], k.shape[-2], dtype=torch.bool)]
        elif isinstance(s, Tensor):
            flat.append(s)
        elif s is not None:
            flat += list(s)
    return flat


def initial_tensor(spec: dict) -> Tensor:
    """The starting value of one state tensor from its :meth:`ExportForm.state_spec` entry."""
    shape = spec["shape"]
    if spec["init"] == "false":
        return torch.zeros(shape, dtype=torch.bool)
    if spec["init"] == "identity":
        return torch.eye(shape[-1]).expand(shape).clone()
    return torch.zeros(shape)


def exportable(model: nn.Module, mode: str = "sequence") -> ExportForm:
    """The export form of ``model`` (put in eval mode): see the module docstring.

    Raises :class:`UnsupportedModelError` (a ``ValueError``) naming the layer that has no form.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model.eval()
    with torch.no_grad():
        return ExportForm(model, mode).eval()
