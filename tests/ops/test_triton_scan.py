"""The Triton MRU scan against the sequential reference, on CPU (Triton's interpreter) and CUDA.

``matrec.ops.mru_scan.triton`` picks compiled or interpreted kernels per call from the tensors' device and
``TRITON_INTERPRET`` at that moment, so the order in which test modules import triton does not matter:
each CPU test sets the variable with ``monkeypatch`` (restored afterwards), each CUDA test clears it
so the real compiled kernel runs. Shapes are tiny because the interpreter is slow.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from matrec.ops.mru_scan import naive_mru_scan  # noqa: E402
from matrec.ops.mru_scan import triton as triton_scan  # noqa: E402
from matrec.ops.mru_scan.triton import mru_scan_triton, triton_available  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.cuda),
]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative to the max entry


@pytest.fixture
def device(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # every buffer the kernels write starts as NaN: an element left unwritten shows up
    monkeypatch.setattr(triton_scan, "_empty", lambda shape, like, dtype=None: torch.full(
        shape, math.nan, device=like.device, dtype=dtype or like.dtype))
    return torch.device(request.param)


def _states(N, T, d, dtype, device, gen):
    """Near-identity ``[N, T, d, d]``: products over 100 steps stay O(1), so a relative bound is fair."""
    noise = torch.randn(N, T, d, d, generator=gen) * (0.3 / math.sqrt(d))
    return (torch.eye(d) + noise).to(device=device, dtype=dtype)


def _assert_close(got, want, dtype, what):
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite entries (unwritten output?)"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1.0), f"{what}: max error {err:.3g} at scale {scale:.3g}"


def _check(N, T, d, dtype, with_h0, chunk_size, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    M = _states(N, T, d, dtype, device, gen).requires_grad_()
    H0 = None
    if with_h0:
        H0 = (torch.randn(N, d, d, generator=gen) / math.sqrt(d)).to(device, dtype).requires_grad_()
    grad = torch.randn(N, T, d, d, generator=gen).to(device, dtype)

    out = mru_scan_triton(M, H0, chunk_size=chunk_size)
    inputs = [M] + ([H0] if with_h0 else [])
    got = torch.autograd.grad(out, inputs, grad)

    # reference in float64 from the very same (rounded) inputs: fp32 arithmetic is what is tested
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref = naive_mru_scan(ref_inputs[0], ref_inputs[1] if with_h0 else None)
    want = torch.autograd.grad(ref, ref_inputs, grad.double())

    assert out.shape == (N, T, d, d)
    _assert_close(out, ref, dtype, "H")
    _assert_close(got[0], want[0], dtype, "dL/dstates")
    if with_h0:
        _assert_close(got[1], want[1], dtype, "dL/dinitial_state")


# (N, T, d, chunk_size): odd T, several orders, single chunk (None on CPU) and chunk sizes that do not
# divide T, so both the one-pass path and the three-phase path run.
CASES = [
    (2, 1, 2, None),
    (3, 7, 3, None),
    (2, 7, 3, 3),
    (2, 33, 8, 4),
    (1, 33, 16, 10),
    (1, 100, 2, 7),
    (1, 100, 16, None),
    (1, 9, 32, 4),
    (2, 5, 1, 2),  # d = 1 and d = 64: the ends of the documented 1 <= d <= 64
    (1, 5, 64, 2),
    # several sequences per program (8 at d <= 8, 4 at d = 16): odd N leaves the last program a tail
    (9, 7, 8, 3),
    (5, 33, 16, 10),
    (3, 1, 16, None),
    (11, 7, 3, None),
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("N,T,d,chunk_size", CASES)
def test_matches_reference_fp32(N, T, d, chunk_size, with_h0, device):
    _check(N, T, d, torch.float32, with_h0, chunk_size, device)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype,with_h0,N,T,d,chunk_size", [
    (torch.bfloat16, True, 2, 7, 3, 2),
    (torch.bfloat16, False, 1, 33, 16, None),
    (torch.bfloat16, True, 1, 100, 8, 16),
    (torch.float16, True, 2, 33, 5, 8),
])
def test_matches_reference_half(dtype, with_h0, N, T, d, chunk_size, device):
    _check(N, T, d, dtype, with_h0, chunk_size, device)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_chunk_size_does_not_change_result(device):
    gen = torch.Generator().manual_seed(1)
    M = _states(2, 20, 4, torch.float32, device, gen)
    outs = [mru_scan_triton(M, chunk_size=c) for c in (1, 3, 20, 64)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(2)
    M = _states(2, 5, 3, torch.float32, device, gen).transpose(-1, -2)  # a view, not contiguous
    H0 = torch.randn(3, 3, 2, generator=gen).to(device).permute(2, 0, 1)
    torch.testing.assert_close(mru_scan_triton(M, H0), naive_mru_scan(M, H0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_empty_sequence(device):
    M = torch.zeros(2, 0, 3, 3, device=device, requires_grad=True)
    H0 = torch.randn(2, 3, 3, device=device, requires_grad=True)
    out = mru_scan_triton(M, H0)
    assert out.shape == (2, 0, 3, 3)
    out.sum().backward()
    assert torch.equal(H0.grad, torch.zeros_like(H0))


def test_opcheck(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(3)
    M = _states(3, 5, 2, torch.float32, "cpu", gen).requires_grad_()
    H0 = torch.randn(3, 2, 2, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.matrec.triton_mru_scan_fwd, (M, H0, 2))
    torch.library.opcheck(torch.ops.matrec.triton_mru_scan_fwd, (M, None, 0))
    for chunk_size, h0 in ((2, H0.detach()), (0, None)):  # three chunks (totals kept), one (none)
        H, P = torch.ops.matrec.triton_mru_scan_fwd(M.detach(), h0, chunk_size)
        assert P.numel() == (3 * 3 * 8 * 8 if chunk_size else 0)  # N * n_chunks * D * D, D = 8
        G = torch.randn_like(H)
        torch.library.opcheck(torch.ops.matrec.triton_mru_scan_bwd, (G, M.detach(), H, P, h0, chunk_size))


def test_default_chunking_on_a_gpu(monkeypatch):
    """The CUDA heuristic, with the SM count of an H100/H200 (132) faked: enough sequence groups for
    4 programs per SM -> one chunk each; fewer -> chunks of max(16, ceil(sqrt(T))) steps; never more
    than 65535 chunks."""
    props = type("Props", (), {"multi_processor_count": 132})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    triton_scan._sm_count.cache_clear()
    cuda = torch.device("cuda")
    try:
        assert triton_scan._chunk_size(4 * 132 * 4, 512, cuda, 0, seq=4) == 512
        assert triton_scan._chunk_size(240, 512, cuda, 0, seq=4) == 23  # (80, 3, 512, 16): 23 chunks
        assert triton_scan._chunk_size(384, 256, cuda, 0, seq=8) == 16  # (64, 6, 256, 8): 16 chunks
        assert triton_scan._chunk_size(32, 4096, cuda, 0, seq=4) == 64  # (8, 4, 4096, 16): 64 chunks
        assert triton_scan._chunk_size(1, 65536, cuda, 0) == 256
        assert triton_scan._chunk_size(1, 40, cuda, 0) == 16
        assert triton_scan._chunk_size(1, 10, cuda, 0) == 10  # never longer than the sequence
        assert triton_scan._chunk_size(1, 10**8, cuda, 1) == math.ceil(10**8 / 65535)
        assert triton_scan._chunk_size(2, 100, torch.device("cpu"), 0) == 100
        assert triton_scan._chunk_size(2, 100, torch.device("cpu"), 7) == 7
    finally:
        triton_scan._sm_count.cache_clear()


def test_padding_follows_the_installed_triton(monkeypatch):
    """D = d rounded up to a power of two, at least the K the installed Triton's fp32 dot accepts:
    8 in Triton 3.9 (so d = 8 runs unpadded), 16 where an older Triton asks for it."""
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9):
        assert triton_scan._min_dot_k() == 8
    k = triton_scan._min_dot_k()
    assert [triton_scan._padded(d) for d in (5, 8, 9, 17, 64)] == [max(k, x) for x in (8, 8, 16, 32, 64)]
    monkeypatch.setattr(triton_scan, "_min_dot_k", lambda: 16)
    assert [triton_scan._padded(d) for d in (1, 3, 8, 16, 17)] == [16, 16, 16, 16, 32]
    assert triton_scan.launch_config(8) is triton_scan.CONFIGS[16]


def test_scan_cost_counts_bytes_and_fmas():
    """The analytic model gpu_check prints beside each timing, against a count by hand: one chunk
    moves exactly the floor; split, M and dH are read twice and the fp32 chunk buffers move."""
    cpu = torch.device("cpu")
    D = triton_scan._padded(8)
    one = triton_scan.scan_cost(3, 10, 8, 4, cpu)  # one chunk (the CPU default)
    unit = 3 * 10 * 8 * 8 * 4
    assert one["n_chunks"] == 1 and one["bytes"] == one["floor_bytes"] == {"fwd": 2 * unit, "bwd": 4 * unit}
    seq = triton_scan.launch_config(8).seq  # FMAs executed count whole groups of sequences
    assert one["fmas"] == {"fwd": seq * 10 * D**3, "bwd": 2 * seq * 10 * D**3}
    D = triton_scan._padded(3)
    split = triton_scan.scan_cost(3, 10, 3, 2, cpu, chunk_size=4)  # bf16, 3 chunks of <= 4 steps
    unit, block = 3 * 10 * 3 * 3 * 2, 3 * 3 * D * D * 4
    assert split["n_chunks"] == 3 and split["floor_bytes"] == {"fwd": 2 * unit, "bwd": 4 * unit}
    assert split["bytes"] == {"fwd": 3 * unit + 4 * block, "bwd": 6 * unit + 5 * block}
    seq = triton_scan.launch_config(3).seq
    assert split["fmas"] == {"fwd": seq * (2 * 10 + 3) * D**3, "bwd": seq * (3 * 10 + 3) * D**3}
    assert split["useful_fmas"] == {"fwd": 3 * 10 * 27, "bwd": 2 * 3 * 10 * 27}


def test_launch_plan_is_cached():
    """A call resolves nothing on the host beyond a cache lookup: the same shape gives the same plan
    object, and its grids cover every sequence with SEQ per program."""
    cpu = torch.device("cpu")
    plan = triton_scan._plan(9, 100, 3, cpu, 7)
    assert triton_scan._plan(9, 100, 3, cpu, 7) is plan
    assert (plan.D, plan.cfg.seq, plan.chunk, plan.n_chunks) == (8, 8, 7, 15)
    assert plan.grid == (2, 15) and plan.grid_seq == (2,)  # ceil(9 / 8) groups: the last one masked
    assert plan.totals_shape() == (9 * 15 * 8 * 8,)
    assert triton_scan._plan(9, 100, 3, cpu, 0).totals_shape() == (0,)  # one chunk: no totals


@pytest.mark.cuda
def test_long_orthogonal_sequence_cuda(monkeypatch):
    """T = 65536 with orthogonal states (no overflow) and one sequence: the default chunking splits it;
    outputs and gradients match the PyTorch chunked scan."""
    from matrec.ops.mru_scan import mru_scan

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(1, 65536, 8, 8, generator=gen, dtype=torch.float64))
    M = Q.float().cuda().requires_grad_()
    grad = torch.randn(1, 65536, 8, 8, generator=gen).cuda()
    out = mru_scan_triton(M)
    (got,) = torch.autograd.grad(out, M, grad)
    ref = mru_scan(M, backend="chunked")
    (want,) = torch.autograd.grad(ref, M, grad)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)


KERNEL_LAUNCHES = [  # every body with each constexpr branch its launches use
    ("mru_fwd_chunk_total", {}),
    ("mru_fwd_chunk_carry", {"HAS_H0": False}),
    ("mru_fwd_apply", {"CARRY": 0}),
    ("mru_fwd_apply", {"CARRY": 1}),
    ("mru_fwd_apply", {"CARRY": 2}),
    ("mru_bwd_chunk_affine", {}),
    ("mru_bwd_chunk_carry", {}),
    ("mru_bwd_apply", {"FROM_CARRY": False, "HAS_H0": True}),
    ("mru_bwd_apply", {"FROM_CARRY": True, "HAS_H0": False}),
]
TIME_LOOPS = {  # body -> global loads per step of its time loop (all pipelined)
    "mru_fwd_chunk_total": 1, "mru_fwd_chunk_carry": 1, "mru_fwd_apply": 1,
    "mru_bwd_chunk_affine": 2, "mru_bwd_chunk_carry": 2, "mru_bwd_apply": 3,
}


def _assert_static(kernel, name, pipelined=True):
    """The sm_90 facts the issue asks of every kernel: a cubin, no TF32, no register spill, and the time
    loop's loads all issued ahead as asynchronous copies (no synchronous global load in the loop)."""
    from matrec.ops.triton_inspect import loop_loads, ptxas_usage

    assert kernel.asm["cubin"]
    assert "tf32" not in kernel.asm["ptx"]
    usage = ptxas_usage(kernel, 90)
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"{name} spills: {usage}"
    (loop,) = loop_loads(kernel.asm["ttgir"])  # one time loop per body
    if pipelined:
        assert loop == {"sync": 0, "async": TIME_LOOPS[name]}, f"{name}: loads in the loop {loop}"


@pytest.mark.parametrize("io_dtype,d", [("fp32", 16), ("bf16", 8)])
@pytest.mark.parametrize("name,flags", KERNEL_LAUNCHES)
def test_kernels_compile_for_h100(name, flags, io_dtype, d):
    """The interpreter runs Python, so it accepts code Triton's compiler rejects; compiling each body
    to a cubin for sm_90 (no GPU needed) checks the GPU path, with the static checks above."""
    kernel = triton_scan.compile_for_target(name, d=d, io_dtype=io_dtype, arch=90, **flags)
    _assert_static(kernel, name)


HOT_LOOPS = [("mru_fwd_apply", {"CARRY": 2}), ("mru_bwd_chunk_affine", {}),
             ("mru_bwd_apply", {"FROM_CARRY": True, "HAS_H0": True})]


@pytest.mark.parametrize("d", [3, 8, 32])
@pytest.mark.parametrize("name,flags", HOT_LOOPS)
def test_hot_loops_for_every_order_used(name, flags, d):
    """The per-step kernels at the other padded orders (D = 8 with real d < 8, D = 8, 32): each entry of
    CONFIGS that the kernel is meant for (d <= 32) builds without spills and pipelines its loads.
    (d = 64's backward spills, see CONFIGS.)"""
    _assert_static(triton_scan.compile_for_target(name, d=d, arch=90, **flags), name)


def test_pipelining_check_can_fail():
    """The control for the check above: with one stage Triton's pipeliner is off, and the same check
    sees every load of the backward's step as synchronous."""
    from matrec.ops.triton_inspect import loop_loads

    kernel = triton_scan.compile_for_target("mru_bwd_apply", d=16, arch=90, stages=1, FROM_CARRY=True,
                                            HAS_H0=True)
    assert loop_loads(kernel.asm["ttgir"]) == [{"sync": 3, "async": 0}]


class _TinyMixer(torch.nn.Module):
    """x [B, T, d*d] -> identity + linear -> MRU scan -> read-out, the way a model uses the kernel."""

    def __init__(self, d):
        super().__init__()
        self.d = d
        self.proj = torch.nn.Linear(d * d, d * d)

    def forward(self, x):  # x: [B, T, d*d]
        B, T, _ = x.shape
        M = torch.eye(self.d) + 0.1 * self.proj(x).view(B, T, self.d, self.d)  # [B, T, d, d]
        H = mru_scan_triton(M)  # [B, T, d, d]
        return H.flatten(-2).sum(-1)  # [B, T]


def test_torch_compile_fullgraph(monkeypatch):
    """The op is opaque to dynamo: fullgraph compiles and gradients match eager. (aot_eager keeps the
    test fast; inductor on CPU also works but its C++ build takes a minute, see docs/kernel.md.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    model = _TinyMixer(3)
    x = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(4))
    eager = model(x)
    eager.sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w)


def test_mru_layer_compiles_fullgraph_with_the_kernel(monkeypatch):
    """The public path a model takes (MRU -> mru_scan(backend="triton") -> the op), not the op alone:
    backend lookup and availability check must trace without a graph break; grads match eager."""
    from matrec.nn.mru import MRU

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MRU(16, num_heads=2, state_size=32, backend="triton")  # d = 4
    with torch.no_grad():
        layer.in_proj.weight.normal_()  # zero at init: give the states something to mix
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(8))
    s0 = torch.linalg.matrix_exp(0.3 * torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(9)))
    y, s = layer(x, s0)
    (y.square().sum() + s.sum()).backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y2, s2 = compiled(x, s0)
    (y2.square().sum() + s2.sum()).backward()
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(s2, s)
    for p, w in zip(layer.parameters(), want):
        torch.testing.assert_close(p.grad, w)
    exported = torch.export.export(layer, (x, s0))
    torch.testing.assert_close(exported.module()(x, s0)[0], y.detach())


def test_torch_export_keeps_the_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _TinyMixer(2)
    x = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(5))
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.matrec.triton_mru_scan_fwd.default in targets
    torch.testing.assert_close(exported.module()(x), model(x))


def test_mru_layer_trains_the_same_with_the_kernel(monkeypatch):
    """Model-level check in miniature: an MRU layer (ldu states, state streamed across steps so the
    kernel's initial-state path runs) gives the same losses and state gradients step by step with
    the kernel as with the loop backend."""
    from matrec.nn.mru import MRU

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 11, 16, generator=gen)  # [steps, B, T, E]
    target = torch.randn(3, 2, 11, 16, generator=gen)
    losses, state_grads = {}, {}
    for backend in ("sequential", "triton"):
        torch.manual_seed(0)
        layer = MRU(16, num_heads=2, state_size=32, backend=backend)  # d = 4
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        state, losses[backend], state_grads[backend] = None, [], []
        for step in range(3):
            y, new_state = layer(x[step], state)
            loss = torch.nn.functional.mse_loss(y, target[step])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if state is not None:
                state_grads[backend].append(state.grad)
            state = new_state.detach().requires_grad_()  # a leaf: the kernel's dH0 lands in .grad
            losses[backend].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["sequential"], rel=1e-5)
    assert len(state_grads["triton"]) == 2
    for got, want in zip(state_grads["triton"], state_grads["sequential"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert losses["triton"][0] != losses["triton"][-1]  # it did train


def test_triton_available_reports_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = triton_available("cpu")
    assert not ok and "TRITON_INTERPRET" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mru_scan_triton(torch.eye(2).expand(1, 3, 2, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available(torch.device("cpu"))[0]
    ok, reason = triton_available("meta")
    assert not ok and "meta" in reason
    if not torch.cuda.is_available():
        ok, reason = triton_available("cuda")
        assert not ok and "CUDA" in reason


@pytest.mark.parametrize("states,initial_state,chunk_size,error,match", [
    (torch.zeros(3, 2, 2), None, None, ValueError, "states must be a \\[N, T, d, d\\]"),
    (torch.zeros(1, 3, 2, 3), None, None, ValueError, "states must be a .* square matrices"),
    (torch.zeros(1, 3, 2, 2, dtype=torch.float64), None, None, TypeError, "states must be float32, bfloat16"),
    (torch.zeros(1, 3, 65, 65), None, None, ValueError, "states must hold matrices of order 1..64"),
    (torch.zeros(1, 3, 2, 2), torch.zeros(2, 2, 2), None, ValueError, "initial_state must be"),
    (torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int32), None, TypeError,
        "initial_state must be float32"),
    (torch.zeros(1, 3, 2, 2), None, 0, ValueError, "chunk_size must be an int >= 1 or None"),
    (torch.zeros(1, 3, 2, 2), None, True, ValueError, "chunk_size must be an int >= 1 or None"),
])
def test_bad_input_is_named(states, initial_state, chunk_size, error, match):
    with pytest.raises(error, match=match):
        mru_scan_triton(states, initial_state, chunk_size=chunk_size)
