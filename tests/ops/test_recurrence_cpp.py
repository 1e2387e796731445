"""The "cpp" recurrence backend (the compiled CPU loop) against the float64 autograd reference, and
its fallback when it cannot be built.

The library is built once per machine and torch version (cached, ~30 s of CPU the first time), so
only the first test that needs it pays; every test here skips, with the reason, where it cannot be
built, and the fallback tests run everywhere.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from matrec.nn.mornn import MORNN
from matrec.ops.orthogonal import project_orthogonal
from matrec.ops.rnn_recurrence import RECURRENCE_BACKENDS, recurrence, recurrence_reference
from matrec.ops.rnn_recurrence import cpp

NONLINEARITIES = ["tanh", "relu", "modrelu", "identity"]
SHAPES = [(1, 1, 5), (1, 3, 16), (7, 1, 16), (7, 3, 5), (100, 3, 16), (100, 1, 5)]


@pytest.fixture(scope="module")
def built():
    ok, reason = cpp.load()
    if not ok:
        pytest.skip(f"the cpp backend cannot be built here: {reason}")


def make(T, B, H, nonlinearity, dtype, with_h0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = project_orthogonal(torch.randn(H, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if with_h0 else None
    # a bias around -0.2: some units dead, some live, at every step
    b = (0.3 * torch.randn(H, generator=g, dtype=torch.float64) - 0.2).to(dtype).requires_grad_() \
        if nonlinearity == "modrelu" else None
    return [t for t in (x, W, h0, b)]


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("T,B,H", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_float64_reference(built, nonlinearity, T, B, H, dtype, with_h0):
    """Outputs and every gradient (x, W, h0, modReLU bias) against the float64 autograd loop."""
    args = make(T, B, H, nonlinearity, dtype, with_h0)
    ref_args = [None if a is None else a.detach().double().requires_grad_() for a in args]
    out = recurrence(*args, nonlinearity, backend="cpp")
    ref = recurrence_reference(*ref_args, nonlinearity)
    assert out.dtype == dtype and out.shape == (T, B, H)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(T, B, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [a for a in args if a is not None]
    ref_inputs = [a for a in ref_args if a is not None]
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_inputs, grad)
    # float32: dW sums T*B products of O(1) terms, so its tolerance grows with T
    gtol = tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4 * max(1, T / 10))
    for g, w, a in zip(got, want, inputs):
        assert g.dtype == a.dtype and g.shape == a.shape
        torch.testing.assert_close(g.double(), w, **gtol)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_gradcheck_float64(built, nonlinearity):
    args = make(6, 2, 4, nonlinearity, torch.float64, True, seed=3)
    assert torch.autograd.gradcheck(lambda *a: recurrence(*a, nonlinearity, backend="cpp"), args)


def test_bfloat16_is_computed_in_float32(built):
    x, W, h0, b = make(9, 2, 6, "modrelu", torch.float32, True)
    out = recurrence(x.bfloat16(), W, h0.bfloat16(), b, "modrelu", backend="cpp")
    ref = recurrence(x.bfloat16(), W, h0.bfloat16(), b, "modrelu", backend="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


def test_auto_picks_cpp_on_cpu(built):
    x = torch.zeros(3, 2, 4)
    for nl in NONLINEARITIES:
        assert RECURRENCE_BACKENDS.resolve("auto", x.device, xproj=x, nonlinearity=nl)[0] == "cpp"
    ok, reason = RECURRENCE_BACKENDS.available("cpp", torch.device("cpu"))
    assert ok and "compiled" in reason


def test_op_registration_and_compile(built):
    x, W, h0, b = make(4, 2, 3, "modrelu", torch.float32, True)
    torch.library.opcheck(cpp._rnn_recurrence_cpp, tuple(t.detach().requires_grad_() for t in (x, W, h0, b))
                          + ("modrelu",))
    fn = torch.compile(lambda x, W, h0, b: recurrence(x, W, h0, b, "modrelu", backend="cpp"), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(x, W, h0, b), recurrence(x, W, h0, b, "modrelu", backend="cpp"))


def test_not_on_other_devices():
    ok, reason = cpp.cpp_available(torch.device("meta"))
    assert not ok and "CPU only" in reason


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_mornn_packed_batch_first_bidirectional(built, nonlinearity):
    """MORNN on the cpp backend against the same module on the autograd loop: packed sequences of
    different lengths, batch_first, two bidirectional layers; outputs, h_n and every gradient."""
    torch.manual_seed(0)
    m = MORNN(3, 6, num_layers=2, bidirectional=True, batch_first=True, nonlinearity=nonlinearity,
              dtype=torch.float64, recurrence_backend="cpp")
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1])
    hx = torch.randn(4, 4, 6, dtype=torch.float64)
    results = []
    for backend in ("cpp", "loop"):
        m.zero_grad()
        m.recurrence_backend = backend
        xi, hi = x.clone().requires_grad_(), hx.clone().requires_grad_()
        packed = pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=False)
        out, h_n = m(packed, hi)
        padded, _ = pad_packed_sequence(out, batch_first=True)
        (padded.square().sum() + h_n.sum()).backward()
        grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
        results.append((padded, h_n, xi.grad, hi.grad, grads))
        # unpacked batch_first input gives the first (full-length) sequence's numbers too
    for a, b in zip(results[0][:4], results[1][:4]):
        torch.testing.assert_close(a, b)
    assert len(results[0][4]) == len(results[1][4]) > 0
    for a, b in zip(results[0][4], results[1][4]):
        torch.testing.assert_close(a, b)


def test_disabled_by_environment(monkeypatch):
    """MATREC_CPP_RECURRENCE=0: auto runs "torch", the reason says why, one warning only."""
    monkeypatch.setenv(cpp.DISABLE_ENV, "0")
    monkeypatch.setattr(cpp, "_state", {})
    with pytest.warns(UserWarning, match="MATREC_CPP_RECURRENCE=0"):
        ok, reason = RECURRENCE_BACKENDS.available("cpp", torch.device("cpu"))
    assert not ok and "disabled by MATREC_CPP_RECURRENCE=0" in reason
    x, W, h0, b = make(5, 2, 3, "modrelu", torch.float32, True)
    assert RECURRENCE_BACKENDS.resolve("auto", x.device, xproj=x, nonlinearity="modrelu")[0] == "torch"
    torch.testing.assert_close(recurrence(x, W, h0, b, "modrelu"), recurrence_reference(x, W, h0, b, "modrelu"))
    with pytest.raises(RuntimeError, match="recurrence_backend 'cpp' is not available on cpu: disabled"):
        RECURRENCE_BACKENDS.resolve("cpp", x.device, xproj=x, nonlinearity="modrelu")


_NO_COMPILER = textwrap.dedent("""
    import warnings
    import torch
    from matrec.ops.rnn_recurrence import RECURRENCE_BACKENDS, recurrence, recurrence_reference
    x = torch.randn(5, 2, 3, requires_grad=True)
    W = torch.eye(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = RECURRENCE_BACKENDS.resolve("auto", x.device, xproj=x, nonlinearity="modrelu")[0]
        out = recurrence(x, W, None, b, "modrelu")  # a second use: no second warning
        out.sum().backward()
    torch.testing.assert_close(out, recurrence_reference(x, W, None, b, "modrelu"))
    print("auto:", name)
    print("reason:", RECURRENCE_BACKENDS.available("cpp", torch.device("cpu"))[1])
    print("warnings:", sum("compiled CPU recurrence is unavailable" in str(w.message) for w in caught))
""")


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_no_compiler_falls_back(tmp_path, compiler):
    """A fresh process with an empty cache and no compiler (CXX names a missing file), or one that
    fails (CXX=false, so the build itself fails): "auto" runs "torch", nothing crashes, and the
    reason is said once."""
    src = Path(__file__).resolve().parents[2] / "src"
    cxx = str(tmp_path / "no-such-c++") if compiler == "missing" else "false"
    if compiler == "failing" and not cpp.cpp_extension_usable():
        pytest.skip("ninja is not installed: the build is never attempted")
    env = dict(os.environ, CXX=cxx, MATREC_EXTENSIONS_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    env.pop(cpp.DISABLE_ENV, None)
    run = subprocess.run([sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert "auto: torch" in run.stdout
    assert "warnings: 1" in run.stdout
    if compiler == "missing":
        assert "reason: no C++ compiler" in run.stdout and "no-such-c++" in run.stdout
        assert not (tmp_path / "cache").exists()  # nothing was attempted
    else:
        assert "reason: build failed in " in run.stdout


def test_float32_tanh_to_a_few_ulps(built):
    """The kernel's own float32 tanh (vectorised, cpu_kernel.cpp) against torch.tanh in float64,
    over [-12, 12], tiny values, signed zeros, infinities and NaN."""
    x = torch.cat([torch.linspace(-12, 12, 200_000),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.3, 0.29999998, 9.0, 8.9999,
                                 float("inf"), -float("inf"), float("nan")])])
    x = torch.cat([x, torch.zeros(-x.numel() % 1000)]).reshape(1, -1, 1000)
    got = torch.ops.matrec_cpu.forward(x, torch.zeros(1000, 1000), None, None, 0).flatten().double()
    want = torch.tanh(x.flatten().double())
    finite = torch.isfinite(want) & (want != 0)
    assert ((got - want).abs() / want.abs())[finite].max() < 4 * 2.0 ** -24  # < 4 ulp
    assert torch.equal(torch.signbit(got), torch.signbit(want)) and torch.isnan(got).sum() == 1
    torch.testing.assert_close(got[~torch.isnan(want)], want[~torch.isnan(want)], rtol=5e-7, atol=0)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("bias,batch_first,dtype", [(True, False, torch.float64), (False, True, torch.float32)])
def test_mornn_inference_in_one_call(built, monkeypatch, nonlinearity, bias, batch_first, dtype):
    """Without autograd a one-direction MORNN runs as one C++ call (every layer's projection and
    loop); its outputs and h_n match the autograd reference, at T = 1 (a decoding step) and T = 7."""
    import matrec.nn.mornn as mornn_module

    calls = []
    real = mornn_module.cpp_layers_forward
    monkeypatch.setattr(mornn_module, "cpp_layers_forward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(1)
    m = MORNN(3, 6, num_layers=2, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
              dtype=dtype, recurrence_backend="cpp").eval()
    for T in (1, 7):
        x = torch.randn(2, T, 3, dtype=dtype) if batch_first else torch.randn(T, 2, 3, dtype=dtype)
        hx = torch.randn(2, 2, 6, dtype=dtype)
        with torch.no_grad():
            out, h_n = m(x, hx)
        m.recurrence_backend = "loop"
        ref_out, ref_h = m(x, hx)  # autograd on: the reference path
        m.recurrence_backend = "cpp"
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, ref_out, **tol)
        torch.testing.assert_close(h_n, ref_h, **tol)
    assert len(calls) == 2
    # with autograd needed it is not taken (the op with a backward runs instead)
    out, _ = m(x, hx)
    assert len(calls) == 2 and out.requires_grad


def test_a_nonlinearity_it_does_not_know_runs_elsewhere(monkeypatch):
    """A nonlinearity registered later: "cpp" refuses it by name, "auto" runs "torch"."""
    from matrec.ops.rnn_recurrence import NONLINEARITIES, Phi

    monkeypatch.setitem(NONLINEARITIES._items, "softsign",
                        Phi(lambda z, b: z / (1 + z.abs()), lambda z, h, b: (1 - h.abs()) ** 2))
    x, W, h0, _ = make(5, 2, 3, "tanh", torch.float64, True)
    assert RECURRENCE_BACKENDS.resolve("auto", x.device, xproj=x, nonlinearity="softsign")[0] == "torch"
    torch.testing.assert_close(recurrence(x, W, h0, None, "softsign"),
                               recurrence_reference(x, W, h0, None, "softsign"))
    with pytest.raises(ValueError, match="nonlinearity 'softsign' is not supported by backend='cpp'"):
        recurrence(x, W, h0, None, "softsign", backend="cpp")


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_double_backward(built, nonlinearity):
    """A backward that is differentiated again (create_graph=True) runs the same reverse recurrence
    in torch ops: gradgradcheck holds, as it does for nn.RNN's kernel."""
    args = make(4, 2, 3, nonlinearity, torch.float64, True, seed=5)
    assert torch.autograd.gradgradcheck(lambda *a: recurrence(*a, nonlinearity, backend="cpp"), args)


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_waited_for(tmp_path):
    """torch's build lock is never cleared when its process dies mid-build: an old one is removed
    (with a warning), a fresh one is waited for until its build removes it."""
    import threading
    import time
    import warnings

    from matrec.ops.rnn_recurrence import cpp

    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (time.time() - 30, time.time() - 30))
    with pytest.warns(UserWarning, match="removing a build lock left for 3. s"):
        cpp.clear_stale_lock(tmp_path, stale_after=20)
    assert not lock.exists()

    lock.touch()  # a live build: its lock goes away by itself after 0.3 s
    threading.Timer(0.3, lock.unlink).start()
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpp.clear_stale_lock(tmp_path, stale_after=60, poll=0.05)
    assert 0.25 < time.monotonic() - start < 30 and not lock.exists()
    cpp.clear_stale_lock(tmp_path)  # no lock: returns at once
