"""Every preset builds, runs forward + backward, and reports its parameter count."""
import pytest
import torch

from matrec.models import MODELS, PRESETS, build_model, list_presets, num_parameters
from matrec.models.zoo import MRU_CONSTRUCTIONS

V = 65  # tiny-shakespeare characters


def test_presets_named_after_the_seed_experiments():
    expected = {f"shakespeare-{m}" for m in ("mru", "attn", "linear_attn")}
    expected |= {f"ablation-mru-{c}" for c in MRU_CONSTRUCTIONS}
    expected |= {"ablation-attn", "ablation-linear_attn", "ablation-mlp"}
    assert set(PRESETS) == expected and len(MRU_CONSTRUCTIONS) == 8
    assert all(name in MODELS for name in PRESETS)
    assert PRESETS["shakespeare-mru"]["pattern"] == ["mru", "mlp"] * 6
    assert PRESETS["ablation-mru-cayley"]["pattern"] == ["mru"] + ["mlp"] * 4
    assert PRESETS["ablation-mru-cayley"]["mixer_options"] == {"mru": {"state_matrix": "cayley"}}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name, vocab_size=V, output_size=V)
    width = 384 if name.startswith("shakespeare") else 256
    assert model.d_model == width and model.context_length == 256
    x = torch.randint(0, V, (2, 6))
    out, state = model(x)
    assert out.shape == (2, 6, V) and torch.isfinite(out).all()
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    n = num_parameters(model)
    print(f"{name}: {n:,} parameters")
    assert (8e6 < n < 12e6) if name.startswith("shakespeare") else (2e6 < n < 3.5e6)


def test_list_presets_reports_parameter_counts():
    rows = list_presets(V)
    assert [r["name"] for r in rows] == list(PRESETS)
    attn = next(r for r in rows if r["name"] == "ablation-attn")
    assert attn["parameters"] == num_parameters(build_model("ablation-attn", vocab_size=V, output_size=V))
    # 4 MLPs alone have exactly the attention ablation minus its mixer sublayer (qkv + proj + norm)
    mlp = next(r for r in rows if r["name"] == "ablation-mlp")
    assert attn["parameters"] - mlp["parameters"] == 4 * 256 * 256 + 2 * 256


def test_preset_overrides():
    model = build_model("shakespeare-attn", vocab_size=V, output_size=V, d_model=64, n_heads=2, dropout=0.0)
    assert model.d_model == 64 and len(model.layers) == 12


def test_mru_keeps_its_init_but_out_proj_is_a_residual_projection():
    torch.manual_seed(0)
    model = build_model("shakespeare-mru", vocab_size=V, output_size=V)
    mru = model.layers[0].mixer
    assert torch.count_nonzero(mru.in_proj.weight) == 0  # every M_t starts at the identity
    std = mru.out_proj.weight.std().item()  # 0.02 / sqrt(12 sublayers) = 0.0058
    assert 0.0050 < std < 0.0066


def test_zoo_module_prints_the_presets_table():
    # `python -m matrec.models.zoo` (the command behind docs/models.md) used to re-register every model
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run([sys.executable, "-m", "matrec.models.zoo"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": src})
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == len(PRESETS)
    assert "| `shakespeare-mru` | 6 x (mru + MLP), width 384, 6 heads, T 256 | 8,900,736 |" in rows
