"""What every Triton kernel of matrec shares: availability, per-call launch mode, ahead-of-time compile.

Imports without triton (triton itself is imported inside the functions that need it), so the ops can
ask :func:`triton_importable` and report why a kernel cannot run instead of failing at import.
"""
from __future__ import annotations

import os

import torch


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (read at each call, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_importable() -> tuple[bool, str]:
    """``(True, "")`` when the triton package imports, else ``(False, why)`` with the install hint."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not importable ({err}); install it with `pip install matrec[gpu]`"
    return True, ""


def device_available(device, *, cpu_needs_interpret: bool) -> tuple[bool, str]:
    """Whether a Triton kernel can run on ``device``, and if not, why.

    CUDA needs triton and a visible GPU. CPU tensors always run in Triton's interpreter (slow: for
    tests); a kernel with ``cpu_needs_interpret`` runs there only when ``TRITON_INTERPRET=1`` asks
    for it, so that a CPU run never falls into the interpreter by accident.
    """
    device = torch.device(device)
    ok, reason = triton_importable()
    if not ok:
        return False, reason
    mode = " (interpreted: TRITON_INTERPRET=1)" if interpret_requested() else ""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
        return True, "triton on CUDA" + mode
    if device.type == "cpu":
        if interpret_requested() or not cpu_needs_interpret:
            return True, "triton interpreter on CPU" + mode
        return False, ("the Triton kernel needs a CUDA device; on CPU it runs only in Triton's "
                       "interpreter, enabled by the environment variable TRITON_INTERPRET=1")
    return False, f"the Triton kernel supports CUDA (or CPU, interpreted), not {device.type!r}"


# (kernel body, interpreted) -> launchable kernel
_KERNELS: dict = {}


def launchable(fn, device: torch.device):
    """Kernel body ``fn`` (a plain function of ``tl.*`` calls) compiled for the GPU, or interpreted
    for CPU tensors (and for any tensor under ``TRITON_INTERPRET=1``).

    Wrapping here, not with ``@triton.jit`` at import, makes the choice per call: Triton reads
    ``TRITON_INTERPRET`` when a kernel is decorated, so a decorator would freeze whatever the
    environment held when the module happened to be imported first.
    """
    interpret = device.type != "cuda" or interpret_requested()
    key = (fn, interpret)
    if key not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[key] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            _KERNELS[key] = JITFunction(fn)
    return _KERNELS[key]


def device_function(fn):
    """Helper ``fn`` (a plain function of ``tl.*`` calls) made callable from kernel bodies run either way.

    Compiled, the caller sees a ``JITFunction``, which Triton's compiler inlines. Interpreted, the body
    calls the object as Python, which runs ``fn`` the way Triton's interpreter runs its own device
    functions. ``@triton.jit`` cannot serve both: it picks one of the two when the module is imported
    (see :func:`launchable`).
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    class DeviceFunction(JITFunction):
        def __call__(self, *args, **kwargs):
            # Reached only from an interpreted body, whose launch has already patched triton.language for the
            # interpreter: the rewritten helper runs as is (InterpretedFunction.__call__ would patch it again,
            # ~0.8 ms a call on the shared CPU).
            return self._interpreted.rewrite()(*args, **kwargs)

    helper = DeviceFunction(fn)
    helper._interpreted = InterpretedFunction(fn)
    return helper


def compile_ahead(fn, signature_of, constexprs: dict, num_warps: int, arch: int = 90,
                  aligned_pointers: bool = False):
    """Compile kernel body ``fn`` for ``sm_<arch>`` with no GPU: what the interpreter cannot check.

    ``signature_of(arg) -> str`` gives each non-constexpr argument's Triton type (``"i32"``,
    ``"*fp32"``, ...); ``constexprs`` maps the compile-time arguments to their values. Options are
    those of a launch (``num_warps``, fp fusion on). ``aligned_pointers``: specialise every pointer as
    16-byte aligned, as a launch does for torch's allocations (vector widths, and so which loads can be
    asynchronous copies, depend on it). Returns Triton's compiled kernel (``.asm``, ``.metadata``).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    jit = JITFunction(fn)
    constexprs = {k: v for k, v in constexprs.items() if k in jit.arg_names}
    signature = {arg: "constexpr" if arg in constexprs else signature_of(arg) for arg in jit.arg_names}
    attrs = {(k,): [["tt.divisibility", 16]] for k, arg in enumerate(jit.arg_names)
             if aligned_pointers and signature[arg].startswith("*")}
    source = triton.compiler.ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
