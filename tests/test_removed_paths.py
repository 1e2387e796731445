"""The deprecated module paths are gone; the README's changelog names each and where its names
live now, and they are there."""
import importlib
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CHANGELOG = README.split("## Changelog", 1)[-1]
MOVED = {
    "matrec.models.attention": ("matrec.nn.attention", ["CausalSelfAttention", "MRURotaryAttention", "rotate_chunks"]),
    "matrec.models.linear_attention": ("matrec.nn.linear_attention", ["LinearAttention"]),
    "matrec.models.positional": ("matrec.nn.positional", ["POSITIONS", "NoPosition", "Rotary", "XPos"]),
    "matrec.models.transformer_xl": ("matrec.nn.transformer_xl", ["TransformerXLAttention", "sinusoid"]),
    "matrec.ops.recurrence": ("matrec.ops.rnn_recurrence", [
        "recurrence", "recurrence_reference", "RECURRENCE_BACKENDS", "NONLINEARITIES", "Phi", "modrelu",
        "parameter_grads", "register_recurrence_autograd"]),
    "matrec.ops.triton_recurrence": ("matrec.ops.rnn_recurrence.triton",
                                     ["triton_recurrence", "compile_report", "config_for", "MAX_HIDDEN"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_gone_and_the_changelog_says_where_its_names_live(old):
    new, names = MOVED[old]
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    if new.endswith(".triton"):
        pytest.importorskip("triton")
    module = importlib.import_module(new)
    assert all(hasattr(module, name) for name in names)
    row = re.search(rf"^\s*\| `{re.escape(old)}` \| `{re.escape(new)}` \((.*)\) \|$", CHANGELOG, flags=re.M)
    assert row is not None, old
    assert re.findall(r"`(\w+)`", row.group(1)) == names
