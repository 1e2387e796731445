"""Gate-bias initialisations of PyTorch's LSTM and GRU, the ones the long-memory literature uses.

``GATE_INITS`` names them (``init=`` of the ``lstm`` / ``gru`` models and mixers):

- ``"default"``: PyTorch's own, U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
- ``"forget_bias_1"``: the gate that keeps the cell (LSTM forget gate ``f``; GRU update gate ``z``,
  since ``h_t = (1 - z) n + z h_{t-1}``) starts with bias 1 (Gers et al.; Jozefowicz et al.), so the
  network starts out remembering rather than forgetting.
- ``"chrono"``: Tallec & Ollivier's chrono initialisation. A gated cell with keep gate ``sigma(b)``
  forgets at a characteristic time ``1 / (1 - sigma(b)) ~ e^b``; drawing ``b_f = log(u)``,
  ``u ~ U[1, t_max - 1]`` spreads the units' time scales over ``[1, t_max]`` (the longest
  dependency the user expects), and the LSTM's input gate takes ``b_i = -b_f`` so a slowly
  forgetting unit also writes slowly. The GRU has one gate for both roles: ``b_z = log(u)``.

PyTorch keeps two biases per gate (``bias_ih`` and ``bias_hh``) whose sum acts; these set the sum
exactly: the chosen gates' value goes to ``bias_ih`` and their ``bias_hh`` is zeroed. Weights and
the other gates keep PyTorch's initialisation. Every layer and direction is set.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..checks import check_real
from ..registry import Registry

GATE_INITS: Registry = Registry("gate initialisation", argument="init")

# gate order inside PyTorch's stacked weights: LSTM (i, f, g, o), GRU (r, z, n)
_KEEP_GATE = {nn.LSTM: 1, nn.GRU: 1}
_INPUT_GATE = {nn.LSTM: 0}


def _gate_biases(rnn: nn.Module):
    """``(bias_ih, bias_hh)`` of every layer and direction of ``rnn``."""
    if not getattr(rnn, "bias", True):
        raise ValueError("a gate initialisation sets biases: the rnn must be built with bias=True")
    for name, param in rnn.named_parameters():
        if name.startswith("bias_ih"):
            yield param, getattr(rnn, name.replace("bias_ih", "bias_hh"))


def _cls(rnn: nn.Module) -> type:
    for cls in _KEEP_GATE:
        if isinstance(rnn, cls):
            return cls
    raise TypeError(f"gate initialisations apply to nn.LSTM and nn.GRU, got {type(rnn).__name__}")


def _set(rnn: nn.Module, values) -> None:
    """Set the summed bias of each gate ``g`` to ``v [H]`` for ``g, v`` in ``values()`` (called once
    per layer and direction, so random values are drawn afresh for each)."""
    H = rnn.hidden_size
    with torch.no_grad():
        for b_ih, b_hh in _gate_biases(rnn):
            for gate, value in values().items():
                b_ih[gate * H:(gate + 1) * H].copy_(value)
                b_hh[gate * H:(gate + 1) * H].zero_()


@GATE_INITS.register("default")
def default_init(rnn: nn.Module, t_max: float | None = None) -> None:
    """PyTorch's initialisation: nothing to change."""
    _cls(rnn)


@GATE_INITS.register("forget_bias_1")
def forget_bias_1(rnn: nn.Module, t_max: float | None = None) -> None:
    """Keep-gate bias 1 (LSTM ``f``, GRU ``z``)."""
    gate = _KEEP_GATE[_cls(rnn)]
    _set(rnn, lambda: {gate: torch.ones(rnn.hidden_size)})


@GATE_INITS.register("chrono")
def chrono(rnn: nn.Module, t_max: float | None = None) -> None:
    """Chrono initialisation: keep-gate bias ``log(U[1, t_max - 1])`` per unit (drawn from torch's
    global generator, so ``torch.manual_seed`` fixes it), the LSTM's input-gate bias its negative."""
    cls = _cls(rnn)
    if t_max is None:
        raise ValueError("init='chrono' needs t_max, the longest dependency expected (in steps), "
                         "e.g. t_max=1000 for a copy delay of 1000")
    check_real("t_max", t_max, minimum=2, open_min=True)   # the keep-gate biases are log U[1, t_max - 1]
    dtype = next(rnn.parameters()).dtype

    def values():
        keep = (torch.rand(rnn.hidden_size, dtype=torch.float64) * (t_max - 2) + 1).log().to(dtype)
        gates = {_KEEP_GATE[cls]: keep}
        if cls in _INPUT_GATE:
            gates[_INPUT_GATE[cls]] = -keep
        return gates

    _set(rnn, values)


def init_gates(rnn: nn.Module, init: str = "default", t_max: float | None = None) -> nn.Module:
    """Apply the gate initialisation ``init`` (a name in ``GATE_INITS``) to ``rnn`` in place; returns it.

    ``t_max`` is chrono's longest time scale; the other initialisations refuse it, so a typo in
    ``init`` cannot silently drop it.
    """
    fn = GATE_INITS.get(init)
    if t_max is not None and init != "chrono":
        raise ValueError(f"t_max is chrono's option, got t_max={t_max!r} with init={init!r}")
    fn(rnn, t_max)
    return rnn


def gated(rnn_cls: type) -> Callable[..., nn.Module]:
    """``rnn_cls`` (nn.LSTM or nn.GRU) with two more keyword options, ``init`` and ``t_max``
    (:func:`init_gates`): the constructor the ``lstm`` / ``gru`` models and mixers use."""
    def build(*args, init: str = "default", t_max: float | None = None, **kwargs) -> nn.Module:
        GATE_INITS.get(init)  # an unknown name fails before the network is built
        return init_gates(rnn_cls(*args, **kwargs), init, t_max)

    build.__name__ = build.__qualname__ = rnn_cls.__name__
    build.__doc__ = f"{rnn_cls.__name__} with a gate initialisation (``init``, ``t_max``)."
    return build
