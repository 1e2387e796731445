"""The export-safe forms of the state constructions (each registry entry's ``export``, run inside
``export_safe()``) against their references: every construction on many random inputs, small to
large, and each elementwise primitive of ops/export_linalg.py against the torch.linalg one it
stands in for. (That they export: tests/export.)"""
import pytest
import torch

from matrec.ops.backends import export_safe
from matrec.ops.export_linalg import EXPM_MAX_SQUARINGS, householder_product, logabsdet, matrix_exp, solve
from matrec.ops.state_matrix import STATE_MATRICES, StateMatrix, state_matrix, state_matrix_numel

NAMES = STATE_MATRICES.names()


def state_matrix_form(name, x, d):
    with export_safe():
        return state_matrix(name, x, d)


def test_every_construction_has_a_form():
    assert all(STATE_MATRICES.get(n).export is not None for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
def test_form_as_accurate_as_the_reference(name, d):
    """Against the reference in float64 (the truth), the float32 form's largest error relative to
    the matrix's scale, over 6T random inputs, is within 2x the float32 reference's plus 1e-6.
    (Per matrix the two round differently: where the construction is ill-conditioned either may be
    the worse one.) Raw elements up to 2: the exp in ldu/cayley_qr/ldu_ns overflows float32 beyond."""
    for T, scale in ((1, 0.01), (7, 0.5), (100, 2.0)):
        g = torch.Generator().manual_seed(d * 1000 + T)
        x = torch.randn(2, 3, T, state_matrix_numel(name, d), generator=g) * scale  # [B, h, T, n]
        form = state_matrix_form(name, x, d)
        assert form.shape == (2, 3, T, d, d) and form.dtype == torch.float32
        truth = state_matrix(name, x.double(), d)
        size = 1 + truth.abs().amax(dim=(-2, -1))  # [B, h, T]

        def rel_err(M):
            return ((M.double() - truth).abs().amax(dim=(-2, -1)) / size).max().item()

        err, ref_err = rel_err(form), rel_err(state_matrix(name, x, d))
        assert err <= 2 * ref_err + 1e-6, (name, d, T, scale, err, ref_err)
        if scale <= 0.5:  # where the float32 reference itself is exact to 1e-6
            torch.testing.assert_close(form, state_matrix(name, x, d), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d", [1, 3, 8])
def test_exactly_identity_at_zero(name, d):
    M = state_matrix_form(name, torch.zeros(4, state_matrix_numel(name, d)), d)
    assert torch.equal(M, torch.eye(d).expand_as(M))


@pytest.mark.parametrize("d", [1, 2, 5, 9])
def test_solve_and_logabsdet_match_linalg_with_pivoting(d):
    g = torch.Generator().manual_seed(d)
    M = torch.randn(50, d, d, generator=g, dtype=torch.float64)
    M[0] = torch.eye(d, dtype=torch.float64).roll(1, dims=0)  # zero diagonal: needs row swaps
    M[1, :, 0] *= 1e-9  # a tiny first column: pivots without swaps would be tiny
    B = torch.randn(50, d, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(solve(M, B), torch.linalg.solve(M, B), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(logabsdet(M), torch.linalg.slogdet(M).logabsdet, atol=1e-9, rtol=1e-9)
    if d > 1:  # a singular matrix: -inf, as slogdet
        assert logabsdet(torch.ones(d, d)).item() == float("-inf")


def test_matrix_exp_over_norms():
    """Skew (the expm construction) and general matrices with 1-norms 1e-3 .. 1e5, float32, against
    float64 matrix_exp: relative error within 2x the float32 reference's, plus 1e-6."""
    g = torch.Generator().manual_seed(0)
    for norm in (1e-3, 1e-1, 1.0, 10.0, 1e3, 1e5):
        assert norm < 2.0 ** EXPM_MAX_SQUARINGS
        for skew in (True, False):
            A = torch.randn(20, 5, 5, generator=g, dtype=torch.float64)
            if skew:
                A = A - A.mT
            else:  # general: keep exp(A) finite in float32 (eigenvalues' real parts ~ 0)
                A = A - A.mT + 0.5 * torch.eye(5, dtype=torch.float64) * torch.randn(20, 1, 1, generator=g)
                A = A / A.abs().sum(dim=-2).amax(dim=-1)[:, None, None] * min(norm, 30.0)
            if skew:
                A = A / A.abs().sum(dim=-2).amax(dim=-1)[:, None, None] * norm
            truth = torch.linalg.matrix_exp(A)
            scale = truth.abs().amax() + 1
            err = (matrix_exp(A.float()).double() - truth).abs().max() / scale
            ref_err = (torch.linalg.matrix_exp(A.float()).double() - truth).abs().max() / scale
            assert err <= 2 * ref_err + 1e-6, (norm, skew, err.item(), ref_err.item())


@pytest.mark.parametrize("d", [1, 2, 4, 7])
def test_householder_product_matches_linalg(d):
    g = torch.Generator().manual_seed(d)
    V = torch.randn(30, d, d, generator=g, dtype=torch.float64)  # upper part and diagonal ignored
    tau = torch.rand(30, d, generator=g, dtype=torch.float64) * 2
    torch.testing.assert_close(householder_product(V, tau), torch.linalg.householder_product(V, tau),
                               atol=1e-12, rtol=1e-12)


def test_construction_without_a_form_and_bad_shape_refused():
    STATE_MATRICES.register("mine_no_form", StateMatrix(lambda x, d: x, lambda d: d * d))
    try:
        with pytest.raises(NotImplementedError, match="mine_no_form"):
            state_matrix_form("mine_no_form", torch.zeros(4), 2)
    finally:
        STATE_MATRICES.unregister("mine_no_form")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 3\]"):
        state_matrix_form("cayley", torch.zeros(2, 4), 3)
