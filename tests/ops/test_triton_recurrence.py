"""The Triton recurrence kernels (on-chip and tiled) against the plain autograd loop.

CPU tensors run in Triton's interpreter (the same kernel bodies and block sizes as on a GPU, executed
in numpy), CUDA tensors compiled; ptxas checks what the interpreter cannot (spills, shared memory).
"""
import functools

import pytest
import torch

pytest.importorskip("triton")

from matrec.ops.orthogonal import project_orthogonal  # noqa: E402
from matrec.ops.rnn_recurrence import NONLINEARITIES, recurrence_reference  # noqa: E402
from matrec.ops.rnn_recurrence import triton as tr  # noqa: E402

NLS = NONLINEARITIES.names()
F32, BF16 = torch.float32, torch.bfloat16
H100_SHARED_KIB = 227  # per block (228 KiB per SM)


def make(T, B, H, nonlinearity, dtype, with_h0, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, H, generator=g).to(device, dtype).requires_grad_()
    W = project_orthogonal(torch.randn(H, H, generator=g, dtype=torch.float64)).to(device, F32).requires_grad_()
    h0 = torch.randn(B, H, generator=g).to(device, dtype).requires_grad_() if with_h0 else None
    b = (0.3 * torch.randn(H, generator=g)).to(device).requires_grad_() if nonlinearity == "modrelu" else None
    return x, W, h0, b


def assert_close(a, r):
    """Only the summation order differs (dL/dW is one GEMM over T*B terms in both, but the states
    reaching it differ by rounding after T steps), so the absolute slack scales with the tensor's
    largest entry. bf16: torch's bf16 relative tolerance on top (one rounding of float32 states that
    already differ by that slack: near zero one bf16 step is far above 1e-5)."""
    atol = max(1e-4, 2e-5 * r.abs().max().item())
    if r.dtype == BF16:
        torch.testing.assert_close(a, r, rtol=1.6e-2, atol=max(1e-5, atol / 10))
    else:
        torch.testing.assert_close(a, r, rtol=1e-4, atol=atol)


def rows_off_the_kinks(x, W, h0, b, nonlinearity, eps=3e-5):
    """Batch rows whose every pre-activation stays ``eps`` away from where the nonlinearity is not
    smooth (relu: z = 0; modReLU: |z| = -b, and z = 0 where b > 0, a jump of 2b).

    Two float32 implementations that sum in another order legitimately take the other branch at such
    a point, and that choice then propagates along the whole row (a different gradient, or for
    modReLU with b > 0 a different output): with millions of pre-activations (the CUDA cases) some
    land within rounding of a kink. Those rows compare nothing about the kernel, so they are left out.
    """
    T, B, H = x.shape
    if nonlinearity in ("tanh", "identity"):
        return torch.ones(B, dtype=torch.bool)
    xd, Wd = x.detach().double().cpu(), W.detach().double().cpu()
    bd = b.detach().double().cpu() if b is not None else None
    h = h0.detach().double().cpu() if h0 is not None else torch.zeros(B, H, dtype=torch.float64)
    near = torch.zeros(B, dtype=torch.bool)
    phi = NONLINEARITIES.get(nonlinearity).forward
    for t in range(T):
        z = xd[t] + h @ Wd.T  # [B, H]
        if nonlinearity == "relu":
            close = z.abs() < eps
        else:
            close = ((z.abs() + bd).abs() < eps) | ((z.abs() < eps) & (bd > 0))
        near |= close.any(dim=1)
        h = phi(z, bd)
    return ~near


def check(T, B, H, nonlinearity, dtype, with_h0, weight_dtype=F32, device="cpu"):
    """Outputs and every gradient (xproj, W, h0, modReLU bias) equal the loop's; all finite (the
    kernels' buffers start NaN-poisoned, so an element a kernel skips would show up)."""
    x, W, h0, b = make(T, B, H, nonlinearity, dtype, with_h0, device)
    # The kernel runs with W rounded to weight_dtype and returns dL/dW in float32 at that rounded W, so the
    # reference gets the rounded W as its own float32 leaf (a .to() in the graph would round dL/dW to bf16).
    Wr = W.detach().to(weight_dtype).to(F32).requires_grad_()
    keep = rows_off_the_kinks(x, Wr, h0, b, nonlinearity).to(device)  # [B]
    assert keep.float().mean() >= 0.5, "the case is too close to the kinks to test anything"
    if not keep.all():  # rows on a kink leave the batch on both sides (they are independent)
        x, h0 = (None if t is None else t.detach()[..., keep, :].requires_grad_() for t in (x, h0))
    inputs = [t for t in (x, W, h0, b) if t is not None]
    out = tr.triton_recurrence(x, W, h0, b, nonlinearity, weight_dtype=weight_dtype)
    ref = recurrence_reference(x, Wr, h0, b, nonlinearity)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    # bf16 I/O: the same float32 state on both sides, rounded once, so bf16's own tolerance
    assert_close(out, ref)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref_inputs = [Wr if t is W else t for t in inputs]
    for a, r, t in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, ref_inputs, grad), inputs):
        assert a.dtype == t.dtype and a.shape == t.shape and torch.isfinite(a).all()
        assert_close(a, r)
    return out, x, W, h0, b


ON_CHIP_CASES = [(1, 1, 1, F32, True), (7, 17, 5, BF16, False), (13, 3, 20, F32, True)]
TILED_CASES = [(1, 3, 130, F32, True), (7, 17, 200, BF16, False), (33, 2, 130, F32, False)]


@pytest.mark.parametrize("nonlinearity", NLS)
@pytest.mark.parametrize("T,B,H,dtype,with_h0", ON_CHIP_CASES + TILED_CASES)
def test_matches_reference(nonlinearity, T, B, H, dtype, with_h0):
    assert tr.config_for(H).tiled == (H > 64)  # the cases hit the kernel they are listed under
    check(T, B, H, nonlinearity, dtype, with_h0)


def test_hidden_512():
    check(2, 2, 512, "modrelu", F32, True)


@pytest.mark.parametrize("nonlinearity", NLS)
def test_tiled_kernel_with_small_tiles(nonlinearity, monkeypatch):
    """16 x 16 tiles at H = 37: three partial-tile loops per step, cheap enough for every nonlinearity."""
    small = tr.Config(True, block_b=16, block_n=16, block_k=16, num_warps=4)
    monkeypatch.setitem(tr._CONFIGS, F32, ((tr.MAX_HIDDEN, small, small),))
    check(7, 3, 37, nonlinearity, F32, True)


@pytest.mark.parametrize("nonlinearity", NLS)
@pytest.mark.parametrize("H,with_h0", [(20, False), (130, True)])
def test_bf16_weight(nonlinearity, H, with_h0):
    """bf16-stored W is exactly the float32 recurrence with W rounded (checked tightly in ``check``);
    against the unrounded W it is a precision trade of ~1e-2 relative after a few steps."""
    out, x, W, h0, b = check(7, 3, H, nonlinearity, F32, with_h0, weight_dtype=BF16)
    exact = recurrence_reference(x, W, h0, b, nonlinearity)
    err = ((out - exact).norm() / exact.norm()).item()
    assert 0 < err < 2e-2


@pytest.mark.parametrize("H,weight_dtype", [(20, F32), (130, F32), (130, BF16)])
def test_every_buffer_written(H, weight_dtype):
    """The ops' buffers (out, z; dL/dz, dL/dh0) start NaN: all must be overwritten, batch rows beyond
    one block included."""
    x, W, h0, b = (t.detach() for t in make(5, 19, H, "modrelu", F32, True))
    out, z = tr._OPS[weight_dtype](x, W, h0, b, "modrelu")
    assert torch.isfinite(out).all() and torch.isfinite(z).all()
    grads = torch.ops.matrec.rnn_recurrence_triton_backward if weight_dtype == F32 else \
        torch.ops.matrec.rnn_recurrence_triton_bf16w_backward
    for g in grads(torch.randn_like(out), z, out, W, h0, b, "modrelu"):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("weight_dtype", [F32, BF16])
@pytest.mark.parametrize("H", [4, 70])
def test_op_registration(H, weight_dtype):
    x, W, h0, b = (t.detach() for t in make(3, 2, H, "modrelu", F32, True))
    torch.library.opcheck(tr._OPS[weight_dtype], (x, W, h0, b, "modrelu"))


def test_torch_compile_fullgraph():
    x, W, h0, b = make(3, 2, 70, "modrelu", F32, True)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, W, h0, b: tr.triton_recurrence(x, W, h0, b, "modrelu", weight_dtype=BF16),
                       fullgraph=True, backend="aot_eager")
    out = fn(x, W, h0, b)
    want = tr.triton_recurrence(x, W, h0, b, "modrelu", weight_dtype=BF16)
    torch.testing.assert_close(out, want)
    inputs = [x, W, h0, b]
    got, want_g = torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(want.sum(), inputs)
    torch.testing.assert_close(got, want_g)


def test_config_table_covers_every_size():
    for wdt in tr.WEIGHT_DTYPES:
        for H in range(1, tr.MAX_HIDDEN + 1):
            for backward in (False, True):
                assert isinstance(tr.config_for(H, wdt, backward), tr.Config)


def test_bad_arguments(monkeypatch):
    x, W, h0, b = make(3, 2, 4, "modrelu", F32, True)
    with pytest.raises(ValueError, match=r"hidden size must be in \[1, 512\]"):
        H = tr.MAX_HIDDEN + 1
        tr.triton_recurrence(torch.zeros(1, 1, H), torch.eye(H), None, None, "tanh")
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        tr.triton_recurrence(x, W, h0, b, weight_dtype=torch.float16)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        tr.triton_recurrence(x, W, h0, b, "gelu")
    # a nonlinearity registered after the kernel was written (no kernel code) is refused by name
    from matrec.ops.rnn_recurrence import NONLINEARITIES, Phi
    monkeypatch.setitem(NONLINEARITIES._items, "softsign",
                        Phi(lambda z, b: z / (1 + z.abs()), lambda z, h, b: (1 - h.abs()) ** 2))
    with pytest.raises(ValueError, match="for the Triton recurrence, got 'softsign'"):
        tr.triton_recurrence(x, W, h0, None, "softsign")
    with pytest.raises(ValueError, match="at least one time step"):
        tr.triton_recurrence(x[:0], W, h0, b)
    huge = torch.zeros(1).expand(2**13, 2**9, 2**9)  # 2**31 elements, no memory
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 elements"):
        tr.triton_recurrence(huge, torch.eye(2**9), None, None, "tanh")


@pytest.mark.parametrize("H,weight_dtype", [(64, F32), (512, F32), (512, BF16)])
@pytest.mark.parametrize("backward", [False, True])
def test_compiled_for_h100_without_spills(H, weight_dtype, backward):
    """ptxas for sm_90 (no GPU needed): the chosen kernel compiles (the interpreter accepts code the
    compiler would reject), does not spill, fits the H100's shared memory, and uses no TF32."""
    r = tr.compile_report(H, weight_dtype, backward, "modrelu")
    assert r["spills"] == 0 and r["shared_kib"] <= H100_SHARED_KIB
    assert "tf32" not in r["ptx"]


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
def test_every_nonlinearity_compiles(nonlinearity):
    for backward in (False, True):
        assert tr.compile_report(200, F32, backward, nonlinearity)["spills"] == 0


@pytest.mark.parametrize("H", [20, 200])
def test_forward_without_h0_compiles(H):
    assert tr.compile_report(H, F32, False, "tanh", has_h0=False)["spills"] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("nonlinearity", NLS)
@pytest.mark.parametrize("T,B,H,dtype,with_h0", [(100, 33, 5, F32, True), (100, 33, 64, BF16, False),
                                                 (100, 33, 130, F32, False), (50, 130, 512, F32, True)])
@pytest.mark.parametrize("weight_dtype", [F32, BF16])
def test_cuda_matches_reference(nonlinearity, T, B, H, dtype, with_h0, weight_dtype):
    check(T, B, H, nonlinearity, dtype, with_h0, weight_dtype=weight_dtype, device="cuda")


# ------------------------------------------------------------------------------------------------
# The column-split kernels (matrec.ops.rnn_recurrence.triton_split). The interpreter runs their one-step
# launches (the persistent kernel's body without its barrier); the sm_90 compile checks the barrier.

from matrec.ops.rnn_recurrence import dispatch  # noqa: E402
from matrec.ops.rnn_recurrence import triton_split as ts  # noqa: E402


def check_split(T, B, H, nonlinearity, with_h0, seed=0):
    """The split kernel's outputs, final state and every gradient against the float64 loop on the same
    (float32) inputs; rows on a kink are left out as in ``check``."""
    x, W, h0, b = make(T, B, H, nonlinearity, F32, with_h0, seed=seed)
    keep = rows_off_the_kinks(x, W, h0, b, nonlinearity)
    assert keep.float().mean() >= 0.5, "the case is too close to the kinks to test anything"
    x, h0 = (None if t is None else t.detach()[..., keep, :].requires_grad_() for t in (x, h0))
    inputs = [t for t in (x, W, h0, b) if t is not None]
    ts.LAST_RUN.clear()
    out = tr.triton_recurrence(x, W, h0, b, nonlinearity, kernel="split")
    assert ts.LAST_RUN["forward"] == ("split", "interpreter: one launch per step")
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_args = iter(ref_inputs)
    ref = recurrence_reference(*[None if t is None else next(ref_args) for t in (x, W, h0, b)], nonlinearity)
    assert out.shape == x.shape and torch.isfinite(out).all()  # the buffers start NaN: all written
    assert_close(out, ref.float())
    assert_close(out[-1], ref[-1].float())  # the final state, which a caller carries on
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got, want = torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, ref_inputs, grad.double())
    assert ts.LAST_RUN["backward"][0] == "split"
    for a, r, t in zip(got, want, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape and torch.isfinite(a).all()
        assert_close(a, r.float())


# (T, B, H, with_h0, nonlinearities): one step; two row blocks and three column slices of 16 (one partial);
# a long run with one slice (a single launch; the slow test below crosses slices for 100 steps)
SPLIT_CASES = [(1, 2, 5, True, ("modrelu", "identity", "tanh")), (7, 17, 37, True, ("modrelu", "identity")),
               (7, 3, 20, False, ("tanh", "relu")), (100, 3, 13, True, ("modrelu", "identity"))]


@pytest.mark.parametrize("T,B,H,with_h0,nonlinearity",
                         [(T, B, H, h0, nl) for T, B, H, h0, nls in SPLIT_CASES for nl in nls])
def test_split_matches_float64_reference(T, B, H, with_h0, nonlinearity):
    check_split(T, B, H, nonlinearity, with_h0)


@pytest.mark.slow
@pytest.mark.parametrize("nonlinearity", ["modrelu", "identity"])
def test_split_long_run_across_slices(nonlinearity):
    """100 steps whose state crosses between two column slices every step (~8 s interpreted)."""
    check_split(100, 3, 20, nonlinearity, True)


class _Props:
    multi_processor_count = 132  # an H100/H200


@pytest.mark.parametrize("B,H,block_h,persistent", [(128, 256, 16, True), (128, 512, 32, True),
                                                    (64, 512, 16, True), (3, 5, 16, True),
                                                    (512, 512, 32, False)])
def test_split_plan_on_a_132_sm_gpu(B, H, block_h, persistent, monkeypatch):
    """The narrowest slice whose grid fits one program per SM; beyond, the row kernel, with the reason."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    p = ts.plan(B, H, torch.device("cuda"))
    assert p.block_h == block_h and p.persistent == persistent
    assert p.grid == (-(-B // 16), -(-H // block_h))
    if not persistent:
        assert p.reason.endswith("row kernel") and "exceeds the 132 SMs" in p.reason
    with ts.only_width(32):  # what the first-use check uses to prove each width
        assert ts.plan(B, H, torch.device("cuda")).block_h == 32


def test_split_falls_back_when_a_wait_expires(monkeypatch):
    """A persistent launch whose bounded wait expired: the call is recomputed by the row kernel, with a
    warning naming the reason (the launch itself is simulated: no barrier runs on CPU)."""
    monkeypatch.setattr(ts, "plan", lambda B, H, device: ts.SplitPlan(16, (1, 2), True, "persistent: 2 programs"))
    monkeypatch.setattr(ts, "_run", lambda *args: False)
    x, W, h0, b = make(3, 2, 20, "modrelu", F32, True)
    with pytest.warns(RuntimeWarning, match="fell back to the row kernel: a bounded wait expired"):
        out = tr.triton_recurrence(x, W, h0, b, "modrelu", kernel="split")
    assert ts.LAST_RUN["forward"][0] == "rows"
    assert_close(out, recurrence_reference(x, W, h0, b, "modrelu"))
    with pytest.warns(RuntimeWarning, match=r"\(backward\) fell back"):
        out.sum().backward()
    assert ts.LAST_RUN["backward"][0] == "rows" and torch.isfinite(W.grad).all()


def run_split_kernels(grid, persistent, T=5, B=19, H=13, nonlinearity="modrelu"):
    """The forward and backward split kernels launched directly on ``grid`` (interpreted): ``(ok forward,
    ok backward, out, dL/dz, dL/dh0)``."""
    x, W, h0, b = (t.detach() for t in make(T, B, H, nonlinearity, F32, True))
    W = W.contiguous()
    p = ts.SplitPlan(16, grid, persistent, "a test grid")
    out, z = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    consts = ts.kernel_consts(H, 16, False, nonlinearity, persistent=persistent)
    ok_f = ts._run(ts._fwd_split_kernel, x.device, p, (x, W, h0, b, out, z), (T, B, H), T, consts)
    g = torch.randn(T, B, H, generator=torch.Generator().manual_seed(1))
    gz, gh0 = torch.full_like(x, float("nan")), torch.full((B, H), float("nan"))
    consts = ts.kernel_consts(H, 16, True, nonlinearity, persistent=persistent)
    ok_b = ts._run(ts._bwd_split_kernel, x.device, p, (g, z, out, W, b, gz, gh0), (T, B, H), T + 1, consts)
    return ok_f, ok_b, out, gz, gh0


def test_split_persistent_body_with_its_barrier_in_the_interpreter(monkeypatch):
    """The persistent kernel itself, barrier code included, on a grid where each program waits only for
    itself (one column slice; two row blocks, each with its own counter): every wait is met (a target
    counting one arrival too many would expire: STATUS set, _run False) and the results are the
    one-step form's, bitwise."""
    monkeypatch.setattr(ts, "MAX_SPINS", 20)
    ok_f, ok_b, *persistent = run_split_kernels((2, 1), True)
    assert ok_f and ok_b
    _, _, *steps = run_split_kernels((2, 1), False)
    assert all(torch.equal(a, c) and torch.isfinite(a).all() for a, c in zip(persistent, steps))


def test_split_bounded_wait_expires_in_the_interpreter(monkeypatch):
    """Two column slices run one after the other (the interpreter's order): the first program's wait at
    step 1 can never be met, so it must expire and say so (a target one arrival too low would not
    wait at all), in the forward and the backward. Its later waits must not spin again (one acquire
    load each): the call is recomputed anyway, and on a stalled GPU each would cost MAX_SPINS loads."""
    spins, T = 20, 3
    monkeypatch.setattr(ts, "MAX_SPINS", spins)
    loads, per_launch = [], []
    acquire, run = ts.acquire_load, ts._run
    # an interpreted body looks its helpers up at each call, so this counts the acquire loads
    monkeypatch.setattr(ts, "acquire_load", lambda *args: loads.append(1) or acquire(*args))

    def counted_run(*args):
        loads.clear()
        ok = run(*args)
        per_launch.append(len(loads))
        return ok

    monkeypatch.setattr(ts, "_run", counted_run)
    ok_f, ok_b, *_ = run_split_kernels((1, 2), True, T=T, B=3, H=20)
    assert not ok_f and not ok_b
    # forward T steps, backward T + 1; a wait before every step but the first. Program 0: its first wait
    # spins out (1 + spins loads), each later one is a single load; program 1, run once program 0 has
    # finished, finds every wait met at its first load.
    assert per_launch == [(1 + spins + waits - 1) + waits for waits in (T - 1, T)]


def test_split_bad_arguments():
    x, W, h0, b = make(3, 2, 4, "modrelu", F32, True)
    with pytest.raises(ValueError, match="kernel must be one of"):
        tr.triton_recurrence(x, W, h0, b, kernel="columns")
    with pytest.raises(ValueError, match="kernel='split' needs weight_dtype=torch.float32"):
        tr.triton_recurrence(x, W, h0, b, kernel="split", weight_dtype=BF16)


def test_split_op_registration():
    x, W, h0, b = (t.detach() for t in make(3, 2, 20, "modrelu", F32, True))
    torch.library.opcheck(ts.split_op, (x, W, h0, b, "modrelu"))


# --- static checks of the sm_90 compile -----------------------------------------------------------


def loads_in_time_loop_from(ttgir: str, arg: str) -> list[str]:
    """The global loads (``tt.load``, async copies to shared memory, TMA loads) inside the kernel's first
    top-level ``scf.for`` (the time loop) whose pointer
    derives (through addptr, splat, broadcast, ...) from the kernel argument ``arg``.

    The printed names are scoped per region (two branches may both define ``%hp``), so a name stands for
    every op that defines it: a load is reported if any of them leads to ``arg``, which can only add
    reports, never hide one."""
    import re

    defs = {}  # SSA name -> the values read by every op that defines that name
    for line in ttgir.splitlines():
        m = re.match(r"\s*(%[\w.]+)(?::\d+)? = (.*)$", line)
        if m:
            defs.setdefault(m.group(1), []).extend(r.split("#")[0] for r in re.findall(r"%[\w.#]+", m.group(2)))
        for inner, init in re.findall(r"(%[\w.]+) = (%[\w.#]+)[,)]", line):  # loop-carried: iter_args(%a = %init)
            defs.setdefault(inner, []).append(init.split("#")[0])

    def from_arg(value, seen):
        if value == f"%{arg}":
            return True
        seen.add(value)
        return any(from_arg(v, seen) for v in defs.get(value, ()) if v not in seen)

    lines = ttgir.splitlines()
    start = next(i for i, line in enumerate(lines) if " scf.for " in line)
    depth, hits = 0, []
    for line in lines[start:]:
        depth += line.count("{") - line.count("}")
        m = re.search(r"(?:tt\.load|async_copy_global_to_local|descriptor_load) (%[\w.#]+)", line)
        if m and from_arg(m.group(1).split("#")[0], set()):
            hits.append(line.strip()[:120])
        if depth <= 0:
            break
    return hits


@functools.lru_cache(maxsize=None)
def split_report(H, backward, block_h, nonlinearity="modrelu", persistent=True, atomic_load=ts._HAS_ATOMIC_LOAD):
    return ts.compile_report(H, backward, nonlinearity, block_h=block_h, persistent=persistent,
                             atomic_load=atomic_load)


def has_acquire_load(ptx: str) -> bool:
    """An acquire load at GPU scope: ``ld.acquire`` (as ptxas spells it with or without the state space),
    an acquire atomic, or a relaxed load followed by an acquire fence (how tl.atomic_load lowers)."""
    import re

    if re.search(r"ld\.(global\.)?(gpu\.)?acquire|ld\.acquire\.gpu|atom\.global\.gpu\.acquire", ptx):
        return True
    return bool(re.search(r"ld\.relaxed\.gpu\.global[^\n]*\n(?:[^\n]*\n){0,3}?\s*fence\.(acquire|acq_rel)\.gpu", ptx))


SPLIT_BUILDS = [(256, 16), (512, 32)]  # B = 128's plans at H 256 and 512 (test_split_plan_on_a_132_sm_gpu)


@pytest.mark.parametrize("H,block_h", SPLIT_BUILDS)
@pytest.mark.parametrize("backward", [False, True])
def test_split_compiled_for_h100(H, block_h, backward):
    """The persistent kernel builds for sm_90, does not spill, fits the shared memory, uses no TF32, and
    its barrier is in the PTX: a release add at GPU scope and acquire loads (a relaxed load followed by
    an acquire fence, or ld.acquire)."""
    import re

    r = split_report(H, backward, block_h)
    assert r["spills"] == 0 and r["shared_kib"] <= H100_SHARED_KIB and "tf32" not in r["ptx"]
    assert re.search(r"(red|atom)\.global\.gpu\.release\.add", r["ptx"])
    assert has_acquire_load(r["ptx"])
    assert re.search(r"ld\.global\.cg", r["ptx"])  # h_{t-1} (dL/dz_{t+1}) read from L2, past a stale L1
    # the step's stores reach the release through a CTA barrier: between the last global store before
    # the release add and the add itself there is a bar.sync (all threads' stores, not just thread 0's)
    release = re.search(r"(red|atom)\.global\.gpu\.release\.add", r["ptx"]).start()
    last_store = r["ptx"].rfind("st.global", 0, release)
    assert 0 <= last_store and "bar.sync" in r["ptx"][last_store:release]


@pytest.mark.parametrize("backward", [False, True])
def test_split_barrier_without_atomic_load(backward):
    """Triton releases without tl.atomic_load spin on an acquire read-modify-write of 0 instead."""
    import re

    r = split_report(256, backward, 16, atomic_load=False)
    assert r["spills"] == 0 and has_acquire_load(r["ptx"])
    assert re.search(r"(red|atom)\.global\.gpu\.release\.add", r["ptx"])


def test_split_one_step_variant_has_no_barrier():
    """The same body with PERSISTENT off (what the interpreter tests) compiles without the barrier
    instructions, so the check above sees the barrier's, not something else's."""
    ptx = split_report(256, False, 16, persistent=False)["ptx"]
    assert "release" not in ptx and not has_acquire_load(ptx)


@pytest.mark.parametrize("H,block_h", SPLIT_BUILDS)
@pytest.mark.parametrize("backward", [False, True])
def test_split_loads_w_once_before_the_time_loop(H, block_h, backward):
    r = split_report(H, backward, block_h)
    assert loads_in_time_loop_from(r["ttgir"], "W") == []
    assert loads_in_time_loop_from(r["ttgir"], "OUT" if not backward else "GZ")  # the state is read per step


def test_w_load_check_finds_a_load_in_the_loop():
    """The tiled row kernel streams W^T tiles inside its time loop: the check must say so."""
    from matrec.ops.triton_support import compile_ahead

    fn, consts, warps = tr.kernel_plan(200, F32, False, "modrelu")
    kernel = compile_ahead(fn, lambda a: "i32" if a in ("T", "B", "H") else "*fp32", consts, warps)
    assert loads_in_time_loop_from(kernel.asm["ttgir"], "W")


# --- auto on CUDA, behind the first-use check ----------------------------------------------------


@pytest.fixture
def fake_cuda_triton(monkeypatch):
    """A device that Triton can run on, as far as auto can tell, with the check's verdict settable."""
    from matrec.ops import kernel_guard

    kernel_guard.reset()
    monkeypatch.setattr(dispatch, "_triton_available", lambda device: (True, "triton on CUDA"))
    verdict = {"reason": None}
    monkeypatch.setitem(kernel_guard.KERNEL_CHECKS._items, "rnn_recurrence",
                        lambda device, dtype, size: verdict["reason"])
    yield verdict
    kernel_guard.reset()


def test_auto_picks_triton_on_cuda_for_modrelu_and_identity(fake_cuda_triton):
    cuda = torch.device("cuda")
    for nonlinearity in ("modrelu", "identity"):
        assert dispatch._triton_auto(cuda, F32, (1000, 128, 256), nonlinearity)
    assert dispatch._triton_auto(cuda, BF16, (10, 4, 512), "modrelu")
    assert not dispatch._triton_auto(cuda, F32, (10, 4, 256), "tanh")  # MORNN runs it on cuDNN
    assert not dispatch._triton_auto(cuda, torch.float64, (10, 4, 256), "modrelu")
    assert not dispatch._triton_auto(cuda, F32, (10, 4, 513), "modrelu")


def test_auto_keeps_torch_when_the_check_fails(fake_cuda_triton):
    fake_cuda_triton["reason"] = "d weight relative error 1e-1 > 1e-04 (modrelu)"
    with pytest.warns(RuntimeWarning, match="failed its first-use check"):
        assert not dispatch._triton_auto(torch.device("cuda"), F32, (10, 4, 96), "modrelu")


def test_first_use_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    """The check itself (on the interpreted kernel): None on the real kernel, the reason on a wrong one."""
    assert dispatch.check_triton_kernel(torch.device("cpu"), F32, 6) is None
    import dataclasses

    spec = dispatch.RECURRENCE_BACKENDS.get("triton")
    wrong = dataclasses.replace(spec, function=lambda x, W, h0, b, nl: spec.function(x, W * 1.001, h0, b, nl))
    monkeypatch.setitem(dispatch.RECURRENCE_BACKENDS._items, "triton", wrong)
    assert "relative error" in dispatch.check_triton_kernel(torch.device("cpu"), F32, 6)


# --- on a GPU (pytest -m cuda; benchmarks/gpu_check.py part tests) -------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("nonlinearity", ["modrelu", "identity", "tanh"])
def test_cuda_split_persistent_matches_reference_and_one_step_launches(nonlinearity, monkeypatch):
    """The persistent kernel at B 128, H 256 (128 programs, a barrier per step) against the float64
    reference, and bitwise equal to the one-step launches of the same body (same per-step maths, same
    summation order): a barrier that let a program read a stale h_{t-1} would show as a difference."""
    T, B, H = 300, 128, 256
    x, W, h0, b = make(T, B, H, nonlinearity, F32, True, device="cuda")
    out = tr.triton_recurrence(x, W, h0, b, nonlinearity, kernel="split")
    assert ts.LAST_RUN["forward"][0] == "split" and ts.LAST_RUN["forward"][1].startswith("persistent")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [t for t in (x, W, h0, b) if t is not None], grad)
    assert ts.LAST_RUN["backward"][1].startswith("persistent")
    monkeypatch.setattr(ts, "FORCE_STEP_LAUNCHES", True)
    steps = tr.triton_recurrence(x, W, h0, b, nonlinearity, kernel="split")
    assert ts.LAST_RUN["forward"][1].startswith("FORCE_STEP_LAUNCHES")
    steps_grads = torch.autograd.grad(steps, [t for t in (x, W, h0, b) if t is not None], grad)
    assert torch.equal(out, steps) and all(torch.equal(a, c) for a, c in zip(grads, steps_grads))
    ref = recurrence_reference(*[None if t is None else t.detach().double() for t in (x, W, h0, b)], nonlinearity)
    assert_close(out.double(), ref)


@pytest.mark.cuda
def test_cuda_split_bounded_wait_expires_when_programs_are_not_co_resident(monkeypatch):
    """A grid far larger than the GPU holds at once (2048 column programs of one row block, all in one
    barrier): the first wave's waits expire, STATUS is set, and _run says so instead of hanging."""
    monkeypatch.setattr(ts, "MAX_SPINS", 1 << 12)
    T, B, H = 3, 2, 16
    x, W, h0, b = (t.detach() for t in make(T, B, H, "modrelu", F32, True, device="cuda"))
    out, z = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    p = ts.SplitPlan(16, (1, 2048), True, "a test grid")
    consts = ts.kernel_consts(H, 16, False, "modrelu", persistent=True)
    assert not ts._run(ts._fwd_split_kernel, x.device, p, (x, W, h0, b, out, z), (T, B, H), T, consts)


@pytest.mark.cuda
def test_cuda_split_falls_back_on_a_grid_larger_than_the_gpu():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    B = 16 * (sms // 16 + 1)  # with H 512 and 32-wide slices: 16 column programs per row block
    x, W, h0, b = make(2, B, 512, "modrelu", F32, True, device="cuda")
    tr.triton_recurrence(x, W, h0, b, "modrelu", kernel="split")
    assert ts.LAST_RUN["forward"][0] == "rows" and "co-resident" in ts.LAST_RUN["forward"][1]


@pytest.mark.cuda
@pytest.mark.parametrize("nonlinearity", ["modrelu", "identity"])
def test_cuda_auto_proves_the_split_kernel_then_uses_it(nonlinearity, monkeypatch):
    from matrec.ops import kernel_guard

    monkeypatch.delenv(kernel_guard.ENV_VAR, raising=False)
    kernel_guard.reset()
    x, W, h0, b = make(50, 40, 96, nonlinearity, F32, True, device="cuda")
    out = dispatch.recurrence(x, W, h0, b, nonlinearity)  # auto
    key = ("rnn_recurrence", str(torch.device("cuda", torch.cuda.current_device())), F32, 96)
    ok, reason = kernel_guard.verdicts()[key]
    assert ok, reason
    assert ts.LAST_RUN["forward"] == ("split", "persistent: 18 programs on "
                                      f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    ref = recurrence_reference(*[None if t is None else t.detach().double() for t in (x, W, h0, b)], nonlinearity)
    assert_close(out.double(), ref)
