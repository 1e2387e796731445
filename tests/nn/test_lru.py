"""The Linear Recurrent Unit: initialisation on its ring, the scan against a step-by-step LRU."""
import math

import pytest
import torch

import matrec
from matrec.models import num_parameters
from matrec.nn.lru import LRU, LRUMixer
from matrec.ops.diagonal_scan import diagonal_scan_reference


def stepwise(lru: LRU, x: torch.Tensor, h=None):
    """The LRU one step at a time, written from its definition."""
    lam = torch.polar(torch.exp(-lru.nu_log.exp()), lru.theta_log.exp()).to(torch.complex128)
    gamma = lru.gamma_log.exp()
    B = torch.complex(lru.B_re, lru.B_im)
    C = torch.complex(lru.C_re, lru.C_im)
    h = torch.zeros(x.shape[0], lru.state_size, dtype=torch.complex128) if h is None else h
    ys = []
    for t in range(x.shape[1]):
        h = lam * h + gamma * (B @ x[:, t].to(B.dtype).T).T
        ys.append((C @ h.T).T.real + lru.D * x[:, t])
    return torch.stack(ys, 1), h


def test_initial_eigenvalues_lie_on_the_ring():
    torch.manual_seed(0)
    lru = LRU(8, state_size=4000, r_min=0.5, r_max=0.99, max_phase=math.pi / 4)
    lam = lru.lambdas(torch.complex128)
    assert lam.abs().min() >= 0.5 - 1e-9 and lam.abs().max() <= 0.99 + 1e-9
    assert lam.angle().min() >= 0 and lam.angle().max() <= math.pi / 4 + 1e-9
    # |lambda|^2 uniform on [r_min^2, r_max^2]
    assert abs(lam.abs().square().mean().item() - (0.25 + 0.9801) / 2) < 0.02
    # gamma normalises: gamma^2 = 1 - |lambda|^2
    torch.testing.assert_close(lru.gamma_log.double().exp().square(), 1 - lam.abs().square(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 7, 100])
def test_scan_equals_stepwise_outputs_and_gradients(T):
    torch.manual_seed(T)
    lru = LRU(6, state_size=5).double()
    x = torch.randn(2, T, 6, dtype=torch.float64, requires_grad=True)
    h0 = torch.complex(torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64))
    y, h = lru(x, h0)
    y_ref, h_ref = stepwise(lru, x, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    cot = torch.randn_like(y)
    leaves = [x, *lru.parameters()]
    g = torch.autograd.grad((y * cot).sum(), leaves)
    g_ref = torch.autograd.grad((y_ref * cot).sum(), leaves)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # the reference scan gives the same through the layer's own path
    y2, _ = lru(x, h0, scan=diagonal_scan_reference)
    torch.testing.assert_close(y2, y, rtol=1e-10, atol=1e-10)


def test_float32_runs_in_complex64_and_returns_float32():
    lru = LRU(4)
    y, h = lru(torch.randn(2, 3, 4))
    assert y.dtype == torch.float32 and h.dtype == torch.complex64


def test_mixer_model_and_matched_size():
    torch.manual_seed(0)
    model = matrec.build_model("lru", vocab_size=10, output_size=9, d_model=23, n_layers=2, r_max=0.9999)
    assert isinstance(model.layers[0].mixer, LRUMixer)
    assert model.layers[0].mixer.lru.r_max == 0.9999
    out, state = model(torch.randint(0, 10, (2, 7)))
    assert out.shape == (2, 7, 9) and state[0].shape == (2, 23)
    assert 13_000 < num_parameters(model) < 16_000  # within ~10 % of MORNN hidden 128 (14,089)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"r_max must be a finite number in \[0, 1\)"):
        LRU(4, r_min=0.9, r_max=1.0)
    with pytest.raises(ValueError, match="0 <= r_min < r_max < 1"):
        LRU(4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="r_min must be a finite number"):
        LRU(4, r_min="0.5")
    with pytest.raises(ValueError, match="max_phase must be a finite number > 0"):
        LRU(4, max_phase=0)
    with pytest.raises(ValueError, match="state_size must be an int"):
        LRU(4, state_size=0)
    with pytest.raises(ValueError, match=r"state must be None or the complex LRU state \[2, 4\]"):
        LRU(4)(torch.randn(2, 3, 4), torch.zeros(2, 4))
