"""MRU(normalize=...): "spectral" divides every M_t by its largest singular value, so the running product
stays bounded at any length; "direction" also reads every H_t out rescaled to ||H_t||_F = sqrt(d). Both
exact in every scan backend (docs/mru.md, "A running product that stays finite" and "Reading out the
state's direction"); the direction op alone is in test_mru_direction.py."""
import time
import warnings

import pytest
import torch

from matrec.nn import mru as mru_mod
from matrec.nn.mru import MRU
from matrec.ops.mru_scan import SCAN_BACKENDS, naive_direction_scan, naive_mru_scan
from matrec.ops.state_matrix import STATE_MATRICES, STATE_NORMALIZATIONS, spectral_normalize, state_matrix

CPU_BACKENDS = [b for b in SCAN_BACKENDS.names() if b != "triton"]
NORMALIZATIONS = STATE_NORMALIZATIONS.names()
SHEARING = [n for n in STATE_MATRICES.names() if not STATE_MATRICES.get(n).norm_preserving]


def randomised(m, scale, seed=0):
    """W_in and its bias random (they start at zero, where every M_t is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.in_proj.weight, m.in_proj.bias):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return m


def reference(m, x, h0=None):
    """The layer by its definition: construction, M_t / sigma_max(M_t) with sigma_max from an SVD
    (not the layer's eigvalsh), the product by a loop (for "direction" rescaled after every step,
    not between blocks), the read-out."""
    B, T, E = x.shape
    h, d = m.num_heads, m.order
    raw = (m.in_proj(x) * m.element_scale).view(B, T, h, m.numel).transpose(1, 2)
    M = state_matrix(m.state_matrix, raw, d)                                     # [B, h, T, d, d]
    M = M / torch.linalg.matrix_norm(M, ord=2)[..., None, None]
    scan = naive_direction_scan if m.normalize == "direction" else naive_mru_scan
    H = scan(M, h0)                                                              # [B, h, T, d, d]
    y = (H @ m.down.unsqueeze(1)).flatten(-2).transpose(1, 2).reshape(B, T, E)
    return m.residual_proj(y), H[:, :, -1]


def test_spectral_normalize_properties():
    g = torch.Generator().manual_seed(0)
    M = torch.eye(5, dtype=torch.float64) + torch.randn(300, 5, 5, generator=g, dtype=torch.float64)
    N = spectral_normalize(M)
    torch.testing.assert_close(torch.linalg.matrix_norm(N, ord=2), torch.ones(300, dtype=torch.float64))
    torch.testing.assert_close(N * torch.linalg.matrix_norm(M, ord=2)[:, None, None], M)  # same direction
    Q = torch.linalg.qr(M).Q
    torch.testing.assert_close(spectral_normalize(Q), Q)                          # rotations untouched
    eye = torch.eye(4).expand(3, 4, 4)
    assert torch.equal(spectral_normalize(eye), eye)                              # so is the identity (init)
    # products of normalised matrices never grow (submultiplicativity), while the raw ones do
    P, N = naive_mru_scan(M), naive_mru_scan(N)
    assert torch.linalg.matrix_norm(P[-1], ord=2) > 1e10
    assert (torch.linalg.matrix_norm(N, ord=2) <= 1 + 1e-12).all()
    assert STATE_NORMALIZATIONS.get("spectral").per_token is spectral_normalize


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_matches_the_reference(backend, T, normalize):
    """Outputs, final state and every gradient (x, H_0, all parameters) against the loop, float64."""
    torch.manual_seed(0)
    m = randomised(MRU(12, num_heads=2, state_size=8, state_matrix="ldu", normalize=normalize,
                       backend=backend, element_scale=1.0, dtype=torch.float64), 0.3)
    x = torch.randn(2, T, 12, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, T, 12, dtype=torch.float64)
    results = []
    for fn in (m, lambda a, b: reference(m, a, b)):
        y, s = fn(x, h0)
        leaves = [x, h0, *m.parameters()]
        grads = torch.autograd.grad((y * w).sum() + s.square().sum(), leaves)
        results.append([y, s, *grads])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # the option did something: without it, or with the other one, the same weights give another output
    for other in [None, *NORMALIZATIONS]:
        if other != normalize:
            m.normalize = other
            assert not torch.allclose(m(x, h0)[0], results[0][0]), other


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("T", [1, 7, 100])
def test_triton_backend_matches_the_sequential_one(T, normalize, monkeypatch):
    """The Triton kernel (float32 only) under its CPU interpreter, tiny shapes, against the same layer
    on the sequential backend, which test_every_backend_matches_the_reference checks against the
    definition in float64. Not against the float32 definition: with "direction" both backends differ
    from it by up to 1.8e-4 (relative) at T = 100, the definition's own float32 rounding (it rescales
    after every step, the layer between blocks), while they agree with each other exactly."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layers = []
    for backend in ("triton", "sequential"):
        torch.manual_seed(0)
        layers.append(randomised(MRU(4, num_heads=1, state_size=4, state_matrix="ldu", normalize=normalize,
                                     backend=backend, element_scale=1.0), 0.3))
    x = torch.randn(1, T, 4, requires_grad=True)
    h0 = torch.randn(1, 1, 2, 2, requires_grad=True)
    results = []
    for m in layers:
        y, s = m(x, h0)
        grads = torch.autograd.grad(y.square().sum() + s.sum(), [x, h0, *m.parameters()])
        results.append([y, s, *grads])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("name", ["identity", "ldu", "cayley_qr"])
def test_gradcheck(name, normalize):
    m = randomised(MRU(4, num_heads=1, state_size=4, state_matrix=name, normalize=normalize,
                       element_scale=1.0, dtype=torch.float64), 0.5)
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    names = ["in_proj.weight", "in_proj.bias", "down"]
    params = [dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(a, b, *p):
        return torch.func.functional_call(m, dict(zip(names, p)), (a, b))

    assert torch.autograd.gradcheck(f, (x, h0, *params))


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_streaming_equals_whole(normalize):
    m = randomised(MRU(12, num_heads=2, state_size=8, state_matrix="identity", normalize=normalize,
                       element_scale=1.0, dtype=torch.float64), 0.5)
    x = torch.randn(2, 40, 12, dtype=torch.float64)
    y, s = m(x)
    ys, state = [], None
    for lo, hi in [(0, 1), (1, 17), (17, 40)]:
        yi, state = m(x[:, lo:hi], state)
        ys.append(yi)
    torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state, s, atol=1e-10, rtol=1e-10)


def _long_run(name, normalize, T=65536):
    torch.manual_seed(0)
    m = randomised(MRU(8, num_heads=2, state_size=8, state_matrix=name, normalize=normalize,
                       element_scale=1.0), 0.3)
    x = torch.randn(1, T, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the long-sequence warning, tested below
        y, s = m(x)
    loss = y.square().mean()
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    return y, s, loss, grads


@pytest.mark.parametrize("name", STATE_MATRICES.names())
def test_finite_at_65536_tokens_in_float32(name):
    """Outputs, final state, loss and every gradient finite over 65,536 tokens, one forward + backward
    (about 1 s per construction on one CPU thread). The same weights without the option overflow for
    every construction that shears, so the test can fail."""
    start = time.perf_counter()
    y, s, loss, grads = _long_run(name, "spectral")
    assert torch.isfinite(y).all() and torch.isfinite(s).all() and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)
    # <= 1 in exact arithmetic; in float32 every factor's norm is 1 within a few ulps, so over T
    # steps the bound is about (1 + 4 eps)^T = 1.03 (measured: 1.0007 for cayley)
    assert (torch.linalg.matrix_norm(s, ord=2) <= 1.05).all()
    if name in ("identity", "scaled", "cayley_qr", "ldu"):
        y0, s0, loss0, _ = _long_run(name, None)
        assert not (torch.isfinite(y0).all() and torch.isfinite(s0).all() and torch.isfinite(loss0))
    assert time.perf_counter() - start < 120


def test_long_sequence_warning_once(monkeypatch):
    monkeypatch.setattr(mru_mod, "LONG_SEQUENCE_WARNING", 16)
    x = torch.randn(1, 17, 8)
    m = MRU(8, num_heads=2, state_size=8, state_matrix="ldu")
    with pytest.warns(RuntimeWarning, match="normalize='spectral'"):
        m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)                                                        # once per layer
        m(x[:, :16])
        MRU(8, num_heads=2, state_size=8, state_matrix="ldu", normalize="spectral")(x)
        MRU(8, num_heads=2, state_size=8, state_matrix="cayley")(x)   # orthogonal: bounded anyway


def test_bad_normalize_and_repr():
    with pytest.raises(ValueError, match=r"normalize must be one of \['spectral', 'direction'\], got 'max'"):
        MRU(8, normalize="max")
    assert "normalize='spectral'" in repr(MRU(8, normalize="spectral"))
    assert "normalize" not in repr(MRU(8))


def test_trains_from_the_identity_init():
    """At W_in = 0 every M_t = I, where sigma_max is a repeated singular value: the gradient through
    the normalisation is still finite and non-zero, and training lowers the loss."""
    torch.manual_seed(0)
    m = MRU(8, num_heads=2, state_size=8, state_matrix="ldu", normalize="spectral", element_scale=1.0)
    x, target = torch.randn(4, 12, 8), torch.randn(4, 12, 8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (m(x)[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        if not losses:
            assert m.in_proj.weight.grad.abs().max() > 0
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.9 * losses[0]
    assert m.in_proj.weight.abs().max() > 0   # the construction left the identity
