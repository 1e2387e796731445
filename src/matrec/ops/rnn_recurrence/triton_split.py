"""Column-split persistent Triton kernels for ``h_t = phi(xproj_t + h_{t-1} @ W^T)`` (forward and backward).

The row kernels of :mod:`.triton` give each program ``BLOCK_B`` batch rows and the whole ``W``: at
B = 128 that is 8 programs on a 132-SM GPU, each re-reading all of ``W`` every step. Here the work of a
step is split by output columns too: program ``(pb, ph)`` of the grid ``(cdiv(B, BLOCK_B), cdiv(H,
BLOCK_H))`` owns rows ``pb`` and columns ``ph`` of every ``h_t``, loads its ``[H, BLOCK_H]`` slice of
``W^T`` once, before the time loop (it stays on chip for all T steps), and per step computes

    h_t[rows, cols] = phi(xproj_t[rows, cols] + h_{t-1}[rows, :] @ W^T[:, cols])

with one small ``tl.dot``. ``h_{t-1}[rows, :]`` was written by the ``cdiv(H, BLOCK_H)`` programs of the
same row block, so a step may only start once they have all published step t-1 to ``OUT`` (global
memory): a barrier per step among the programs of a row block (the only programs whose data a program
reads). Each program, after storing its slice, makes its threads' stores visible to one thread
(``tl.debug_barrier``, bar.sync) which adds 1 to the row block's counter with release semantics at GPU
scope; before reading ``h_{t-1}`` a program spins on acquire loads of that counter until it reaches
``n_col * t`` (the counter only grows, so ``>=``), then reads ``h_{t-1}`` past L1 (``.cg``).

**Co-residency.** A spinning program waits for programs that must be running at the same time: if the
grid holds more programs than the GPU runs at once (the host launches the persistent kernel only when the
grid fits in the SM count, one program per SM), or something else occupies the SMs, a wait could last
forever. So every wait is bounded (``max_spins`` acquire loads); a program whose wait expires sets
``STATUS`` and skips the waits of its remaining steps, the host reads ``STATUS`` after the launch (one
device-to-host sync) and recomputes the call with the row kernel of :mod:`.triton`, warning with the reason.

**Without a grid barrier.** ``PERSISTENT`` is a compile-time switch of the same kernel body: off, the
kernel runs ``n_steps`` steps from ``t0`` with no barrier code, and the host launches it once per step
(the launch boundary is the barrier; with one column slice a single launch runs every step). Triton's
interpreter runs a grid's programs one after another, so it cannot run programs that wait for each other;
it runs the one-step launches, which execute every line of the persistent kernel except the barrier
(the tests also run the persistent body where no program waits for another, and where a wait must
expire). The barrier itself is checked in the sm_90 compile (release/acquire instructions present) and
by the CUDA tests.

The backward is the same recurrence transposed: ``dL/dz_t = (g_t + dL/dz_{t+1} @ W) * phi'(z_t)``, each
program owning columns of ``dL/dz_t`` and keeping ``W[:, cols]`` on chip, one extra step writing
``dL/dh0 = dL/dz_0 @ W``; ``dL/dW`` and the modReLU bias gradient are one GEMM and one reduction in
PyTorch (:func:`.fused.parameter_grads`). Products are IEEE float32 (no TF32), ``W`` float32.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_support import compile_ahead, device_function, interpret_requested
from ..triton_support import launchable as _launcher
from . import triton as rows_kernel
from .triton import phi, phi_slope
from .fused import parameter_grads, register_recurrence_autograd
from .nonlinearities import kernel_code

# Spin budget of one wait: each spin is an acquire load served by L2 and a CTA barrier, so 2**20 of them
# outlast any step (a few loads and one small dot) by orders of magnitude. Unmeasured on a GPU.
MAX_SPINS = 1 << 20
BLOCK_B = 16  # tl.dot needs every dimension >= 16
BLOCK_HS = (16, 32)  # column-slice widths tried, narrowest first (more programs, less W per program)
NUM_WARPS = 8  # ptxas for sm_90: 4 warps spill in the BLOCK_H = 32 forward (H 256 and 512), 8 do not
# tl.atomic_load is the plain acquire load; a Triton release without it gets the same semantics from an acquire
# read-modify-write of 0 (both forms are compiled by the tests; the H200 runs had Triton 3.6, pinned here: 3.9).
_HAS_ATOMIC_LOAD = hasattr(tl, "atomic_load")

# As in .triton: plain kernel bodies of tl.* builtins and device_function helpers, wrapped per call (interpreted or
# compiled).


def _acquire_load(COUNT, ATOMIC_LOAD: tl.constexpr):
    if ATOMIC_LOAD:
        seen = tl.atomic_load(COUNT, sem="acquire", scope="gpu")
    else:
        seen = tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
    return seen


def _wait_for(COUNT, target, limit, STATUS, ATOMIC_LOAD: tl.constexpr):
    """Spin on acquire loads of the row block's counter ``COUNT`` until it reaches ``target``, at most
    ``limit`` spins; returns the limit of the program's next wait. A wait that expires sets ``STATUS``
    (the host recomputes the call with the row kernel, so this program's results no longer matter) and
    returns 0: the program's later waits, which would expire too, do not spin again."""
    seen = acquire_load(COUNT, ATOMIC_LOAD)
    spins = 0
    while (seen < target) & (spins < limit):
        seen = acquire_load(COUNT, ATOMIC_LOAD)
        spins += 1
    if seen < target:  # not co-resident (or stalled)
        tl.atomic_xchg(STATUS, 1, sem="relaxed", scope="gpu")
        limit = 0
    tl.debug_barrier()  # the acquiring thread's view is every thread's before the loads after the wait
    return limit


acquire_load = device_function(_acquire_load)
wait_for = device_function(_wait_for)


def _fwd_split_kernel(X, W, H0, BIAS, OUT, Z, COUNT, STATUS, T, B, H, t0, n_steps, max_spins,
                      HAS_H0: tl.constexpr, NL: tl.constexpr, PERSISTENT: tl.constexpr, ATOMIC_LOAD: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, HP: tl.constexpr):
    pb = tl.program_id(0)
    n_col = tl.num_programs(1)
    rb = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # this program's columns of h_t
    rk = tl.arange(0, HP)                                     # all of h_{t-1}
    mb, mn, mk = rb < B, rn < H, rk < H
    m2 = mb[:, None] & mn[None, :]
    mbk = mb[:, None] & mk[None, :]
    # W^T[:, cols] as [k, j], loaded once for all steps; padded entries 0, so padded k contribute nothing
    wt = tl.load(W + rn[None, :] * H + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
    b = tl.load(BIAS + rn, mask=mn, other=0.0)
    limit = max_spins
    for s in range(n_steps):
        t = t0 + s
        off = t * B * H + rb[:, None] * H + rn[None, :]
        x = tl.load(X + off, mask=m2, other=0.0)  # independent of the barrier: issued before the wait
        if PERSISTENT:
            if s > 0:  # wait until the row block's n_col programs have published h_{t-1}
                limit = wait_for(COUNT + pb, n_col * s, limit, STATUS, ATOMIC_LOAD)
        if t > 0:
            hp = tl.load(OUT + (t - 1) * B * H + rb[:, None] * H + rk[None, :], mask=mbk, other=0.0,
                         cache_modifier=".cg")  # [BLOCK_B, HP], written by other programs: from L2
        elif HAS_H0:
            hp = tl.load(H0 + rb[:, None] * H + rk[None, :], mask=mbk, other=0.0)
        else:
            hp = tl.full((BLOCK_B, HP), 0.0, tl.float32)
        z = x + tl.dot(hp, wt, input_precision="ieee")  # [BLOCK_B, BLOCK_H]
        tl.store(Z + off, z, mask=m2)
        tl.store(OUT + off, phi(z, b, NL), mask=m2)
        if PERSISTENT:
            tl.debug_barrier()  # every thread's stores of step t before the release below
            tl.atomic_add(COUNT + pb, 1, sem="release", scope="gpu")


def _bwd_split_kernel(G, Z, OUT, W, BIAS, GZ, GH0, COUNT, STATUS, T, B, H, t0, n_steps, max_spins,
                      NL: tl.constexpr, PERSISTENT: tl.constexpr, ATOMIC_LOAD: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, HP: tl.constexpr):
    pb = tl.program_id(0)
    n_col = tl.num_programs(1)
    rb = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # this program's columns of dL/dz_t
    rk = tl.arange(0, HP)
    mb, mn, mk = rb < B, rn < H, rk < H
    m2 = mb[:, None] & mn[None, :]
    mbk = mb[:, None] & mk[None, :]
    w = tl.load(W + rk[:, None] * H + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)  # W[:, cols] [k, j]
    b = tl.load(BIAS + rn, mask=mn, other=0.0)
    limit = max_spins
    # step i = 0..T-1 writes dL/dz_t for t = T-1-i; i = T writes dL/dh0 = dL/dz_0 @ W
    for s in range(n_steps):
        i = t0 + s
        t = T - 1 - i
        # the last step (t = -1) reads step 0's g and z too, unused: every step issues the same loads
        off = tl.maximum(t, 0) * B * H + rb[:, None] * H + rn[None, :]
        g = tl.load(G + off, mask=m2, other=0.0)  # independent of the barrier: issued before the wait
        z = tl.load(Z + off, mask=m2, other=0.0)
        if PERSISTENT:
            if s > 0:  # wait until the row block's n_col programs have published dL/dz_{t+1}
                limit = wait_for(COUNT + pb, n_col * s, limit, STATUS, ATOMIC_LOAD)
        acc = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)  # [BLOCK_B, BLOCK_H] dL/dz_{t+1} @ W[:, cols]
        if i > 0:
            gzn = tl.load(GZ + (t + 1) * B * H + rb[:, None] * H + rk[None, :], mask=mbk, other=0.0,
                          cache_modifier=".cg")
            acc = tl.dot(gzn, w, input_precision="ieee")
        if t >= 0:
            tl.store(GZ + off, (g + acc) * phi_slope(z, b, OUT + off, m2, NL), mask=m2)
        else:
            tl.store(GH0 + rb[:, None] * H + rn[None, :], acc, mask=m2)
        if PERSISTENT:
            tl.debug_barrier()
            tl.atomic_add(COUNT + pb, 1, sem="release", scope="gpu")


class SplitPlan(NamedTuple):
    """How one call runs: ``grid`` (row blocks, column blocks) of ``block_h``-wide slices, and whether the
    persistent kernel runs (``persistent``), else why not (``reason``: one launch per step, or the row kernel)."""

    block_h: int
    grid: tuple[int, int]
    persistent: bool
    reason: str


# Set by tests and benchmarks to run the one-step-per-launch form on a GPU too (the interpreter always does).
FORCE_STEP_LAUNCHES = False
# What the last forward / backward ran: {"forward": (kernel, reason), "backward": ...}; benchmarks report it.
LAST_RUN: dict[str, tuple[str, str]] = {}


def widths_for(H: int) -> list[int]:
    """The column-slice widths :func:`plan` may pick at hidden size ``H``, narrowest first."""
    hp = max(16, triton.next_power_of_2(H))
    return [w for w in BLOCK_HS if w <= hp] or [BLOCK_HS[0]]


_WIDTH_OVERRIDE: list[int] = []  # set by only_width()


@contextlib.contextmanager
def only_width(block_h: int):
    """Within the block, :func:`plan` considers only ``block_h``: the first-use check proves each width
    that calls at this hidden size may run with (it runs a small batch, which would always get the narrowest)."""
    _WIDTH_OVERRIDE.append(block_h)
    try:
        yield
    finally:
        _WIDTH_OVERRIDE.pop()


def plan(B: int, H: int, device: torch.device) -> SplitPlan:
    """The launch for ``B`` rows of hidden size ``H`` on ``device``: the narrowest column slice whose grid
    fits one program per SM (co-residency, see the module docstring); the persistent kernel only compiled
    on CUDA with such a grid."""
    nb = triton.cdiv(B, BLOCK_B)
    widths = _WIDTH_OVERRIDE[-1:] or widths_for(H)
    if device.type != "cuda" or interpret_requested():
        w = widths[0]
        return SplitPlan(w, (nb, triton.cdiv(H, w)), False, "interpreter: one launch per step")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for w in widths:
        grid = (nb, triton.cdiv(H, w))
        if grid[0] * grid[1] <= sms:
            if FORCE_STEP_LAUNCHES:
                return SplitPlan(w, grid, False, "FORCE_STEP_LAUNCHES: one launch per step")
            return SplitPlan(w, grid, True, f"persistent: {grid[0] * grid[1]} programs on {sms} SMs")
    w = widths[-1]
    grid = (nb, triton.cdiv(H, w))
    return SplitPlan(w, grid, False, f"grid of {grid[0] * grid[1]} programs exceeds the {sms} SMs "
                                     f"(programs must be co-resident): row kernel")


def kernel_consts(hidden: int, block_h: int, backward: bool, nonlinearity: str, *, has_h0: bool = True,
                  persistent: bool = True) -> dict:
    """The constexprs of one launch (shared by the ops and :func:`compile_report`)."""
    consts = dict(NL=kernel_code(nonlinearity), PERSISTENT=persistent, ATOMIC_LOAD=_HAS_ATOMIC_LOAD,
                  BLOCK_B=BLOCK_B, BLOCK_H=block_h, HP=max(16, triton.next_power_of_2(hidden)))
    if not backward:
        consts["HAS_H0"] = has_h0
    return consts


def _run(fn, device, p: SplitPlan, buffers: tuple, dims: tuple[int, int, int], n_total: int,
         consts: dict) -> bool:
    """Launch ``fn`` over ``n_total`` steps: once (persistent) or once per step. True unless a bounded
    wait expired (the outputs are then not valid and the caller recomputes them)."""
    count = torch.zeros(p.grid[0], dtype=torch.int32, device=device)  # [row blocks] barrier counters
    status = torch.zeros(1, dtype=torch.int32, device=device)
    kernel = _launcher(fn, device)[p.grid]
    options = dict(consts, num_warps=NUM_WARPS, enable_fp_fusion=True)
    if p.persistent:
        kernel(*buffers, count, status, *dims, 0, n_total, MAX_SPINS, **options)
        return status.item() == 0  # the one host sync per call
    # one column block: no program reads another's output, so one launch runs every step
    per_launch = n_total if p.grid[1] == 1 else 1
    for t in range(0, n_total, per_launch):
        kernel(*buffers, count, status, *dims, t, per_launch, MAX_SPINS, **options)
    return True


def _fallback(direction: str, reason: str) -> None:
    LAST_RUN[direction] = ("rows", reason)
    warnings.warn(f"matrec: the column-split recurrence kernel ({direction}) fell back to the row kernel: "
                  f"{reason}", RuntimeWarning, stacklevel=4)


def _forward(xproj, weight, h0, bias, nonlinearity):
    T, B, H = xproj.shape
    p = plan(B, H, xproj.device)
    if p.reason.endswith("row kernel"):
        LAST_RUN["forward"] = ("rows", p.reason)
        return rows_kernel._forward(xproj, weight, h0, bias, nonlinearity, torch.float32)
    x = xproj.float().contiguous()                                         # [T, B, H]
    W = weight.float().contiguous()                                        # [H, H]
    b = bias.float().contiguous() if bias is not None else x.new_zeros(H)  # [H]
    h0c = h0.float().contiguous() if h0 is not None else x.new_zeros(1)    # [B, H], unread without h0
    out = torch.full_like(x, float("nan"))  # [T, B, H]; NaN-poisoned: an element the kernel skips shows up
    z = torch.full_like(x, float("nan"))    # [T, B, H] pre-activations
    consts = kernel_consts(H, p.block_h, False, nonlinearity, has_h0=h0 is not None, persistent=p.persistent)
    if not _run(_fwd_split_kernel, x.device, p, (x, W, h0c, b, out, z), (T, B, H), T, consts):
        _fallback("forward", f"a bounded wait expired ({p.reason}): programs not co-resident")
        return rows_kernel._forward(xproj, weight, h0, bias, nonlinearity, torch.float32)
    LAST_RUN["forward"] = ("split", p.reason)
    return out, z


def _backward(grad_out, z, out, weight, h0, bias, nonlinearity):
    T, B, H = z.shape
    p = plan(B, H, z.device)
    if p.reason.endswith("row kernel"):
        LAST_RUN["backward"] = ("rows", p.reason)
        return rows_kernel._backward(grad_out, z, out, weight, h0, bias, nonlinearity, torch.float32)
    g = grad_out.float().contiguous()                                      # [T, B, H]
    W = weight.float().contiguous()                                        # [H, H]
    b = bias.float().contiguous() if bias is not None else z.new_zeros(H)  # [H]
    gz = torch.full_like(z, float("nan"))   # [T, B, H] dL/dz_t, NaN-poisoned
    gh0 = z.new_full((B, H), float("nan"))  # [B, H] dL/dh0
    consts = kernel_consts(H, p.block_h, True, nonlinearity, persistent=p.persistent)
    if not _run(_bwd_split_kernel, z.device, p, (g, z, out, W, b, gz, gh0), (T, B, H), T + 1, consts):
        _fallback("backward", f"a bounded wait expired ({p.reason}): programs not co-resident")
        return rows_kernel._backward(grad_out, z, out, weight, h0, bias, nonlinearity, torch.float32)
    LAST_RUN["backward"] = ("split", p.reason)
    grad_W, grad_b = parameter_grads(gz, z, out, h0, nonlinearity)
    return gz, grad_W, gh0, grad_b


@torch.library.custom_op("matrec::rnn_recurrence_triton_split", mutates_args=())
def split_op(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
             nonlinearity: str) -> tuple[Tensor, Tensor]:
    return _forward(xproj, weight, h0, bias, nonlinearity)


@split_op.register_fake
def _(xproj, weight, h0, bias, nonlinearity):
    return (torch.empty_like(xproj, dtype=torch.float32), torch.empty_like(xproj, dtype=torch.float32))


@torch.library.custom_op("matrec::rnn_recurrence_triton_split_backward", mutates_args=())
def split_backward_op(grad_out: Tensor, z: Tensor, out: Tensor, weight: Tensor, h0: Tensor | None,
                      bias: Tensor | None, nonlinearity: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad_out, z, out, weight, h0, bias, nonlinearity)


@split_backward_op.register_fake
def _(grad_out, z, out, weight, h0, bias, nonlinearity):
    T, B, H = z.shape
    return torch.empty_like(z), z.new_empty(H, H), z.new_empty(B, H), z.new_empty(H)


register_recurrence_autograd(split_op, split_backward_op)


def compile_report(hidden: int, backward: bool = False, nonlinearity: str = "modrelu", *, block_h: int = 16,
                   has_h0: bool = True, persistent: bool = True, atomic_load: bool = _HAS_ATOMIC_LOAD,
                   arch: int = 90) -> dict:
    """Compile the split kernel for ``sm_<arch>`` (no GPU needed): ptxas's ``registers`` per thread and
    ``spills`` (spill-store bytes), ``shared_kib``, and the ``ptx`` and ``ttgir`` text, for the static checks
    (barrier instructions present, no load of ``W`` inside the time loop)."""
    fn = _bwd_split_kernel if backward else _fwd_split_kernel
    consts = kernel_consts(hidden, block_h, backward, nonlinearity, has_h0=has_h0, persistent=persistent)
    consts["ATOMIC_LOAD"] = atomic_load  # False: the acquire read-modify-write older Triton releases get

    def signature_of(arg: str) -> str:
        if arg in ("T", "B", "H", "t0", "n_steps", "max_spins"):
            return "i32"
        return "*i32" if arg in ("COUNT", "STATUS") else "*fp32"

    kernel = compile_ahead(fn, signature_of, consts, NUM_WARPS, arch)
    return rows_kernel.ptxas_report(kernel, arch) | dict(ttgir=kernel.asm["ttgir"], constexprs=consts)
