"""Old import paths of moved modules still work, and say where the module went."""
import importlib
import sys

import pytest


@pytest.mark.parametrize("old,new,name", [
    ("matrec.models.attention", "matrec.nn.attention", "CausalSelfAttention"),
    ("matrec.models.linear_attention", "matrec.nn.linear_attention", "LinearAttention"),
    ("matrec.models.transformer_xl", "matrec.nn.transformer_xl", "TransformerXLAttention"),
    ("matrec.models.positional", "matrec.nn.positional", "POSITIONS"),
])
def test_old_layer_paths_warn_and_alias(monkeypatch, old, new, name):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_old_recurrence_path_aliases():
    from matrec.ops import recurrence as old
    from matrec.ops import rnn_recurrence as new

    assert old.recurrence is new.recurrence and old.RECURRENCE_BACKENDS is new.RECURRENCE_BACKENDS
