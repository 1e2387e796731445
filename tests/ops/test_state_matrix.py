"""Input-state constructions: identity at zero, each guarantee, gradients, registry, errors."""
import pytest
import torch

import matrec
from matrec.ops.orthogonal import orthogonality_error
from matrec.ops.state_matrix import STATE_MATRICES, StateMatrix, state_matrix, state_matrix_numel

NAMES = ["identity", "scaled", "cayley", "expm", "householder", "cayley_qr", "ldu", "ldu_ns"]
ORTHOGONAL = ["cayley", "expm", "householder"]
DET_ONE = ["expm", "cayley_qr", "ldu", "ldu_ns"]


def raw(name, d, batch=(4, 3), scale=0.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + d)
    return torch.randn(*batch, state_matrix_numel(name, d), generator=g, dtype=dtype) * scale


def test_registry_holds_all_eight():
    assert STATE_MATRICES.names() == NAMES
    assert matrec.STATE_MATRICES is STATE_MATRICES and matrec.state_matrix is state_matrix


@pytest.mark.parametrize("name", NAMES)
def test_numel(name):
    for d in [1, 2, 5, 16]:
        want = d * (d - 1) // 2 if name in ORTHOGONAL else d * d
        assert state_matrix_numel(name, d) == want


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_at_zero(name, d, dtype):
    x = torch.zeros(2, 3, state_matrix_numel(name, d), dtype=dtype)
    M = state_matrix(name, x, d)
    assert M.shape == (2, 3, d, d) and M.dtype == dtype
    assert torch.equal(M, torch.eye(d, dtype=dtype).expand_as(M))


@pytest.mark.parametrize("name", ORTHOGONAL)
@pytest.mark.parametrize("d", [2, 8, 16])
def test_orthogonal(name, d):
    M = state_matrix(name, raw(name, d, scale=1.0), d)  # float32
    assert orthogonality_error(M).max() < 1e-5


@pytest.mark.parametrize("name", DET_ONE + ["scaled"])
@pytest.mark.parametrize("d", [2, 8, 16])
def test_unit_determinant(name, d):
    M = state_matrix(name, raw(name, d), d)  # float32
    det = torch.linalg.det(M.double())
    if name == "scaled":
        det = det.abs()
    # float32 matrices: the determinant's rounding error grows with d (1.01e-4 seen for scaled, d = 16,
    # on one CPU), while a construction that misses det 1 is off by far more than 1e-3
    assert (det - 1).abs().max() < (1e-4 if d < 16 else 3e-4)
    if name in ("cayley_qr", "ldu", "ldu_ns"):  # these can shear: not orthogonal in general
        assert orthogonality_error(M).max() > 1e-2


def test_identity_construction_is_unconstrained():
    M = state_matrix("identity", raw("identity", 4), 4)
    assert (torch.linalg.det(M.double()).abs() - 1).abs().max() > 1e-2


def test_ldu_ns_closer_to_orthogonal_than_ldu():
    x = raw("ldu", 8, batch=(64,), scale=0.3)
    plain = orthogonality_error(state_matrix("ldu", x, 8))
    ns = orthogonality_error(state_matrix("ldu_ns", x, 8))
    assert ns.mean() < 0.7 * plain.mean()


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    d = 3
    x = raw(name, d, batch=(2,), scale=0.3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: state_matrix(name, v, d), (x,))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_finite_at_zero(name):
    x = torch.zeros(2, state_matrix_numel(name, 4), requires_grad=True)
    state_matrix(name, x, 4).square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_user_construction(monkeypatch):
    def diagonal(x, d):  # exp of a diagonal: identity at zero
        return torch.diag_embed(x.exp())

    monkeypatch.setitem(STATE_MATRICES._items, "diag", StateMatrix(diagonal, lambda d: d, "det > 0"))
    assert state_matrix_numel("diag", 5) == 5
    assert torch.equal(state_matrix("diag", torch.zeros(5), 5), torch.eye(5))


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: state_matrix("nope", torch.zeros(4), 2), ValueError, r"state_matrix must be one of \['identity'"),
        (lambda: state_matrix_numel("nope", 2), ValueError, r"state_matrix must be one of \[.*got 'nope'"),
        (lambda: state_matrix("ldu", torch.zeros(3, 5), 2), ValueError, r"x must have shape \[\.\.\., 4\]"),
        (lambda: state_matrix("ldu", torch.zeros(4, dtype=torch.int64), 2), TypeError,
            "x must have a floating-point dtype"),
        (lambda: state_matrix("ldu", [0.0] * 4, 2), TypeError, "x must be a torch.Tensor"),
        (lambda: state_matrix("ldu", torch.zeros(4), 0), ValueError, "d must be an int >= 1"),
        (lambda: state_matrix_numel("ldu", 2.5), ValueError, "d must be an int >= 1"),
        # I - A is numerically singular only when x dwarfs I: named as x, not a raw solver error
        (lambda: state_matrix("cayley", torch.full((2, 21), 1e30), 7), ValueError,
         r"x is too large for state_matrix='cayley' in torch.float32 \(max \|x\| = 1e\+30\)"),
        (lambda: state_matrix("cayley_qr", torch.full((2, 49), 1e19, dtype=torch.float64), 7), ValueError,
         "x is too large for state_matrix='cayley_qr'"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def _spec_formula(name, x, d):
    """The table of docs/design.md §3, written out independently of the library (explicit inverses and loops)."""
    eye = torch.eye(d, dtype=x.dtype)
    if name in ORTHOGONAL:
        L = torch.zeros(d, d, dtype=x.dtype)
        L[tuple(torch.tril_indices(d, d, -1))] = x
        A = L - L.T
        if name == "cayley":
            return torch.linalg.inv(eye - A) @ (eye + A)
        if name == "expm":
            return torch.linalg.matrix_exp(A)
        Q = eye  # householder: reflections from the unit-lower-triangular columns, tau = 2/|v|^2
        for k in range(d):
            v = (L + eye)[:, k]
            Q = Q @ (eye - 2.0 / v.dot(v) * torch.outer(v, v))
        return Q * (-1) ** d  # the sign that makes x = 0 give I (a product of d reflections is (-1)^d I)
    X = x.reshape(d, d)
    if name == "identity":
        return X + eye
    if name == "scaled":
        return (X + eye) / torch.linalg.det(X + eye).abs() ** (1 / d)
    diag = torch.diagonal(X)
    D = torch.diag(torch.exp(diag - diag.mean()))
    if name == "cayley_qr":
        A = X.tril(-1) - X.tril(-1).T
        return torch.linalg.inv(eye - A) @ (eye + A) @ (X.triu(1) + D)
    ldu = (X.tril(-1) + D.sqrt()) @ (X.triu(1) + D.sqrt())
    if name == "ldu":
        return ldu
    # ldu_ns: one Newton-Schulz step A (3I - A^T A) / 2, damped by 1/max(1, |A^T A - I|_F), det rescaled
    E = eye - ldu.T @ ldu
    step = ldu @ (eye + 0.5 / max(1.0, float(torch.linalg.norm(E))) * E)
    return step / torch.linalg.det(step).abs() ** (1 / d)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d", [1, 3, 5])
def test_matches_spec_formula(name, d):
    for seed, scale in ((0, 0.3), (1, 1.5)):  # 1.5: far enough from I that ldu_ns's damping engages
        x = raw(name, d, batch=(), scale=scale, dtype=torch.float64, seed=seed)
        torch.testing.assert_close(state_matrix(name, x, d), _spec_formula(name, x, d), rtol=1e-10, atol=1e-10)
