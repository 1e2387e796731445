"""mru_scan: every backend against the sequential-loop reference (outputs and both gradients)."""
import functools
import math
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import matrec
from matrec.ops.mru_scan import SCAN_BACKENDS, ScanBackend, auto_backend, mru_scan, naive_mru_scan
from matrec.ops.mru_scan import scan as scan_mod
from support import SRC

PATTERNS = ["sequential", "hillis_steele", "brent_kung", "sklansky", "chunked"]
DS = [1, 2, 8, 16]
LEADS = [(), (3,), (2, 2)]


def near_identity(shape, dtype=torch.float64, scale=0.3, generator=None):
    """Random ``I + noise`` so products over T = 1000 stay finite."""
    d = shape[-1]
    noise = torch.randn(shape, dtype=dtype, generator=generator) * scale / math.sqrt(d * 8)
    return noise + torch.eye(d, dtype=dtype)


def reference(states, h0, G):
    """Output and gradients (states, initial_state) of the autograd-through-loop reference."""
    states = states.detach().requires_grad_()
    h0 = None if h0 is None else h0.detach().requires_grad_()
    out = naive_mru_scan(states, h0)
    grads = torch.autograd.grad(out, [states] + ([h0] if h0 is not None else []), G)
    return out.detach(), grads


def run(states, h0, G, **kw):
    states = states.detach().requires_grad_()
    h0 = None if h0 is None else h0.detach().requires_grad_()
    out = mru_scan(states, h0, **kw)
    grads = torch.autograd.grad(out, [states] + ([h0] if h0 is not None else []), G)
    return out.detach(), grads


def assert_matches(got, want, atol=1e-10, rtol=1e-9):
    out, grads = got
    ref_out, ref_grads = want
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol)


# (T, d, lead): every T of the issue, d and batch rank cycling; T = 1000 kept small in batch
CASES = [
    (1, 1, ()), (1, 8, (2, 2)), (2, 2, (3,)), (2, 16, ()), (3, 8, (2, 2)), (3, 1, (3,)),
    (7, 16, (3,)), (7, 2, ()), (64, 8, ()), (64, 1, (2, 2)), (100, 2, (2, 2)), (100, 16, (3,)),
    (1000, 8, ()), (1000, 2, (2,)),
]


@functools.lru_cache(maxsize=None)
def case_data(T, d, lead, with_init):
    """Inputs and reference results of one case, computed once for all backends."""
    g = torch.Generator().manual_seed(T * 131 + d * 7 + len(lead))
    states = near_identity((*lead, T, d, d), generator=g)
    h0 = near_identity((*lead, d, d), generator=g) if with_init else None
    G = torch.randn(states.shape, dtype=states.dtype, generator=g)
    return states, h0, G, reference(states, h0, G)


@pytest.mark.parametrize("backend", PATTERNS + ["auto"])
@pytest.mark.parametrize("T,d,lead", CASES)
@pytest.mark.parametrize("with_init", [False, True])
def test_backend_matches_reference(backend, T, d, lead, with_init):
    states, h0, G, want = case_data(T, d, lead, with_init)
    assert_matches(run(states, h0, G, backend=backend), want)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 10, 16, 99, 100, 1000])
def test_chunk_sizes(chunk_size):
    g = torch.Generator().manual_seed(chunk_size)
    states = near_identity((2, 100, 3, 3), generator=g)
    h0 = near_identity((2, 3, 3), generator=g)
    G = torch.randn(states.shape, dtype=states.dtype, generator=g)
    got = run(states, h0, G, backend="chunked", chunk_size=chunk_size)
    assert_matches(got, reference(states, h0, G))


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 40),
    d=st.integers(1, 4),
    lead=st.lists(st.integers(1, 3), max_size=2),
    backend=st.sampled_from(PATTERNS),
    with_init=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(T, d, lead, backend, with_init, seed):
    g = torch.Generator().manual_seed(seed)
    states = near_identity((*lead, T, d, d), generator=g, scale=1.0)
    h0 = torch.randn((*lead, d, d), dtype=torch.float64, generator=g) if with_init else None
    G = torch.randn(states.shape, dtype=states.dtype, generator=g)
    assert_matches(run(states, h0, G, backend=backend), reference(states, h0, G), atol=1e-9)


@pytest.mark.parametrize("backend", PATTERNS)
@pytest.mark.parametrize("T", [1, 5])
def test_gradcheck(backend, T):
    g = torch.Generator().manual_seed(T)
    states = near_identity((2, T, 2, 2), generator=g, scale=1.0).requires_grad_()
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, h: mru_scan(m, h, backend=backend), (states, h0))
    assert torch.autograd.gradcheck(lambda m: mru_scan(m, backend=backend), (states,))


@pytest.mark.parametrize("backend", PATTERNS)
def test_gradient_for_one_input_only(backend):
    states = near_identity((3, 9, 2, 2))
    h0 = near_identity((3, 2, 2)).requires_grad_()
    (got,) = torch.autograd.grad(mru_scan(states, h0, backend=backend).sum(), h0)
    (want,) = torch.autograd.grad(naive_mru_scan(states, h0).sum(), h0)
    torch.testing.assert_close(got, want)
    states.requires_grad_()
    (got,) = torch.autograd.grad(mru_scan(states, h0.detach(), backend=backend).sum(), states)
    (want,) = torch.autograd.grad(naive_mru_scan(states, h0.detach()).sum(), states)
    torch.testing.assert_close(got, want)


def test_empty_batch():
    assert mru_scan(torch.zeros(0, 4, 2, 2)).shape == (0, 4, 2, 2)


def test_float32_close_to_float64():
    states = near_identity((2, 200, 4, 4))
    ref = mru_scan(states, backend="sequential")
    for backend in PATTERNS:
        out = mru_scan(states.float(), backend=backend)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computed_in_float32(dtype):
    states = near_identity((2, 50, 4, 4), dtype=torch.float32).to(dtype).requires_grad_()
    out = mru_scan(states, backend="chunked")
    assert out.dtype == dtype
    want = naive_mru_scan(states.detach().float()).to(dtype)
    assert torch.equal(out, want) or torch.allclose(out.float(), want.float(), atol=1e-2)
    # a bf16/fp16 loop would drift far more than one final rounding from the float32 result
    f32 = mru_scan(states.detach().float(), backend="chunked")
    assert (out.float() - f32).abs().max() <= 2 * (want.float() - f32).abs().max() + 1e-6
    out.float().sum().backward()
    assert states.grad.dtype == dtype and torch.isfinite(states.grad.float()).all()


@pytest.mark.parametrize("backend", PATTERNS)
def test_autocast_keeps_scan_float32(backend):
    states = near_identity((2, 64, 8, 8), dtype=torch.float32).requires_grad_()
    want = mru_scan(states, backend=backend)
    (want_grad,) = torch.autograd.grad(want.sum(), states)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mru_scan(states, backend=backend)
        (grad,) = torch.autograd.grad(out.sum(), states)
    assert out.dtype == torch.float32
    # bf16 products would be off by ~1e-2; float32 agrees to rounding
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", PATTERNS + ["auto"])
def test_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) traces every backend (odd T: the chunked pattern pads), grads as eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    states = near_identity((2, 7, 3, 3), dtype=torch.float32, generator=g)
    h0 = near_identity((2, 3, 3), dtype=torch.float32, generator=g)
    G = torch.randn(states.shape, generator=g)
    compiled = torch.compile(functools.partial(mru_scan, backend=backend), fullgraph=True, backend="aot_eager")
    states_, h0_ = states.clone().requires_grad_(), h0.clone().requires_grad_()
    out = compiled(states_, h0_)
    got = torch.autograd.grad(out, [states_, h0_], G)
    want = reference(states, h0, G)
    assert_matches((out.detach(), got), want, atol=1e-5, rtol=1e-5)


def test_overflow_is_not_masked():
    states = torch.eye(2).mul(10.0).expand(400, 2, 2).contiguous()  # 10^400 overflows float32
    for backend in PATTERNS:
        out = mru_scan(states, backend=backend)
        assert torch.isfinite(out[:30]).all(), backend
        assert not torch.isfinite(out[-1]).any(), backend  # inf (and inf * 0 = nan), never masked


def test_auto_rule_cpu():
    cpu = torch.device("cpu")
    assert auto_backend(cpu, 1) == "sequential"
    assert auto_backend(cpu, 8) == "sequential"
    assert auto_backend(cpu, 9) == "brent_kung"
    assert auto_backend(cpu, 1024) == "brent_kung"
    assert auto_backend(cpu, 1025) == "chunked"
    assert auto_backend(cpu, 4096, batch=16, d=16) == "sequential"  # arithmetic-bound: the loop
    assert auto_backend(cpu, 4096, batch=15, d=16) == "chunked"


def test_auto_rule_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(scan_mod, "_triton_available", lambda device: (True, "ok"))
    monkeypatch.setattr(scan_mod, "_triton_module", lambda: types.SimpleNamespace(MAX_DIM=64))
    monkeypatch.setattr(scan_mod.kernel_guard, "proven", lambda op, device, dtype, size: True)
    assert auto_backend(cuda, 100, d=64) == "triton"
    assert auto_backend(cuda, 100, d=65) == scan_mod.AUTO_CUDA_FALLBACK
    monkeypatch.setattr(scan_mod, "_triton_available", lambda device: (False, "no triton here"))
    with pytest.warns(RuntimeWarning, match="no triton here"):
        assert auto_backend(cuda, 100) == scan_mod.AUTO_CUDA_FALLBACK
    monkeypatch.setattr(scan_mod, "_triton_available", lambda device: (True, "ok"))
    assert auto_backend(cuda, 100, dtype=torch.float64) == scan_mod.AUTO_CUDA_FALLBACK


def test_triton_backend_refuses_openly(monkeypatch):
    """backend="triton" where the kernel cannot run is an error with the reason, never a slow fallback."""
    pytest.importorskip("triton")
    states = near_identity((2, 9, 4, 4), dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu: .*TRITON_INTERPRET=1"):
        mru_scan(states, backend="triton")


def test_triton_backend_without_triton(monkeypatch):
    """Without the triton package the backend says so (a RuntimeError naming it), and auto avoids it."""
    states = near_identity((2, 9, 4, 4), dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu: triton is not importable"):
        mru_scan(states, backend="triton")
    assert auto_backend(torch.device("cpu"), 9) != "triton"  # auto never picks it off CUDA


def test_triton_backend_through_mru_scan(monkeypatch):
    """The registered kernel under Triton's CPU interpreter: outputs, both gradients, bf16 I/O."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(3)
    states = near_identity((2, 7, 3, 3), dtype=torch.float32, generator=g)
    h0 = near_identity((2, 3, 3), dtype=torch.float32, generator=g)
    G = torch.randn(states.shape, generator=g)
    want = reference(states.double(), h0.double(), G.double())
    for chunk_size in [None, 3]:
        out, grads = run(states, h0, G, backend="triton", chunk_size=chunk_size)
        assert_matches((out.double(), [x.double() for x in grads]), want, atol=1e-5, rtol=1e-5)
    # what the kernel does not take is refused by name, not computed some other way
    with pytest.raises(TypeError, match="states must be float32, bfloat16 or float16, got torch.float64"):
        mru_scan(states.double(), backend="triton")
    with pytest.raises(ValueError, match="states must hold matrices of order 1..64, got d=65"):
        mru_scan(torch.eye(65).expand(1, 2, 65, 65), backend="triton")
    low = mru_scan(states.bfloat16(), backend="triton")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), naive_mru_scan(states.bfloat16().float()), atol=2e-2, rtol=2e-2)


def test_user_backends(monkeypatch):
    calls = []

    def fused(states, initial_state):  # a self-differentiating backend
        calls.append(states.shape)
        return naive_mru_scan(states, initial_state)

    monkeypatch.setitem(SCAN_BACKENDS._items, "mine", ScanBackend(function=fused))
    monkeypatch.setitem(
        SCAN_BACKENDS._items, "pattern", ScanBackend(pattern=SCAN_BACKENDS.get("sklansky").pattern)
    )
    states = near_identity((3, 2, 5, 2, 2))
    h0 = near_identity((3, 2, 2, 2))
    G = torch.randn(states.shape, dtype=states.dtype)
    for name in ["mine", "pattern"]:
        assert_matches(run(states, h0, G, backend=name), reference(states, h0, G))
    assert calls == [(6, 5, 2, 2)]  # leading dims flattened for the backend
    with pytest.raises(ValueError, match="exactly one"):
        ScanBackend()


def test_public_export():
    assert matrec.mru_scan is mru_scan and matrec.SCAN_BACKENDS is SCAN_BACKENDS


# Issue 2's bad-input list, one case each (the id says which); every message names the argument.
@pytest.mark.parametrize(
    "states,h0,kw,err,match",
    [
        pytest.param(torch.zeros(4, 3), None, {}, ValueError,
            r"states must have shape \[\.\.\., T, d, d\] \(at least 3 dims\), got \(4, 3\)", id="wrong-rank"),
        pytest.param(torch.zeros(2, 4, 3, 2), None, {}, ValueError,
            r"states must hold square matrices \[\.\.\., T, d, d\], got \(2, 4, 3, 2\)", id="non-square"),
        pytest.param(torch.zeros(2, 4, 0, 0), None, {}, ValueError, "states must have matrix order d >= 1",
            id="d-zero"),
        pytest.param(torch.zeros(2, 0, 3, 3), None, {}, ValueError,
            r"states must have sequence length T >= 1, got \(2, 0, 3, 3\)", id="T-zero"),
        pytest.param(torch.zeros(2, 4, 3, 3, dtype=torch.int64), None, {}, TypeError,
            "states must have a floating-point dtype, got torch.int64", id="integer-dtype"),
        pytest.param([[[1.0]]], None, {}, TypeError, "states must be a torch.Tensor", id="not-a-tensor"),
        pytest.param(torch.zeros(2, 4, 3, 3), torch.zeros(3, 3), {}, ValueError,
            r"initial_state must have shape \(2, 3, 3\) .*got \(3, 3\)", id="initial-state-batch-mismatch"),
        pytest.param(torch.zeros(2, 4, 3, 3), torch.zeros(2, 2, 2), {}, ValueError,
            r"initial_state must have shape \(2, 3, 3\) .*got \(2, 2, 2\)", id="initial-state-order-mismatch"),
        pytest.param(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.float64), {}, TypeError,
            "initial_state must have the dtype of states", id="initial-state-dtype-mismatch"),
        pytest.param(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.int64), {}, TypeError,
            "initial_state must have the dtype of states", id="initial-state-integer"),
        pytest.param(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, device="meta"), {}, ValueError,
            "initial_state must be on the device", id="initial-state-device-mismatch"),
        pytest.param(torch.zeros(2, 4, 3, 3), None, {"backend": "nope"}, ValueError,
            r"backend must be one of \['auto', 'sequential'.*got 'nope'", id="unknown-backend"),
        pytest.param(torch.zeros(2, 4, 3, 3), None, {"backend": "chunked", "chunk_size": 0}, ValueError,
            "chunk_size must be an int >= 1 or None", id="chunk-size-zero"),
        pytest.param(torch.zeros(2, 4, 3, 3), None, {"backend": "chunked", "chunk_size": 2.0}, ValueError,
            "chunk_size must be an int >= 1 or None", id="chunk-size-float"),
        pytest.param(torch.zeros(2, 4, 3, 3), None, {"backend": "sklansky", "chunk_size": 2}, ValueError,
            "chunk_size applies to backends with chunks only", id="chunk-size-without-chunks"),
    ],
)
def test_bad_input(states, h0, kw, err, match):
    with pytest.raises(err, match=match):
        mru_scan(states, h0, **kw)


def test_core_needs_only_torch_and_numpy():
    """Issue 2: torch and numpy are the only core dependencies. With every optional package made
    unimportable, the scan (every PyTorch backend and auto), the constructions and the MRU layer
    still run, and asking for the Triton backend fails with the reason."""
    import os
    import subprocess

    src = SRC
    code = """
import sys
for name in ("triton", "safetensors", "tokenizers", "tensorboard", "matplotlib", "sklearn", "hypothesis", "onnx"):
    sys.modules[name] = None  # import raises ImportError
import torch, matrec
M = torch.linalg.matrix_exp(0.1 * torch.randn(2, 30, 4, 4))
for b in ("auto", "sequential", "hillis_steele", "brent_kung", "sklansky", "chunked"):
    matrec.mru_scan(M, backend=b)
matrec.state_matrix("ldu", torch.zeros(3, 16), 4)
y, s = matrec.MRU(16, num_heads=1)(torch.randn(2, 5, 16))
try:
    matrec.mru_scan(M, backend="triton")
except RuntimeError as e:
    assert "triton" in str(e), e
else:
    raise AssertionError("triton backend ran without triton")
print("core ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(src)})
    assert run.returncode == 0 and "core ok" in run.stdout, run.stderr[-2000:]
