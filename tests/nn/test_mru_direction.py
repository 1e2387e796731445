"""The direction scan (matrec.ops.mru_scan.direction_scan) and what MRU(normalize="direction") does that
"spectral" does not (docs/mru.md, "Reading out the state's direction"). The layer against its reference on
every backend, gradcheck and streaming are in test_mru_normalize.py, for both normalisations."""
import math
import warnings

import pytest
import torch

from matrec.nn.mru import MRU
from matrec.ops.mru_scan import SCAN_BACKENDS, direction_scan, naive_direction_scan

from test_mru_normalize import randomised

CPU_BACKENDS = [b for b in SCAN_BACKENDS.names() if b != "triton"]


def test_naive_is_the_rescaled_product():
    """The definition against the plain product divided by its norm afterwards (float64, short T)."""
    g = torch.Generator().manual_seed(0)
    M = torch.eye(3, dtype=torch.float64) + 0.5 * torch.randn(2, 9, 3, 3, generator=g, dtype=torch.float64)
    H = naive_direction_scan(M)
    plain = torch.linalg.multi_dot  # the product written out
    for t in range(9):
        P = plain([M[0, s] for s in range(t + 1)]) if t else M[0, 0]
        torch.testing.assert_close(H[0, t], P * math.sqrt(3) / P.norm())
    torch.testing.assert_close(H.flatten(-2).norm(dim=-1), torch.full((2, 9), math.sqrt(3), dtype=torch.float64))


@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("block", [1, 7, 32, 256])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_blocks_and_backends_match_the_definition(backend, block, T):
    """Outputs and gradients (states, H_0) of the blocked scan against the step-by-step one,
    with packed-document resets, float64: the block length changes nothing."""
    g = torch.Generator().manual_seed(T)
    M = (torch.eye(2, dtype=torch.float64) + 0.7 * torch.randn(3, T, 2, 2, generator=g, dtype=torch.float64)
         ).requires_grad_()
    h0 = torch.randn(3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    resets = torch.rand(3, T, generator=g) < 0.1
    w = torch.randn(3, T, 2, 2, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda: direction_scan(M, h0, backend=backend, resets=resets, block=block),
               lambda: naive_direction_scan(M, h0, resets)):
        H = fn()
        results.append([H, *torch.autograd.grad((H * w).sum(), [M, h0])])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_orthogonal_constructions_are_unchanged():
    """||Q||_F = sqrt(d) for every orthogonal Q: for cayley the option is the plain layer."""
    m = randomised(MRU(12, num_heads=2, state_size=18, state_matrix="cayley", element_scale=1.0,
                       dtype=torch.float64), 0.5)
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    y, s = m(x)
    m.normalize = "direction"
    y2, s2 = m(x)
    torch.testing.assert_close(y2, y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s2, s, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["ldu", "identity"])
def test_a_carried_state_does_not_fade_at_65536_tokens(name):
    """float32, one forward + backward over 65,536 tokens: with "spectral" the same weights' state
    fades below 1e-6 (the layer stops depending on the input), with "direction" it keeps norm sqrt(d)
    and the outputs, loss and gradients are finite and still vary with the input at the end."""
    torch.manual_seed(0)
    x = torch.randn(1, 65536, 8)
    finals = {}
    for normalize in ("spectral", "direction"):
        m = randomised(MRU(8, num_heads=2, state_size=8, state_matrix=name, normalize=normalize,
                           element_scale=1.0), 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y, s = m(x)
        finals[normalize] = (y, s.flatten(-2).norm(dim=-1))
        if normalize == "direction":
            loss = y.square().mean()
            loss.backward()
            assert torch.isfinite(y).all() and torch.isfinite(loss)
            assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert (finals["spectral"][1] < 1e-6).all()
    torch.testing.assert_close(finals["direction"][1], torch.full((1, 2), math.sqrt(2)))
    tail = finals["direction"][0][0, -100:]                       # [100, E]
    assert tail.std(0).min() > 1e-3 * tail.abs().mean()
