"""The Triton recurrence kernels (on-chip and tiled) against the plain autograd loop.

CPU tensors run in Triton's interpreter (the same kernel bodies and block sizes as on a GPU, executed
in numpy), CUDA tensors compiled; ptxas checks what the interpreter cannot (spills, shared memory).
"""
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
