"""The fused PyTorch recurrence op against the plain autograd loop (the Triton kernels: test_triton_recurrence.py)."""
import sys

import pytest
import torch

from matrec.ops.orthogonal import project_orthogonal
from matrec.ops.rnn_recurrence import NONLINEARITIES, RECURRENCE_BACKENDS, Phi, recurrence, recurrence_reference
from matrec.ops.rnn_recurrence import fused as rec


def make(T, B, H, nonlinearity, dtype, with_h0, seed=0):
    g = torch.Generator().manual_seed(seed)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(T, B, H, generator=g).to(dtype).requires_grad_()
    W = project_orthogonal(torch.randn(H, H, generator=g, dtype=torch.float64)).to(wdt).requires_grad_()
    h0 = torch.randn(B, H, generator=g).to(dtype).requires_grad_() if with_h0 else None
    b = (0.3 * torch.randn(H, generator=g)).to(wdt).requires_grad_() if nonlinearity == "modrelu" else None
    return x, W, h0, b


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES.names())
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (7, 3, 5), (100, 2, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("backend", ["torch", "auto"])  # auto: "cpp" where it builds (test_recurrence_cpp.py)
def test_matches_reference(nonlinearity, T, B, H, dtype, with_h0, backend):
    x, W, h0, b = make(T, B, H, nonlinearity, dtype, with_h0)
    inputs = [t for t in (x, W, h0, b) if t is not None]
    out = recurrence(x, W, h0, b, nonlinearity, backend=backend)
    ref = recurrence_reference(x, W, h0, b, nonlinearity)
    assert out.dtype == dtype and out.shape == (T, B, H)
    # Same float32 state arithmetic on both sides; only summation order differs (dW as one GEMM).
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **({} if dtype == torch.bfloat16 else tol))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    g_out = torch.autograd.grad(out, inputs, grad)
    g_ref = torch.autograd.grad(ref, inputs, grad)
    for a, r, t in zip(g_out, g_ref, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape
        # bf16 gradients: one rounding of the same float32 value, so bf16's own tolerance
        torch.testing.assert_close(a, r, **({} if t.dtype == torch.bfloat16 else tol))


def test_gradcheck_float64():
    for nl in NONLINEARITIES.names():
        x, W, h0, b = make(5, 2, 3, nl, torch.float64, True, seed=3)
        args = (x, W, h0, b)
        assert torch.autograd.gradcheck(lambda *a: recurrence(*a, nonlinearity=nl, backend="torch"), args)


def test_only_output_used_and_no_grad_inputs():
    x, W, h0, b = make(6, 2, 4, "modrelu", torch.float32, True)
    W.requires_grad_(False)
    (gx,) = torch.autograd.grad(recurrence(x, W, h0.detach(), b.detach(), "modrelu")[-1].sum(), [x])
    (rx,) = torch.autograd.grad(recurrence_reference(x, W, h0.detach(), b.detach(), "modrelu")[-1].sum(), [x])
    torch.testing.assert_close(gx, rx)


def test_every_output_written(monkeypatch):
    """NaN-poison every buffer the op allocates: any element the loops skip would surface."""
    real = torch.empty_like
    monkeypatch.setattr(rec.torch, "empty_like", lambda *a, **k: real(*a, **k).fill_(float("nan")))
    x, W, h0, b = make(9, 3, 4, "modrelu", torch.float32, False)
    out = recurrence(x, W, h0, b, "modrelu", backend="torch")
    grads = torch.autograd.grad(out.sum(), [x, W, b])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_op_registration_and_compile():
    x, W, h0, b = make(4, 2, 3, "modrelu", torch.float32, True)
    torch.library.opcheck(rec._rnn_recurrence, (x, W, h0, b, "modrelu"))
    fn = torch.compile(lambda x, W, h0, b: recurrence(x, W, h0, b, "modrelu"), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x, W, h0, b), recurrence(x, W, h0, b, "modrelu"))


def test_bad_arguments():
    x, W, h0, b = make(4, 2, 3, "modrelu", torch.float32, True)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        recurrence(x, W, h0, b, "gelu")
    with pytest.raises(ValueError, match="weight must be"):
        recurrence(x, W[:2], h0, b)
    with pytest.raises(ValueError, match="h0 must be"):
        recurrence(x, W, h0[:1], b)
    with pytest.raises(ValueError, match="bias must be given"):
        recurrence(x, W, h0, None, "modrelu")
    with pytest.raises(ValueError, match="bias must be given"):
        recurrence(x, W, h0, b, "tanh")
    with pytest.raises(ValueError, match="xproj must be"):
        recurrence(x[0], W, h0, b)
    with pytest.raises(ValueError, match="xproj must be"):
        recurrence(x.long(), W, h0, b)


def test_backend_contract():
    """Unknown names, a missing package and "auto" are handled by the registry, naming the argument."""
    x, W, h0, b = make(4, 2, 3, "modrelu", torch.float32, False)
    with pytest.raises(ValueError,
        match=r"backend must be one of \['auto', 'torch', 'loop', 'cpp', 'chunked', 'triton', 'scan'\], got 'nope'"):
        recurrence(x, W, h0, b, backend="nope")
    with pytest.raises(ValueError, match=r"recurrence_backend must be one of \['auto', "):
        RECURRENCE_BACKENDS.get("nope")  # what MORNN(recurrence_backend=...) checks
    from matrec import MORNN

    with pytest.raises(ValueError, match=r"recurrence_backend must be one of \['auto', 'torch'"):
        MORNN(3, 4, recurrence_backend="nope")


def test_missing_triton_is_a_clear_error(monkeypatch):
    """backend="triton" without triton: a RuntimeError with the reason, not a ModuleNotFoundError."""
    import builtins

    import matrec.ops.rnn_recurrence.dispatch as dispatch

    real_import = builtins.__import__

    def no_triton(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "triton" or name.startswith("triton.") or (level and "triton" in (fromlist or ())):
            raise ImportError("No module named 'triton'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    monkeypatch.delitem(sys.modules, "matrec.ops.rnn_recurrence.triton", raising=False)
    x, W, h0, b = make(4, 2, 3, "modrelu", torch.float32, False)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu: triton is not importable"):
        recurrence(x, W, h0, b, backend="triton")
    assert not dispatch.RECURRENCE_BACKENDS.available("triton", torch.device("cpu"))[0]


def test_nonlinearity_a_backend_cannot_run_is_refused(monkeypatch):
    """A nonlinearity registered later runs on "torch" and "loop" and is refused by name elsewhere."""
    monkeypatch.setitem(NONLINEARITIES._items, "softsign",
                        Phi(lambda z, b: z / (1 + z.abs()), lambda z, h, b: (1 - h.abs()) ** 2))
    x, W, h0, _ = make(5, 2, 3, "tanh", torch.float64, True)
    out = recurrence(x, W, h0, None, "softsign", backend="torch")
    torch.testing.assert_close(out, recurrence_reference(x, W, h0, None, "softsign"))
    gx, gW = torch.autograd.grad(out.sum(), [x, W])
    rx, rW = torch.autograd.grad(recurrence_reference(x, W, h0, None, "softsign").sum(), [x, W])
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gW, rW)
    with pytest.raises(ValueError, match="nonlinearity 'softsign' is not supported by backend='chunked'"):
        recurrence(x, W, h0, None, "softsign", backend="chunked")
