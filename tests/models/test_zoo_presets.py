"""Every preset builds, runs forward + backward, and reports its parameter count."""
import pytest
import torch

from matrec.models import MODELS, PRESETS, build_model, generate, list_presets, num_parameters
from matrec.models.zoo import MRU_CONSTRUCTIONS
from support import SRC

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


def test_ablation_presets_pass_the_mrus_own_options_on():
    """model_args.element_scale / normalize reach the MRU (what experiments/mru_ablation_sweep.toml sweeps)."""
    mru = build_model("ablation-mru-ldu", vocab_size=V, output_size=V, element_scale=0.0625,
                      normalize="spectral").layers[0].mixer
    assert (mru.element_scale, mru.normalize, mru.state_matrix) == (0.0625, "spectral", "ldu")
    plain = build_model("ablation-mru-ldu", vocab_size=V, output_size=V).layers[0].mixer
    assert (plain.element_scale, plain.normalize) == (1 / 256, None)
    with pytest.raises(TypeError):
        build_model("ablation-attn", vocab_size=V, output_size=V, element_scale=0.0625)


def test_mru_keeps_its_init_but_residual_proj_is_a_residual_projection():
    torch.manual_seed(0)
    model = build_model("shakespeare-mru", vocab_size=V, output_size=V)
    mru = model.layers[0].mixer
    assert torch.count_nonzero(mru.in_proj.weight) == 0  # every M_t starts at the identity
    std = mru.residual_proj.weight.std().item()  # 0.02 / sqrt(12 sublayers) = 0.0058
    assert 0.0050 < std < 0.0066


def test_models_module_prints_the_presets_table():
    # `python -m matrec.models`: the command behind docs/models.md's table
    import os
    import subprocess
    import sys

    src = str(SRC)
    proc = subprocess.run([sys.executable, "-m", "matrec.models"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": src})
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == len(PRESETS)
    count = num_parameters(build_model("shakespeare-mru", vocab_size=65, output_size=65))
    assert f"| `shakespeare-mru` | 6 x (mru + MLP), width 384, 6 heads, T 256 | {count:,} |" in rows


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_generation_equals_full_recomputation(name):
    torch.manual_seed(1)
    model = build_model(name, vocab_size=V, output_size=V)
    with torch.no_grad():  # off the identity-like init (the MRU's zero W_in), so every path mixes
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.double().eval()
    x = torch.randint(0, V, (2, 7))
    full, _ = model(x)
    logits, state = model(x[:, :3])  # the prompt, then one token per call carrying the state
    steps = [logits]
    for t in range(3, 7):
        logits, state = model(x[:, t:t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    prompt = x[:, :3]
    streamed = generate(model, prompt, 4, temperature=0)
    torch.testing.assert_close(streamed, generate(model, prompt, 4, temperature=0, use_state=False))
    assert model.training is False


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_heads_and_pattern(name):
    model = build_model(name, vocab_size=V, output_size=V)
    preset = PRESETS[name]
    assert [layer.mixer.__class__.__name__ for layer in model.layers].count("MLP") == (
        6 if name.startswith("shakespeare") else 4)
    heads = {getattr(layer.mixer, "n_heads", getattr(layer.mixer, "num_heads", None))
             for layer in model.layers if layer.mixer.__class__.__name__ != "MLP"}
    if name.startswith("shakespeare"):
        assert preset["pattern"] == [name.split("-", 1)[1], "mlp"] * 6 and heads == {6}
    elif name == "ablation-mlp":
        assert preset["pattern"] == ["mlp"] * 4 and heads == set()
    else:
        mixer = "mru" if name.startswith("ablation-mru") else name.split("-", 1)[1]
        assert preset["pattern"] == [mixer] + ["mlp"] * 4 and heads == {4}
    # docs/models.md: the MRU presets keep the MRU's default order d = 8 at both widths
    assert {layer.mixer.order for layer in model.layers if hasattr(layer.mixer, "order")} <= {8}
    if "mru" in name:
        assert model.layers[0].mixer.order == 8
