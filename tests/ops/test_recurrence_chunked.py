"""The chunked parallel form of the identity recurrence (backend "chunked") against the plain loop."""
import math

import pytest
import torch

from matrec.nn.mornn import MORNN, _rotation_blocks, henaff_init
from matrec.ops.orthogonal import project_orthogonal
from matrec.ops.rnn_recurrence import chunked as rec
from matrec.ops.rnn_recurrence import dispatch, recurrence, recurrence_reference

# Relative (norm-wise) tolerances, ~5-20x above the worst error measured over this file's grid
# (T <= 1000, H <= 70, all four kinds of W). float64: only the summation order differs from the loop
# (worst 5e-14). float32: both sides keep a float32 state; the loop rounds once per step, the chunked
# form once per chunk product and carry, with W's powers rounded once from float64 (worst 2.8e-6).
# bfloat16: that float32 computation rounded to bfloat16 at the end, where values straddling a
# rounding boundary differ by one ulp: the bound is bfloat16's eps 2^-8 (worst 2.3e-4).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2 ** -8}


def rel_err(a, r):
    return ((a.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item()


def orthogonal(kind, H, g):
    """The recurrent matrices the form must handle, repeated eigenvalues included (float64)."""
    if kind == "random":
        return project_orthogonal(torch.randn(H, H, generator=g, dtype=torch.float64))
    if kind == "identity":  # every eigenvalue 1, multiplicity H
        return torch.eye(H, dtype=torch.float64)
    if kind == "henaff":  # MORNN's default init: 2x2 rotation blocks, angles U[-pi, pi]
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=g)))
            return henaff_init(H)
    if kind == "repeated":  # one angle in every block (eigenvalues e^{+-i 0.7}, multiplicity H/2), rotated
        R = _rotation_blocks(torch.full((H // 2,), 0.7, dtype=torch.float64), H)
        Q = project_orthogonal(torch.randn(H, H, generator=g, dtype=torch.float64))
        return Q @ R @ Q.t()
    raise ValueError(kind)


def make(T, B, H, dtype, with_h0, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(T, B, H, generator=g).to(dtype).requires_grad_()
    W = orthogonal(kind, H, g).to(wdt).requires_grad_()
    h0 = torch.randn(B, H, generator=g).to(dtype).requires_grad_() if with_h0 else None
    return x, W, h0


def check_against_reference(x, W, h0, backend="chunked"):
    inputs = [t for t in (x, W, h0) if t is not None]
    out = recurrence(x, W, h0, None, "identity", backend=backend)
    ref = recurrence_reference(x, W, h0, None, "identity")
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = TOL[x.dtype]
    assert rel_err(out, ref) < tol
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    for a, r, t in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad), inputs):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert rel_err(a, r) < TOL[t.dtype]


@pytest.mark.parametrize("T", [1, 7, 100, 1000])
@pytest.mark.parametrize("H", [1, 2, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_reference(T, H, dtype, with_h0):
    check_against_reference(*make(T, 3, H, dtype, with_h0))


@pytest.mark.parametrize("kind", ["random", "identity", "henaff", "repeated"])
@pytest.mark.parametrize("T,H", [(7, 5), (1000, 6), (100, 33), (100, 70)])  # H > 64: chunks of 8
def test_orthogonal_kinds(kind, T, H):
    check_against_reference(*make(T, 2, H, torch.float32, True, kind))
    check_against_reference(*make(T, 2, H, torch.float64, True, kind))


@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [4, 8, 9])
def test_chunk_boundaries(monkeypatch, chunk, T):
    """Whole chunks only, a partial last chunk, one step per chunk: every path of the padding."""
    monkeypatch.setattr(rec, "CHUNK_SIZE", chunk)
    check_against_reference(*make(T, 2, 5, torch.float64, True, "henaff"))


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(rec, "CHUNK_SIZE", 2)  # T = 5: two full chunks and a partial one
    x, W, h0 = make(5, 2, 3, torch.float64, True, seed=3)
    assert torch.autograd.gradcheck(lambda *a: recurrence(*a, None, "identity", backend="chunked"), (x, W, h0))
    # W's gradient at a non-orthogonal W with well-conditioned powers (the op only needs those)
    W2 = (0.9 * W.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: recurrence(*a, None, "identity", backend="chunked"), (x, W2, h0))


def test_only_some_inputs_need_grad():
    x, W, h0 = make(30, 2, 4, torch.float32, True)
    W.requires_grad_(False)
    (gx,) = torch.autograd.grad(recurrence(x, W, h0.detach(), None, "identity", backend="chunked")[-1].sum(), [x])
    (rx,) = torch.autograd.grad(recurrence_reference(x, W, h0.detach(), None, "identity")[-1].sum(), [x])
    assert rel_err(gx, rx) < TOL[torch.float32]


def test_refuses_what_it_cannot_do():
    x, W, h0 = make(20, 2, 5, torch.float32, True)
    with pytest.raises(ValueError, match="nonlinearity 'modrelu' is not supported by backend='chunked'"):
        recurrence(x, W, h0, torch.zeros(5), "modrelu", backend="chunked")
    with pytest.raises(ValueError, match="nonlinearity 'tanh' is not supported by backend='chunked'"):
        recurrence(x, W, h0, None, "tanh", backend="chunked")
    g = torch.Generator().manual_seed(0)
    not_orthogonal = torch.randn(5, 5, generator=g)  # non-normal, eigenvalues of spread magnitude
    contracting = torch.diag(torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0]))  # 2^16 between W^-16 and W^16
    for bad in (not_orthogonal, contracting, torch.zeros(5, 5)):
        with pytest.raises(ValueError, match="weight must have well-conditioned powers"):
            recurrence(x, bad, h0, None, "identity", backend="chunked")


def test_empty_sequence_refused_by_every_backend():
    """T = 0 is refused up front (as nn.RNN does); it used to pass the forward and crash in the backward."""
    x, W = torch.zeros(0, 2, 4, requires_grad=True), torch.eye(4)
    for backend in [*dispatch.RECURRENCE_BACKENDS.names(), "auto"]:
        with pytest.raises(ValueError, match="at least one time step"):
            recurrence(x, W, None, None, "identity", backend=backend)


def test_power_condition():
    g = torch.Generator().manual_seed(0)
    W = orthogonal("repeated", 8, g)
    P, cond = rec.chunk_powers(W, 16, torch.float64)
    assert P.shape == (2, 16, 8, 8) and abs(cond - 1) < 1e-12
    torch.testing.assert_close(P[0, 2], W @ W @ W)
    torch.testing.assert_close(P[1, 2] @ P[0, 2], torch.eye(8, dtype=torch.float64))
    assert rec.chunk_powers(torch.zeros(3, 3), 4, torch.float32)[1] == math.inf


def test_auto_rule_and_open_fallback():
    # the rule auto follows where the compiled "cpp" backend cannot run (it wins wherever it can)
    pick = dispatch._auto_without_cpp
    assert pick(torch.empty(1000, 8, 64), "identity") == "chunked"
    assert pick(torch.empty(64, 128, 16), "identity") == "chunked"
    assert pick(torch.empty(1000, 9, 64), "identity") == "torch"      # B H^2 above the measured crossover
    assert pick(torch.empty(1000, 1, 256), "identity") == "torch"     # H above 128
    assert pick(torch.empty(255, 1, 64), "identity") == "torch"       # too few steps to repay W's powers
    assert pick(torch.empty(256, 1, 64), "identity") == "chunked"
    assert pick(torch.empty(1000, 1, 64), "modrelu") == "torch"
    assert pick(torch.empty(1000, 1, 64, device="meta"), "identity") == "torch"  # CPU only
    # auto on a W the form cannot take: the sequential loop runs instead, with its exact gradients
    x, _, h0 = make(100, 2, 5, torch.float32, True)
    assert pick(x, "identity") == "chunked"
    W = torch.diag(torch.tensor([0.5, 1.0, 1.0, -1.0, 1.0])).requires_grad_()
    check_against_reference(x, W, h0, backend="auto")
    out, powers, chunked = rec._rnn_recurrence_chunked_or_loop(x, W, h0, None, "identity")
    assert not chunked  # the output that tells the backward which path ran
    torch.testing.assert_close(out, recurrence_reference(x, W, h0, None, "identity"), rtol=0, atol=0)
    # and on an orthogonal W auto's op takes the chunked path
    _, W, _ = make(100, 2, 5, torch.float32, True)
    _, powers, chunked = rec._rnn_recurrence_chunked_or_loop(x, W, h0, None, "identity")
    assert chunked and torch.isfinite(powers).all()
    check_against_reference(x, W, h0, backend="auto")


def test_op_registration():
    x, W, h0 = make(9, 2, 3, torch.float32, True)
    torch.library.opcheck(rec._rnn_recurrence_chunked, (x, W, h0, None, "identity"))
    torch.library.opcheck(rec._rnn_recurrence_chunked_or_loop, (x, W, None, None, "identity"))


def test_mornn_compiles_fullgraph():
    torch.manual_seed(0)
    m = MORNN(4, 6, nonlinearity="identity", batch_first=True, recurrence_backend="chunked")
    x = torch.randn(3, 40, 4)
    out, h = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    cout, ch = compiled(x)
    torch.testing.assert_close(cout, out)
    torch.testing.assert_close(ch, h)
    grads = torch.autograd.grad(out.sum(), list(m.parameters()))
    cgrads = torch.autograd.grad(compiled(x)[0].sum(), list(m.parameters()))
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)
    m.recurrence_backend = "loop"  # the autograd reference through the same weights
    lout, _ = m(x)
    assert rel_err(out, lout) < TOL[torch.float32]


def test_mornn_auto_compiles_fullgraph(monkeypatch):
    """"auto" picks the chunked op (with its loop fallback) at this shape where the compiled "cpp"
    backend cannot run (hidden here), and it traces too."""
    monkeypatch.setattr(dispatch, "cpp_available", lambda device: (False, "hidden by the test"))
    torch.manual_seed(0)
    m = MORNN(4, 6, nonlinearity="identity")
    x = torch.randn(64, 2, 4)  # time-major: T = 64 >= max(64, 4 H), B H^2 = 72
    assert dispatch._auto_backend(torch.empty(64, 2, 6), "identity") == "chunked"
    out, h = m(x)
    cout, ch = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(cout, out)
    torch.testing.assert_close(ch, h)
    m.recurrence_backend = "loop"
    assert rel_err(out, m(x)[0]) < TOL[torch.float32]

