"""Export forms of matrec's models: the model itself with plain-tensor state, a dynamic length.

:func:`exportable` wraps a :class:`~matrec.models.SequenceModel` or
:class:`~matrec.models.RecurrentModel` (eval mode) in an :class:`ExportForm`::

    out, *new_state = form(x, mask, *state)

- ``x``: token ids ``[B, T]`` (int64) or features ``[B, T, F]`` (float32);
- ``mask [B, T]`` (bool): False marks padding; a padded step leaves every state unchanged (its
  output is computed but meaningless);
- ``state``: the flat list of tensors :meth:`ExportForm.initial_state` starts with, named by
  :attr:`ExportForm.state_names`; ``new_state`` has the same layout, to pass back for the next call.

Nothing here computes a layer: the form runs a copy of the model's own forward with the mask,
inside :func:`matrec.ops.backends.export_safe`, where every op resolves to the export-safe entry of
its own backend registry (the recurrences to their step in PyTorch's ``scan`` op, so
``torch.export`` keeps ``T`` dynamic; ``mode="step"`` fixes ``T = 1`` and unrolls it, a smaller
graph for token-by-token decoding). Each layer's state is flattened and rebuilt from its
``state_spec()`` (the mixer protocol, :mod:`matrec.nn.protocol`), and a layer's ``for_inference()``
(a MORNN's orthogonal matrices built once, as constants) is what the copy holds. So any mixer that
meets the protocol exports; one that does not is refused by name, with what it lacks.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..models.recurrent import RecurrentModel
from ..models.sequence import SequenceModel
from ..nn.protocol import (StateSpec, as_masked_state, flatten_state, for_inference, missing_protocol,
                           unflatten_state)
from ..nn.rnn_mixer import RNNMixer
from ..ops.backends import NoExportForm, export_safe

MODES = ("sequence", "step")


class UnsupportedModelError(ValueError):
    """The model (or one of its layers) has no export form."""


def _unsupported(what: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"model cannot be exported: {what} {why}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ExportForm(nn.Module):
    """``out, *new_state = form(x, mask, *state)``; see the module docstring. Built by :func:`exportable`."""

    def __init__(self, model: nn.Module, mode: str = "sequence") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.mode, self.unrolled = mode, mode == "step"
        if isinstance(model, SequenceModel):
            self.kind = "sequence"
            # a copy whose layers are their inference forms: a MORNN's training-time parameters
            # (the skew part, the base) would otherwise travel into the exported program unused
            model = copy.deepcopy(model).eval()
            for i, (name, layer) in enumerate(zip(model.pattern, model.layers)):
                lacks = missing_protocol(layer.mixer)
                if lacks:
                    raise _unsupported(f"layer {i} (mixer {name!r}, {type(layer.mixer).__name__})",
                                       f"does not implement the mixer protocol (matrec.nn.protocol): it "
                                       f"lacks {'; '.join(lacks)}")
                layer.mixer = for_inference(layer.mixer)
            self.layers = [(f"layer {i} (mixer {name!r}, {type(layer.mixer).__name__})", layer.mixer)
                           for i, (name, layer) in enumerate(zip(model.pattern, model.layers))]
            self.input_size = model.input_size
        elif isinstance(model, RecurrentModel):
            self.kind = "recurrent"
            model = copy.deepcopy(model).eval()
            mixer = for_inference(RNNMixer(model.rnn)) if getattr(model.rnn, "batch_first", False) else None
            if mixer is None:
                raise _unsupported(f"recurrent layer {type(model.rnn).__name__}", "must be batch_first")
            model.rnn = mixer.rnn
            self.layers = [(f"recurrent layer {type(model.rnn).__name__}", mixer)]
            self.input_size = None if model.vocab_size is not None else model.rnn.input_size
        else:
            raise _unsupported(f"model {type(model).__name__}",
                               "is neither a matrec SequenceModel nor a RecurrentModel")
        self.model = model
        self.vocab_size = model.vocab_size
        self.specs: list[list[StateSpec]] = [mixer.state_spec() for _, mixer in self.layers]
        self._check_layers()

    def _check_layers(self) -> None:
        """Run every layer once, two tokens, the way the exported graph will: a layer (or an op in
        it) without an export-safe form says so here, by name, instead of deep inside torch.export."""
        for (what, mixer), specs in zip(self.layers, self.specs):
            width = mixer.rnn.input_size if isinstance(mixer, RNNMixer) else self.model.d_model
            x = torch.zeros(1, 2, width)
            state = unflatten_state(specs, [s.initial(1) for s in specs])
            try:
                with torch.no_grad(), export_safe(unrolled=True):
                    mixer(x, state, mask=torch.ones(1, 2, dtype=torch.bool))
            except NoExportForm as e:
                raise _unsupported(what, f"has no export form: {e}") from None

    @property
    def state_names(self) -> list[str]:
        """One name per state tensor, ``"<layer>.<name>"`` (e.g. ``"0.H"``, ``"2.k"``)."""
        return [f"{i}.{s.name}" for i, specs in enumerate(self.specs) for s in specs]

    def state_spec(self, batch_size: int = 1) -> list[dict]:
        """Per state tensor: ``name``, ``shape``, ``dtype``, ``init`` ("zeros", "identity" over the
        last two dims, or "false") and, for a cache, ``grows`` (the dim each call appends its tokens
        to): what a runtime without matrec needs to start a sequence."""
        return [{"name": f"{i}.{s.name}", "shape": list(s.sizes(batch_size)), "init": s.init,
                 "dtype": _dtype_name(s.dtype), **({} if s.grows is None else {"grows": s.grows})}
                for i, specs in enumerate(self.specs) for s in specs]

    def initial_state(self, batch_size: int = 1) -> list[Tensor]:
        """The state before the first token (float32; an attention's validity mask is bool)."""
        return [initial_tensor(s) for s in self.state_spec(batch_size)]

    def example_inputs(self, batch_size: int = 1, length: int = 8) -> tuple[Tensor, ...]:
        """``(x, mask, *state)`` for tracing: a sequence of ``length`` tokens from :meth:`initial_state`,
        except that caches get two placeholder slots so their length traces as dynamic."""
        g = torch.Generator().manual_seed(0)
        if self.vocab_size is not None:
            x = torch.randint(0, self.vocab_size, (batch_size, length), generator=g)
        else:
            x = torch.randn(batch_size, length, self.input_size, generator=g)
        state = [s.initial(batch_size, slots=2) for specs in self.specs for s in specs]
        return (x, torch.ones(batch_size, length, dtype=torch.bool), *state)

    def dynamic_shapes(self, max_length: int) -> tuple:
        """``torch.export`` dynamic shapes: ``T`` (sequence mode) and every cache's slots."""
        T = torch.export.Dim("T", min=1, max=max_length) if self.mode == "sequence" else None
        P = torch.export.Dim("P", min=1, max=max_length + 1)
        x_shape = {1: T} if T is not None else None
        # {} (no dynamic axis) rather than None: torch.onnx.export turns an all-None group into a list
        state = [({} if s.grows is None else {s.grows: P}) for specs in self.specs for s in specs]
        return (x_shape, x_shape, tuple(state))  # forward(x, mask, *state): the state is one group

    def forward(self, x: Tensor, mask: Tensor, *state: Tensor):
        states, i = [], 0
        for specs in self.specs:
            states.append(unflatten_state(specs, state[i:i + len(specs)]))
            i += len(specs)
        with export_safe(unrolled=self.unrolled):
            out, new = self.model(x, states[0] if self.kind == "recurrent" else states, mask=mask)
        new = [new] if self.kind == "recurrent" else new
        return (out, *(t for specs, s in zip(self.specs, new) for t in flatten_state(specs, s)))


def export_state(form: ExportForm, state) -> list[Tensor]:
    """The flat state of ``form`` from its model's own state (what ``model(x, state)`` returned), to
    continue in a runtime a sequence begun in PyTorch. An attention cache ``(k, v, position)`` gets
    every slot marked valid."""
    state = [state] if form.kind == "recurrent" else state
    return [t for (_, mixer), specs, s in zip(form.layers, form.specs, state)
            for t in flatten_state(specs, as_masked_state(mixer, s))]


def initial_tensor(spec: dict) -> Tensor:
    """The starting value of one state tensor from its :meth:`ExportForm.state_spec` entry."""
    dtype = {"false": "bool"}.get(spec["init"], spec.get("dtype", "float32"))
    return StateSpec("s", tuple(spec["shape"]), spec["init"], getattr(torch, dtype)).initial(0)


def exportable(model: nn.Module, mode: str = "sequence") -> ExportForm:
    """The export form of ``model`` (put in eval mode): see the module docstring.

    Raises :class:`UnsupportedModelError` (a ``ValueError``) naming the layer that has no form and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model.eval()
    with torch.no_grad():
        return ExportForm(model, mode).eval()
