"""Every op's export-safe backend (the ``export_safe`` entry of its own registry: the definition's
step in PyTorch's scan op) against the op's reference, at T = 1, 7, 100, with and without padding;
and ``export_safe()`` selecting it whatever name the caller passed. Outside ``export_safe()`` the
step loop runs unrolled (an eager call of the scan op traces its step, about a second each); the
scan op itself is checked once by export below, and for every layer by tests/export."""
import pytest
import torch

from matrec.ops.backends import NoExportForm, export_safe
from matrec.ops.linear_attention import LINEAR_ATTENTION_FORMS
from matrec.ops.linear_attention.naive import recurrent_form
from matrec.ops.mru_scan import SCAN_BACKENDS, mru_scan, naive_mru_scan
from matrec.ops.rnn_recurrence import RECURRENCE_BACKENDS, recurrence, recurrence_reference
from matrec.ops.state_matrix import STATE_MATRICES, StateMatrix, state_matrix

TOL = dict(atol=1e-5, rtol=1e-5)


def _mask(B, T, keep):
    """Row 0 all valid, row 1 valid for its first ``keep`` steps (padding at the end)."""
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, keep:] = False
    return m


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "modrelu", "identity"])
@pytest.mark.parametrize("T", [1, 7, 100])
def test_recurrence_scan_matches_reference(nonlinearity, T):
    g = torch.Generator().manual_seed(T)
    B, H = 2, 5
    x = torch.randn(T, B, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))[0].requires_grad_()
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    b = -0.1 * torch.rand(H, generator=g, dtype=torch.float64) if nonlinearity == "modrelu" else None
    ref = recurrence_reference(x, W, h0, b, nonlinearity)
    out = recurrence(x, W, h0, b, nonlinearity, backend="scan")
    torch.testing.assert_close(out, ref)
    for a, r in zip(torch.autograd.grad(out.sum(), (x, W)), torch.autograd.grad(ref.sum(), (x, W))):
        torch.testing.assert_close(a, r)
    # padding: row 1's state after its valid prefix, unchanged by the padded steps
    keep = max(1, T // 2)
    mask = _mask(B, T, keep).t()
    out = recurrence(x, W, h0, b, nonlinearity, backend="scan", mask=mask)
    torch.testing.assert_close(out, recurrence_reference(x, W, h0, b, nonlinearity, mask=mask))
    alone = recurrence_reference(x[:keep, 1:], W, h0[1:], b, nonlinearity)[-1, 0]
    torch.testing.assert_close(out[-1, 1], alone)
    torch.testing.assert_close(out[-1, 0], ref[-1, 0])


def test_recurrence_mask_needs_a_masking_backend():
    x, W = torch.randn(3, 2, 4), torch.eye(4)
    with pytest.raises(ValueError, match="mask is not supported by backend='torch'"):
        recurrence(x, W, None, None, "tanh", backend="torch", mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be None or a bool tensor \[T, B\]"):
        recurrence(x, W, None, None, "tanh", mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("T", [1, 7, 100])
def test_mru_scan_backend_matches_reference(T):
    g = torch.Generator().manual_seed(T)
    B, h, d = 2, 3, 4
    M = (torch.eye(d) + 0.1 * torch.randn(B, h, T, d, d, generator=g, dtype=torch.float64)).requires_grad_()
    H0 = (torch.eye(d) + 0.1 * torch.randn(B, h, d, d, generator=g, dtype=torch.float64)).requires_grad_()
    ref = naive_mru_scan(M, H0)
    H = mru_scan(M, H0, backend="scan")
    torch.testing.assert_close(H, ref)
    w = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad((H * w).sum(), (M, H0)), torch.autograd.grad((ref * w).sum(), (M, H0))):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(mru_scan(M, backend="scan"), naive_mru_scan(M))


@pytest.mark.parametrize("T", [1, 7, 100])
def test_linear_attention_scan_matches_reference(T):
    g = torch.Generator().manual_seed(T)
    B, h, D = 2, 2, 3
    q, k = (torch.rand(B, h, T, D, generator=g) + 0.1 for _ in range(2))
    v = torch.randn(B, h, T, D, generator=g)
    S, z = torch.rand(B, h, D, D, generator=g), torch.rand(B, h, D, generator=g)
    ref = recurrent_form(q, k, v, S, z, 1e-6)
    got = LINEAR_ATTENTION_FORMS.get("scan")(q, k, v, S, z, 1e-6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_export_safe_selects_each_registry_entry():
    for registry, name in ((SCAN_BACKENDS, "sklansky"), (RECURRENCE_BACKENDS, "torch"),
                           (LINEAR_ATTENTION_FORMS, "chunked")):
        assert registry.resolve(name, "cpu", **_context(registry))[0] == name
        with export_safe():
            assert registry.resolve(name, "cpu", **_context(registry))[0] == registry.export_safe == "scan"


def _context(registry):
    if registry is SCAN_BACKENDS:
        return dict(T=7, batch=1, d=2, dtype=torch.float32, io_dtype=torch.float32)
    if registry is RECURRENCE_BACKENDS:
        return dict(xproj=torch.zeros(7, 1, 2), nonlinearity="tanh")
    return dict(T=7)


def test_a_construction_without_an_export_form_is_refused_by_name():
    STATE_MATRICES.register("mine_no_form", StateMatrix(lambda x, d: x.unflatten(-1, (d, d)), lambda d: d * d))
    try:
        state_matrix("mine_no_form", torch.zeros(4), 2)  # eagerly it runs
        with export_safe(), pytest.raises(NoExportForm, match="state_matrix='mine_no_form' has no export form"):
            state_matrix("mine_no_form", torch.zeros(4), 2)
    finally:
        STATE_MATRICES.unregister("mine_no_form")


def test_scan_backend_exports_with_a_dynamic_length():
    """One torch.export graph serves every length: the point of the export-safe backends."""
    class Rec(torch.nn.Module):
        def forward(self, x, W, h0):
            with export_safe():
                return recurrence(x, W, h0, None, "tanh", backend="torch")

    x, W, h0 = torch.randn(8, 1, 4), torch.eye(4), torch.zeros(1, 4)
    T = torch.export.Dim("T", min=1, max=1000)
    ep = torch.export.export(Rec(), (x, W, h0), dynamic_shapes=({0: T}, None, None))
    assert any("scan" in str(n.target) for n in ep.graph.nodes)
    for L in (1, 7, 100):
        x = torch.randn(L, 1, 4)
        torch.testing.assert_close(ep.module()(x, W, h0), recurrence_reference(x, W, h0, None, "tanh"), **TOL)
