"""The first-use check that stands between backend="auto" and an unproven fused kernel."""
import warnings

import pytest
import torch

from matrec.ops import kernel_guard
from matrec.ops.mru_scan import scan as scan_mod
from matrec.ops.mru_scan import auto_backend


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.delenv(kernel_guard.ENV_VAR, raising=False)
    kernel_guard.reset()
    yield
    kernel_guard.reset()


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_real_kernel_passes_its_check_in_the_interpreter(interpreter):
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pass warns nothing
        assert kernel_guard.proven("mru_scan", cpu, torch.float32, 3)
    assert kernel_guard.verdicts()[("mru_scan", "cpu", torch.float32, 3)][0] is True


def test_a_wrong_kernel_is_caught_warned_once_and_remembered(interpreter, monkeypatch):
    calls = []
    real = scan_mod._triton_function

    def off_by_a_little(states, initial_state, chunk_size=None):
        calls.append(chunk_size)
        return real(states, initial_state, chunk_size=chunk_size) * 1.001  # 1e-3 relative: wrong

    monkeypatch.setattr(scan_mod, "_triton_function", off_by_a_little)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match=r"mru_scan kernel failed.*output relative error"):
        assert not kernel_guard.proven("mru_scan", cpu, torch.float32, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per key: the second call neither re-runs nor warns
        assert not kernel_guard.proven("mru_scan", cpu, torch.float32, 4)
    assert calls == [37]  # the first run (one chunk) already failed: the check stopped there
    ok, reason = kernel_guard.verdicts()[("mru_scan", "cpu", torch.float32, 4)]
    assert not ok and "relative error" in reason


def test_a_kernel_that_cannot_compile_counts_as_failed(monkeypatch):
    def broken(states, initial_state, chunk_size=None):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(scan_mod, "_triton_function", broken)
    with pytest.warns(RuntimeWarning, match="PassManager::run failed"):
        assert not kernel_guard.proven("mru_scan", torch.device("cpu"), torch.float32, 2)


def test_gradient_mismatch_alone_is_caught(interpreter, monkeypatch):
    real = scan_mod._triton_function

    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return -g  # right forward, wrong gradient

    monkeypatch.setattr(scan_mod, "_triton_function",
                        lambda s, h, chunk_size=None: WrongBackward.apply(real(s, h, chunk_size=chunk_size)))
    with pytest.warns(RuntimeWarning, match="d states relative error"):
        assert not kernel_guard.proven("mru_scan", torch.device("cpu"), torch.float32, 3)


def test_auto_on_cuda_falls_back_when_the_kernel_fails(monkeypatch):
    monkeypatch.setattr(scan_mod, "_triton_available", lambda device: (True, "ok"))
    runs = []
    monkeypatch.setitem(kernel_guard.KERNEL_CHECKS._items, "mru_scan",
                        lambda device, dtype, d: runs.append((dtype, d)) or "output relative error 1e-01")
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="uses PyTorch instead"):
        assert auto_backend(cuda, 100, d=8) == scan_mod.AUTO_CUDA_FALLBACK
    assert auto_backend(cuda, 5000, batch=3, d=8) == scan_mod.AUTO_CUDA_FALLBACK  # remembered
    # the key is the inputs' dtype: bf16 inputs (computed in fp32) are checked on their own
    with pytest.warns(RuntimeWarning):
        auto_backend(cuda, 100, d=8, io_dtype=torch.bfloat16)
    assert runs == [(torch.float32, 8), (torch.bfloat16, 8)]
    monkeypatch.setitem(kernel_guard.KERNEL_CHECKS._items, "mru_scan", lambda device, dtype, d: None)
    assert auto_backend(cuda, 100, d=16) == "triton"


def test_environment_variable_turns_the_check_off(monkeypatch):
    monkeypatch.setenv(kernel_guard.ENV_VAR, "0")
    monkeypatch.setitem(kernel_guard.KERNEL_CHECKS._items, "mru_scan",
                        lambda device, dtype, d: pytest.fail("the check ran although disabled"))
    assert kernel_guard.proven("mru_scan", torch.device("cpu"), torch.float32, 8)
    assert kernel_guard.verdicts() == {}
