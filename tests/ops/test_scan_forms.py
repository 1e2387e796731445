"""The export-only scan forms (``scan_form.py`` beside each op's naive reference) against those
references, at T = 1, 7, 100, with and without padding. The step runs unrolled here (an eager call
of the scan HOP traces its step, about a second each); the scan HOP path is checked once by export
below, and for every form by the runtimes (tests/export/test_runtimes.py)."""
import pytest
import torch

from matrec.ops.linear_attention.naive import recurrent_form
from matrec.ops.linear_attention.scan_form import linear_attention_scan
from matrec.ops.mru_scan.naive import naive_mru_scan
from matrec.ops.mru_scan.scan_form import mru_scan_form
from matrec.ops.rnn_recurrence import recurrence_reference
from matrec.ops.rnn_recurrence.scan_form import recurrence_scan

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
    x = torch.randn(T, B, H, generator=g)
    W = torch.linalg.qr(torch.randn(H, H, generator=g))[0]
    h0 = torch.randn(B, H, generator=g)
    b = -0.1 * torch.rand(H, generator=g) if nonlinearity == "modrelu" else None
    ref = recurrence_reference(x, W, h0, b, nonlinearity)
    out, h_T = recurrence_scan(x, W, h0, b, nonlinearity, unrolled=True)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(h_T, ref[-1], **TOL)
    # padding: row 1's state after its valid prefix, unchanged by the padded steps
    keep = max(1, T // 2)
    out, h_T = recurrence_scan(x, W, h0, b, nonlinearity, mask=_mask(B, T, keep).t(), unrolled=True)
    torch.testing.assert_close(h_T[1], recurrence_reference(x[:keep, 1:], W, h0[1:], b, nonlinearity)[-1, 0], **TOL)
    torch.testing.assert_close(h_T[0], ref[-1, 0], **TOL)


@pytest.mark.parametrize("T", [1, 7, 100])
def test_mru_scan_form_matches_reference(T):
    g = torch.Generator().manual_seed(T)
    B, h, d = 2, 3, 4
    M = torch.eye(d) + 0.1 * torch.randn(B, h, T, d, d, generator=g)
    H0 = torch.eye(d) + 0.1 * torch.randn(B, h, d, d, generator=g)
    ref = naive_mru_scan(M, H0)
    H, H_T = mru_scan_form(M, H0, unrolled=True)
    torch.testing.assert_close(H, ref, **TOL)
    torch.testing.assert_close(H_T, ref[:, :, -1], **TOL)
    keep = max(1, T // 2)
    _, H_T = mru_scan_form(M, H0, _mask(B, T, keep), unrolled=True)
    torch.testing.assert_close(H_T[1], naive_mru_scan(M[1:, :, :keep], H0[1:])[0, :, -1], **TOL)


@pytest.mark.parametrize("T", [1, 7, 100])
def test_linear_attention_scan_matches_reference(T):
    g = torch.Generator().manual_seed(T)
    B, h, D = 2, 2, 3
    q, k = (torch.rand(B, h, T, D, generator=g) + 0.1 for _ in range(2))
    v = torch.randn(B, h, T, D, generator=g)
    S, z = torch.rand(B, h, D, D, generator=g), torch.rand(B, h, D, generator=g)
    ref = recurrent_form(q, k, v, S, z, 1e-6)
    got = linear_attention_scan(q, k, v, S, z, 1e-6, unrolled=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)
    keep = max(1, T // 2)
    _, S1, z1 = linear_attention_scan(q, k, v, S, z, 1e-6, _mask(B, T, keep), unrolled=True)
    _, S2, z2 = recurrent_form(q[1:, :, :keep], k[1:, :, :keep], v[1:, :, :keep], S[1:], z[1:], 1e-6)
    torch.testing.assert_close(S1[1:], S2, **TOL)
    torch.testing.assert_close(z1[1:], z2, **TOL)


def test_scan_form_exports_with_a_dynamic_length():
    """One torch.export graph serves every length: the point of the scan forms."""
    class Rec(torch.nn.Module):
        def forward(self, x, W, h0):
            return recurrence_scan(x, W, h0, None, "tanh")

    x, W, h0 = torch.randn(8, 1, 4), torch.eye(4), torch.zeros(1, 4)
    T = torch.export.Dim("T", min=1, max=1000)
    ep = torch.export.export(Rec(), (x, W, h0), dynamic_shapes=({0: T}, None, None))
    assert any("scan" in str(n.target) for n in ep.graph.nodes)
    for L in (1, 7, 100):
        x = torch.randn(L, 1, 4)
        torch.testing.assert_close(ep.module()(x, W, h0)[0], recurrence_reference(x, W, h0, None, "tanh"), **TOL)
