import pytest
import torch

from matrec.ops.orthogonal import (
    ORTHOGONAL_MAPS,
    lower_numel,
    lower_to_square,
    orthogonal_from,
    orthogonality_error,
    project_orthogonal,
    skew,
)
from matrec.registry import Registry

MAPS = ORTHOGONAL_MAPS.names()


def test_registry_lists_three_maps():
    assert set(MAPS) == {"expm", "cayley", "householder"}


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_zero_gives_identity_and_random_is_orthogonal(name, n):
    zero = torch.zeros(3, n, n)
    assert torch.equal(orthogonal_from(zero, name), torch.eye(n).expand(3, n, n))
    X = torch.randn(4, 2, n, n)
    Q = orthogonal_from(X, name)
    assert Q.shape == X.shape
    assert orthogonality_error(Q).max() < 1e-5
    Q64 = orthogonal_from(X.double(), name)
    assert orthogonality_error(Q64).max() < 1e-12


@pytest.mark.parametrize("name", MAPS)
def test_reads_only_the_strict_lower_triangle(name):
    X = torch.randn(6, 6, dtype=torch.float64)
    assert torch.allclose(orthogonal_from(X, name), orthogonal_from(X.tril(-1), name))


@pytest.mark.parametrize("name", MAPS)
def test_gradcheck(name):
    X = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: orthogonal_from(x, name), (X,))


def test_expm_and_cayley_are_rotations():
    X = torch.randn(10, 5, 5, dtype=torch.float64)
    for name in ("expm", "cayley"):
        assert torch.allclose(torch.linalg.det(orthogonal_from(X, name)), torch.ones(10, dtype=torch.float64))


def test_lower_to_square_and_skew():
    n = 4
    x = torch.arange(1.0, lower_numel(n) + 1)
    L = lower_to_square(x, n)
    assert torch.equal(L.triu(), torch.zeros(n, n))
    assert torch.equal(L[L != 0], x)  # row-major order of the strict lower triangle
    A = skew(L)
    assert torch.equal(A, -A.T)
    with pytest.raises(ValueError, match="n\\(n-1\\)/2 = 6"):
        lower_to_square(torch.zeros(5), 4)


def test_project_orthogonal_is_nearest_and_idempotent():
    W = torch.randn(8, 8)
    Q = project_orthogonal(W)
    assert orthogonality_error(Q) < 1e-5
    assert torch.allclose(project_orthogonal(Q), Q, atol=1e-6)
    # the polar factor: W = Q S with S = Q^T W symmetric positive semi-definite ...
    S = Q.double().T @ W.double()
    torch.testing.assert_close(S, S.T, atol=1e-5, rtol=0)
    assert torch.linalg.eigvalsh(S).min() > -1e-5
    # ... hence no orthogonal matrix is nearer to W
    for R in orthogonal_from(torch.randn(50, 8, 8), "expm"):
        assert torch.linalg.norm(W - Q) <= torch.linalg.norm(W - R) + 1e-5


def test_unknown_map_names_argument_and_choices():
    with pytest.raises(ValueError,
        match=r"orthogonal_map must be one of \['expm', 'cayley', 'householder'\], got 'qr'"):
        orthogonal_from(torch.zeros(2, 2), "qr")


def test_registry_register_and_duplicates():
    reg = Registry("widget", argument="widget")
    reg.register("a", 1)

    @reg.register("b")
    def b():
        return 2

    assert reg.get("a") == 1 and reg.get("b") is b and "a" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 3)
    reg.register("a", 3, overwrite=True)
    assert reg.get("a") == 3
    with pytest.raises(ValueError, match=r"widget must be one of \['a', 'b'\], got 'z'"):
        reg.get("z")
