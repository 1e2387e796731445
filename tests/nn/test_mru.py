"""The MRU layer: shapes, identity init, streaming == whole, causality, autocast, gradients, errors."""
import math

import pytest
import torch

import matrec
from matrec.nn import mru as mru_mod
from matrec.nn.mru import MRU, default_order
from matrec.ops.state_matrix import STATE_MATRICES
from support import ROOT


def trained_like(mru, scale=0.3, seed=0):
    """Give W_in random weights (it starts at zero) so the recurrence actually mixes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = mru.in_proj.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * scale / w.shape[1] ** 0.5)
    return mru


def test_shapes_and_defaults():
    m = MRU(384, num_heads=6)
    assert m.order == 8 and m.state_size == 384  # docs/design.md §1's configuration
    assert MRU(128).order == 8 and MRU(128).state_size == 64
    assert MRU(12, num_heads=3).order == 2
    m = MRU(16, num_heads=2, state_size=8)
    y, s = m(torch.randn(3, 5, 16))
    assert y.shape == (3, 5, 16) and s.shape == (3, 2, 2, 2)
    assert default_order(100, 4) == 5
    assert matrec.MRU is MRU


def test_identity_at_init():
    m = MRU(16, num_heads=2)
    x = torch.randn(2, 7, 16)
    y, s = m(x)
    assert torch.equal(s, torch.eye(m.order).expand_as(s))
    # every H_t = I, so the output is the same at every step and for every input
    torch.testing.assert_close(y, y[:1, :1].expand_as(y), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["ldu", "cayley"])
def test_matches_the_definition_head_by_head(name):
    """docs/design.md §1: per head and token, M_t from that head's slice of element_scale * W_in x_t, H_t = H_{t-1} M_t
    by a plain loop, read-out H_t @ W_down[head] flattened, heads side by side, then the output projection."""
    from matrec.ops.state_matrix import state_matrix

    m = trained_like(MRU(24, num_heads=2, state_size=18, state_matrix=name, dtype=torch.float64), scale=3.0)
    with torch.no_grad():
        m.in_proj.bias.normal_()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    h0 = torch.linalg.matrix_exp(0.3 * torch.randn(2, 2, 3, 3, dtype=torch.float64))
    y, s = m(x, h0)
    raw = m.element_scale * (x @ m.in_proj.weight.T + m.in_proj.bias)  # [B, T, heads * n]
    n = m.numel
    want_y = torch.empty(2, 6, 24, dtype=torch.float64)
    for b in range(2):
        for head in range(2):
            H = h0[b, head]
            for t in range(6):
                H = H @ state_matrix(name, raw[b, t, head * n:(head + 1) * n], 3)
                want_y[b, t, head * 12:(head + 1) * 12] = (H @ m.down[head]).reshape(-1)
            torch.testing.assert_close(s[b, head], H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, m.residual_proj(want_y), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(s, h0)  # the inputs really moved the state


@pytest.mark.parametrize("backend", ["auto", "sequential", "chunked"])
@pytest.mark.parametrize("name", ["ldu", "cayley", "scaled"])
def test_streaming_equals_whole(backend, name):
    m = trained_like(MRU(24, num_heads=2, state_size=18, state_matrix=name, backend=backend, dtype=torch.float64))
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    y, s = m(x)
    ys, state = [], None
    for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 30), (30, 40)]:
        yi, state = m(x[:, lo:hi], state)
        ys.append(yi)
    torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state, s, atol=1e-10, rtol=1e-10)


def test_causal():
    m = trained_like(MRU(16, num_heads=1, dtype=torch.float64))
    x = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    (g,) = torch.autograd.grad(y[:, 12].sum(), x)
    assert g[:, 13:].abs().max() == 0 and g[:, :13].abs().max() > 0
    x2 = x.detach().clone()
    x2[:, 20:] += 1.0
    y2, _ = m(x2)
    assert torch.equal(y2[:, :20], y[:, :20].detach()) and not torch.allclose(y2[:, 20:], y[:, 20:])


def test_backends_agree_with_gradients():
    x = torch.randn(2, 33, 16, dtype=torch.float64)
    results = []
    for backend in ["sequential", "hillis_steele", "brent_kung", "sklansky", "chunked"]:
        torch.manual_seed(0)
        m = trained_like(MRU(16, num_heads=4, state_size=16, backend=backend, dtype=torch.float64))
        y, s = m(x)
        (y.square().sum() + s.sum()).backward()
        results.append([y, s] + [p.grad for p in m.parameters()])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_gradcheck_small():
    m = trained_like(MRU(4, num_heads=1, state_size=4, dtype=torch.float64))
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    s0 = torch.linalg.matrix_exp(torch.randn(1, 1, 2, 2, dtype=torch.float64) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: m(a, b)[0], (x, s0))


@pytest.mark.parametrize("name", STATE_MATRICES.names())
def test_every_construction_trains(name):
    m = trained_like(MRU(8, num_heads=2, state_size=8, state_matrix=name))
    y, _ = m(torch.randn(2, 6, 8))
    y.square().mean().backward()
    assert torch.isfinite(m.in_proj.weight.grad).all() and m.in_proj.weight.grad.abs().sum() > 0


def test_bf16_autocast_scan_in_float32(monkeypatch):
    seen = []
    real = mru_mod.mru_scan

    def spy(states, initial_state=None, **kw):
        seen.append((states.dtype, torch.is_autocast_enabled("cpu")))
        return real(states, initial_state, **kw)

    monkeypatch.setattr(mru_mod, "mru_scan", spy)
    m = trained_like(MRU(16, num_heads=1))
    x = torch.randn(2, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = m(x)
        y2, s2 = m(x, s)
    assert seen == [(torch.float32, False)] * 2
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y.float().sum().backward()
    assert torch.isfinite(m.in_proj.weight.grad).all()


def test_bf16_module():
    m = trained_like(MRU(16, num_heads=2, dtype=torch.bfloat16))
    y, s = m(torch.randn(2, 9, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"embed_dim": 16, "num_heads": 3}, "num_heads must divide embed_dim"),
        ({"embed_dim": 16, "num_heads": 2, "state_size": 12},
            r"state_size / num_heads must be a perfect square .*got 12 / 2 = 6"),
        ({"embed_dim": 16, "num_heads": 2, "state_size": 9}, "state_size must be divisible by num_heads"),
        ({"embed_dim": 18, "num_heads": 2, "state_size": 32}, "embed_dim must be divisible by num_heads \\* d"),
        ({"embed_dim": 16, "state_matrix": "nope"}, r"state_matrix must be one of \['identity'.*got 'nope'"),
        ({"embed_dim": 16, "backend": "nope"}, r"backend must be one of \['auto', 'sequential'.*got 'nope'"),
        ({"embed_dim": 0}, "embed_dim must be an int >= 1"),
        ({"embed_dim": 16, "dropout": 1.0}, "dropout must be in"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MRU(**kwargs)


def test_bad_forward_input():
    m = MRU(16, num_heads=2)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 16\]"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"state must be None or a tensor of shape \(2, 2, 2, 2\)"):
        m(torch.randn(2, 5, 16), torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="state must be None or a tensor"):
        m(torch.randn(2, 5, 16), [[1.0]])
    with pytest.raises(ValueError, match=r"x must have sequence length T >= 1, got \(2, 0, 16\)"):
        m(torch.randn(2, 0, 16))
    # no silent casts, as nn.Linear; every message names the argument
    for dtype in (torch.int64, torch.float64):
        with pytest.raises(ValueError, match=f"x must .*got {dtype}"):
            m(torch.zeros(2, 5, 16, dtype=dtype))
    with pytest.raises(TypeError, match=r"x must be a Tensor \[B, T, 16\], got list"):
        m([[[0.0] * 16]])
    _, H = m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="state must be a floating-point tensor .*got torch.int64"):
        m(torch.randn(2, 5, 16), H.long())
    with torch.autocast("cpu", dtype=torch.bfloat16):   # autocast's cast is deliberate: allowed
        assert m(torch.randn(2, 5, 16, dtype=torch.bfloat16))[0].shape == (2, 5, 16)
    assert MRU(16, num_heads=2).double()(torch.randn(1, 3, 16, dtype=torch.float64))[0].dtype == torch.float64


def _train_char_model(state_matrix, steps, element_scale=None):
    """A small MRU model learning to output the token 3 steps back; returns (losses, max |H_T|)."""
    import matrec

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # recall 3 steps back: only the mixer can solve it, so the optimiser pushes W_in hard
    data = torch.randint(0, 16, (8192,), generator=g)
    model = matrec.build_model(
        "sequence", vocab_size=16, output_size=16, pattern=["mru", "mlp"], d_model=64, n_heads=1,
        mixer_options={"mru": {"state_matrix": state_matrix, "element_scale": element_scale}})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, top = [], 0.0
    for _ in range(steps):
        ix = torch.randint(0, len(data) - 257, (4,), generator=g)
        x = torch.stack([data[i:i + 256] for i in ix])
        y = torch.stack([data[i - 3:i + 253] for i in ix + 3])
        out, state = model(x)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, 16), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        top = max(top, state[0].detach().abs().max().item())
    return losses, top


def test_default_element_scale_keeps_ldu_training_finite():
    # Regression: with element_scale=1 the state overflowed within a few AdamW steps (see MRU docs).
    losses, top = _train_char_model("ldu", 40)
    assert all(math.isfinite(l) for l in losses)
    assert top < 10
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]  # it learns the recall
    unscaled, top_unscaled = _train_char_model("ldu", 40, element_scale=1.0)
    # measured: |H| ~ 1e3 after 40 steps here (and NaN within 10 steps on tiny-shakespeare)
    assert top_unscaled > 100 * top or not all(math.isfinite(l) for l in unscaled)


def test_element_scale_is_validated():
    with pytest.raises(ValueError, match="element_scale must be a finite number > 0"):
        MRU(16, element_scale=0.0)


def test_quickstart_example_prints_true_claims():
    """examples/quickstart.py (the README's runnable MRU example) runs and what it prints holds."""
    import os
    import subprocess
    import sys

    root = ROOT
    run = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "matches the loop: True" in run.stdout and "stream == whole: True" in run.stdout, run.stdout
    assert "layer: (2, 50, 64) (2, 4, 4, 4)" in run.stdout, run.stdout


def test_checkpoints_with_the_old_out_proj_name_still_load():
    """The output projection was ``out_proj`` before it took every layer's name, ``residual_proj``:
    state dicts saved under the old name load (strict) into the layer and into a model holding it."""
    from matrec import build_model

    torch.manual_seed(0)
    src = MRU(8, num_heads=2)
    old = {k.replace("residual_proj", "out_proj"): v for k, v in src.state_dict().items()}
    assert "out_proj.weight" in old and "residual_proj.weight" not in old
    dst = MRU(8, num_heads=2)
    dst.load_state_dict(old)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(dst(x)[0], src(x)[0], rtol=0, atol=0)
    model = build_model("sequence", pattern=["mru", "mlp"], vocab_size=7, output_size=7, d_model=8, n_heads=2)
    saved = {k.replace("mixer.residual_proj", "mixer.out_proj") if k.startswith("layers.0.") else k: v
             for k, v in model.state_dict().items()}
    assert any(k.endswith("mixer.out_proj.weight") for k in saved)
    fresh = build_model("sequence", pattern=["mru", "mlp"], vocab_size=7, output_size=7, d_model=8, n_heads=2)
    fresh.load_state_dict(saved)
    tokens = torch.randint(0, 7, (2, 5))
    torch.testing.assert_close(fresh(tokens)[0], model(tokens)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", STATE_MATRICES.names())
def test_min_order_says_where_a_construction_stops_depending_on_its_input(name):
    """``min_order`` 2 exactly for the constructions whose 1 x 1 matrices are +-1 for every input
    (|det| = 1 or orthogonal leave nothing else; no gradient reaches the input), which the MRU then
    refuses at order 1."""
    spec = STATE_MATRICES.get(name)
    torch.manual_seed(0)
    M = matrec.ops.state_matrix.state_matrix(name, torch.randn(6, spec.numel(1)), 1) if spec.numel(1) else None
    constant = M is None or bool((M.abs() - 1).abs().max() < 1e-12)
    assert spec.min_order == (2 if constant else 1)
    if spec.min_order == 2:
        with pytest.raises(ValueError, match=r"embed_dim=52, num_heads=4 give order d=1 .* "
                                             r"needs d >= 2.*num_heads=1 gives d=4"):
            MRU(52, num_heads=4, state_matrix=name)
        with pytest.raises(ValueError, match=r"state_size=3, num_heads=3 give order d=1"):
            MRU(12, num_heads=3, state_size=3, state_matrix=name)
    else:
        MRU(52, num_heads=4, state_matrix=name)   # a scalar recurrence per head: allowed


def test_order_one_carries_the_sequence_where_it_is_allowed():
    # identity at d = 1 is a running product of scalars 1 + x_t: the output must depend on the past
    torch.manual_seed(0)
    layer = MRU(13, num_heads=13, state_matrix="identity").double()
    assert layer.order == 1
    with torch.no_grad():
        layer.in_proj.weight.normal_()
    x = torch.randn(1, 6, 13, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert (layer(x)[0][:, -1] - layer(x2)[0][:, -1]).abs().max() > 1e-6
    with pytest.raises(ValueError, match=r"normalize='spectral' needs d >= 2"):
        MRU(13, num_heads=13, state_matrix="identity", normalize="spectral")
