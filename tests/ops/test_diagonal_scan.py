"""The diagonal linear recurrence: the parallel scan against the step-by-step reference."""
import pytest
import torch

from matrec.ops.diagonal_scan import diagonal_scan, diagonal_scan_reference


def _inputs(T, invariant, complex_, seed=0, N=5):
    g = torch.Generator().manual_seed(seed)
    real = torch.float64
    if complex_:
        r = 0.5 + 0.49 * torch.rand(N if invariant else (3, T, N), generator=g, dtype=real)
        phase = 6.28 * torch.rand(r.shape, generator=g, dtype=real)
        a = torch.polar(r, phase)
        b = torch.complex(torch.randn(3, T, N, generator=g, dtype=real), torch.randn(3, T, N, generator=g, dtype=real))
        h0 = torch.complex(torch.randn(3, N, generator=g, dtype=real), torch.randn(3, N, generator=g, dtype=real))
    else:
        a = torch.rand(N if invariant else (3, T, N), generator=g, dtype=real) * 1.9 - 0.95
        b = torch.randn(3, T, N, generator=g, dtype=real)
        h0 = torch.randn(3, N, generator=g, dtype=real)
    return a, b, h0


@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("invariant", [True, False])
@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
def test_scan_equals_reference_outputs_and_gradients(T, invariant, complex_, with_h0):
    a, b, h0 = _inputs(T, invariant, complex_)
    h0 = h0 if with_h0 else None
    leaves = [t.requires_grad_() for t in (a, b, h0) if t is not None]
    ref = diagonal_scan_reference(a, b, h0)
    out = diagonal_scan(a, b, h0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    if ref.is_complex():
        cot = torch.complex(cot, torch.randn(ref.shape, generator=g, dtype=torch.float64))
    # a real loss of the complex output: <cot, h> real part
    # (at T = 1 without h0, a is not used: None from the scan, zeros from the reference's 0 * a)
    g_ref = torch.autograd.grad((ref * cot.conj()).real.sum(), leaves, allow_unused=True)
    g_out = torch.autograd.grad((out * cot.conj()).real.sum(), leaves, allow_unused=True)
    for x, y, leaf in zip(g_out, g_ref, leaves):
        x = torch.zeros_like(leaf) if x is None else x
        y = torch.zeros_like(leaf) if y is None else y
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_reference_is_the_recurrence():
    a = torch.tensor([0.5, -1.0])
    b = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])  # [1, 3, 2]
    h = diagonal_scan_reference(a, b, torch.tensor([[4.0, 1.0]]))
    # unit 0: 0.5*4+1 = 3, 0.5*3+2 = 3.5, 0.5*3.5 = 1.75; unit 1: -1+1 = 0, 0, 3
    torch.testing.assert_close(h, torch.tensor([[[3.0, 0.0], [3.5, 0.0], [1.75, 3.0]]]))
    torch.testing.assert_close(diagonal_scan(a, b, torch.tensor([[4.0, 1.0]])), h)


def test_chunks_with_carried_state_equal_one_call():
    a, b, h0 = _inputs(50, True, True)
    full = diagonal_scan(a, b, h0)
    first = diagonal_scan(a, b[:, :17], h0)
    second = diagonal_scan(a, b[:, 17:], first[:, -1])
    torch.testing.assert_close(torch.cat((first, second), 1), full, rtol=1e-12, atol=1e-12)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"a must be \[N\]"):
        diagonal_scan(torch.ones(2, 3), torch.ones(4, 5, 3))
    with pytest.raises(ValueError, match="share the last dim"):
        diagonal_scan(torch.ones(2), torch.ones(4, 5, 3))
    with pytest.raises(ValueError, match=r"h0 must be \[..., N\]"):
        diagonal_scan(torch.ones(3), torch.ones(4, 5, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="time on dim -2"):
        diagonal_scan_reference(torch.ones(3), torch.ones(3))
