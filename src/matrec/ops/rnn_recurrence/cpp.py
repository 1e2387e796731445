"""The "cpp" backend: the recurrence as one compiled loop over time (CPU; :file:`cpu_kernel.cpp`).

Per step the C++ loop runs one small GEMM and one elementwise pass into preallocated ``[T, B, H]``
buffers; the input projection (outside this op), ``dL/dW`` (one GEMM over all steps,
:func:`~matrec.ops.rnn_recurrence.fused.weight_grad`) is computed outside the loop, modReLU's
``dL/db`` inside the reverse loop. Only the states ``h_1..h_T`` are saved: every nonlinearity's
slope is read from ``h`` alone.

The source is compiled at first use with ``torch.utils.cpp_extension.load`` (a C++ compiler and
``ninja`` needed: ``pip install matrec[cpu-kernel]`` brings ninja) into a cache directory per torch
version and Python (``$MATREC_EXTENSIONS_DIR``, default ``~/.cache/matrec/extensions``); later
processes only load it. Whatever stops it (no compiler, no ninja, a failed build, or
``MATREC_CPP_RECURRENCE=0``) is reported once as a warning and kept as the reason
:func:`cpp_available` gives; ``recurrence_backend="auto"`` then runs the "torch" backend.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..precision import compute_dtype
from .fused import weight_grad
from .nonlinearities import NONLINEARITIES, kernel_code

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
DISABLE_ENV = "MATREC_CPP_RECURRENCE"
DIR_ENV = "MATREC_EXTENSIONS_DIR"
# torch's build lock (a file named "lock" in the build folder) is never cleared when the process that
# holds it is killed mid-build, and every later process would wait on it forever: a lock older than
# this is taken as left behind (a build takes about a minute, minutes on a loaded machine)
STALE_LOCK_SECONDS = 600.0

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "reason": str once a load was tried


def build_directory() -> Path:
    """Where the compiled library is cached: one folder per torch version, Python and C++ ABI."""
    root = os.environ.get(DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "matrec", "extensions")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    tag = (f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-abi{abi}"
           f"-{_capability().lower()}")
    return Path(root) / tag


def _capability() -> str:
    """The vector instructions the build may use: AVX2 where torch itself runs its AVX2 kernels
    (x86 only), else the compiler's defaults. Part of the cache folder's name, so a cache shared
    with an older machine is never loaded there."""
    cap = torch.backends.cpu.get_cpu_capability()
    return "AVX2" if cap in ("AVX2", "AVX512") else "DEFAULT"


def _cflags() -> list[str]:
    # -fno-trapping-math (as torch's own build): lets the branch-free selects of tanh/modReLU vectorise
    return ["-O3", "-fno-trapping-math"] + (["-mavx2", "-mfma"] if _capability() == "AVX2" else [])


def cpp_extension_usable() -> bool:
    """Whether torch.utils.cpp_extension.load can run a build here (it drives ninja)."""
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


def _why_not_buildable() -> str | None:
    """What is missing to build the library, or None."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} not found (set CXX or install g++/clang++)"
    if not cpp_extension_usable():
        return "ninja not found (pip install 'matrec[cpu-kernel]', or the system's ninja)"
    return None


@torch.compiler.assume_constant_result  # under torch.compile: run once at trace time, not traced
def load() -> tuple[bool, str]:
    """Build (first time) or load the library: ``(ok, reason)``. Tried once per process; a failure
    is warned about once and then only returned."""
    with _lock:
        if not _state:
            ok, reason = _load()
            _state.update(ok=ok, reason=reason)
            if not ok:
                warnings.warn(f"matrec: the compiled CPU recurrence is unavailable ({reason}); "
                              f"recurrence_backend='auto' runs the 'torch' backend instead", stacklevel=3)
        return bool(_state["ok"]), str(_state["reason"])


def _load() -> tuple[bool, str]:
    missing = _why_not_buildable()
    if missing is not None:
        return False, missing
    from torch.utils import cpp_extension

    directory = build_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(directory)
        cpp_extension.load(name="matrec_cpu_recurrence", sources=[str(SOURCE)], extra_cflags=_cflags(),
                           build_directory=str(directory), is_python_module=False, verbose=False)
        path = torch.ops.matrec_cpu.gemm_path()
        _register_fakes()
    except Exception as e:  # a compiler error, a broken toolchain: reported, never raised
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"build failed in {directory}: {type(e).__name__}: {first}"
    return True, f"compiled C++ loop ({'BLAS' if path == 'blas' else 'ATen'} GEMMs), cached in {directory}"


def clear_stale_lock(directory: Path, stale_after: float = STALE_LOCK_SECONDS, poll: float = 0.5) -> None:
    """Wait while another process builds in ``directory`` (its ``lock`` file exists), and remove the
    lock once it is ``stale_after`` seconds old: a build killed midway leaves it behind, and torch's
    own wait on it never ends."""
    lock = directory / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after:
            warnings.warn(f"matrec: removing a build lock left for {age:.0f} s in {directory} (a build "
                          f"that was stopped midway); building again", stacklevel=4)
            lock.unlink(missing_ok=True)
            return
        time.sleep(min(poll, stale_after - age))


def _register_fakes() -> None:
    """Shapes of the C++ ops for tracing (torch.compile, opcheck): the backward is traced too."""

    @torch.library.register_fake("matrec_cpu::forward")
    def _(x, w, h0, b, code):
        return torch.empty_like(x)

    @torch.library.register_fake("matrec_cpu::backward")
    def _(grad_out, out, w, code):
        return torch.empty_like(out), out.new_empty(out.shape[1:]), out.new_empty(out.shape[2:])

    @torch.library.register_fake("matrec_cpu::layers_forward")
    def _(x, hx, w_ih, w_hh, b_ih, b_hh, phi_b, code):
        return x.new_empty(x.shape[0], x.shape[1], hx.shape[2]), torch.empty_like(hx)


def cpp_available(device: torch.device) -> tuple[bool, str]:
    """The registry's availability check: CPU only, and the library must build/load."""
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"CPU only (device is {device.type})"
    return load()


def cpp_supports(nonlinearity: str) -> bool:
    """The kernel knows its nonlinearities by code; one registered later runs elsewhere."""
    return kernel_code(nonlinearity) is not None


@torch.library.custom_op("matrec::rnn_recurrence_cpp", mutates_args=())
def _rnn_recurrence_cpp(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
                        nonlinearity: str) -> Tensor:
    # all arguments contiguous, one float dtype (cpp_recurrence casts)
    return torch.ops.matrec_cpu.forward(xproj, weight, h0, bias, kernel_code(nonlinearity))


@_rnn_recurrence_cpp.register_fake
def _(xproj, weight, h0, bias, nonlinearity):
    return torch.empty_like(xproj)


def _setup_context(ctx, inputs, output):
    xproj, weight, h0, bias, nonlinearity = inputs
    ctx.save_for_backward(output, weight, h0)
    ctx.nonlinearity = nonlinearity
    ctx.has_h0, ctx.has_bias = h0 is not None, bias is not None




def _differentiable_backward(grad_out, out, weight, h0, nonlinearity):
    """The same reverse recurrence in torch ops, for a backward that is itself differentiated
    (``create_graph=True``: double backward, gradgradcheck) -- nn.RNN's kernel supports that, so
    tanh/relu on this backend must too. Slow (a few ops per step); only taken in that case."""
    slope = NONLINEARITIES.get(nonlinearity).slope_from_output(out)  # [T, B, H], as cpu_kernel.cpp
    T = out.shape[0]
    gz = [None] * T
    gh = grad_out[T - 1]
    for t in range(T - 1, -1, -1):
        gz[t] = gh * slope[t]
        if t > 0:
            gh = grad_out[t - 1] + gz[t] @ weight
    gz = torch.stack(gz)  # [T, B, H]
    grad_b = (gz * torch.sign(out)).sum(dim=(0, 1))
    return gz, gz[0] @ weight, grad_b


def _backward(ctx, grad_out):
    out, weight, h0 = ctx.saved_tensors
    nonlinearity = ctx.nonlinearity
    if torch.is_grad_enabled():  # create_graph=True
        gz, grad_h0, grad_b = _differentiable_backward(grad_out, out, weight, h0, nonlinearity)
        return (gz, weight_grad(gz, out, h0), grad_h0 if ctx.has_h0 else None,
                grad_b if ctx.has_bias else None, None)
    # modReLU's dL/db comes out of the reverse loop (sign(h) standing in for sign(z): where
    # dL/dz != 0 the unit is live and they agree); dL/dW is one GEMM over all steps
    gz, grad_h0, grad_b = torch.ops.matrec_cpu.backward(grad_out.contiguous(), out, weight, kernel_code(nonlinearity))
    grad_W = weight_grad(gz, out, h0)
    return gz, grad_W, grad_h0 if ctx.has_h0 else None, grad_b if ctx.has_bias else None, None


_rnn_recurrence_cpp.register_autograd(_backward, setup_context=_setup_context)


def cpp_recurrence(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
                   nonlinearity: str) -> Tensor:
    """The backend function: inputs cast to the state dtype (float32 or float64) and made
    contiguous (autograd carries the casts back), the op run, the output in ``xproj``'s dtype."""
    ok, reason = load()  # the registry checked it already; this covers direct calls
    if not ok:
        raise RuntimeError(f"the 'cpp' recurrence backend is not available: {reason}")
    sdt = compute_dtype(xproj.dtype)

    def prep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(sdt).contiguous()

    out = _rnn_recurrence_cpp(prep(xproj), prep(weight), prep(h0), prep(bias), nonlinearity)
    return out.to(xproj.dtype)


def cpp_layers_forward(x: Tensor, hx: Tensor, weights: list[list[Tensor]], phi_biases: list[Tensor | None],
                       nonlinearity: str) -> tuple[Tensor, Tensor]:
    """Stacked one-direction layers without autograd, in one C++ call (the decoding step's path):
    ``x [T, B, I]``, ``hx [L, B, H]``, ``weights[l] = [w_ih, w_hh(, b_ih, b_hh)]`` and the modReLU
    biases, all of ``x``'s dtype (float32/float64) -> ``(output [T, B, H], h_n [L, B, H])``.
    The caller makes sure nothing needs a gradient and :func:`cpp_available` holds."""
    w_ih = [ws[0].contiguous() for ws in weights]
    w_hh = [ws[1].contiguous() for ws in weights]
    b_ih = [ws[2].contiguous() if len(ws) == 4 else None for ws in weights]
    b_hh = [ws[3].contiguous() if len(ws) == 4 else None for ws in weights]
    phi_b = [None if b is None else b.contiguous() for b in phi_biases]
    return torch.ops.matrec_cpu.layers_forward(x.contiguous(), hx.contiguous(), w_ih, w_hh, b_ih, b_hh, phi_b,
                                               kernel_code(nonlinearity))
