"""GPU paths against the CPU reference: every test here is marked ``cuda`` and skips without one.

``pytest -m cuda`` (part ``tests`` of benchmarks/gpu_check.py) runs these with the kernel tests of
test_triton_scan.py / test_triton_recurrence.py and the trainer's bf16 run.
"""
import pytest
import torch

import matrec
from matrec.ops import kernel_guard
from matrec.ops.mru_scan import SCAN_BACKENDS, naive_mru_scan

pytestmark = pytest.mark.cuda


def rotations(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    d = shape[-1]
    return torch.linalg.matrix_exp((A - A.mT) * (0.3 / d**0.5))


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("backend", [b for b in SCAN_BACKENDS.names()])
@pytest.mark.parametrize("T,d", [(1, 3), (7, 8), (100, 16), (257, 64)])
def test_every_scan_backend_on_cuda_matches_the_loop(backend, T, d):
    M, H0 = rotations(3, T, d, d), rotations(3, d, d, seed=1)
    G = torch.randn(3, T, d, d, dtype=torch.float64)
    ref_in = (M.clone().requires_grad_(), H0.clone().requires_grad_())
    ref = naive_mru_scan(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, G)
    x, h = M.float().cuda().requires_grad_(), H0.float().cuda().requires_grad_()
    out = matrec.mru_scan(x, h, backend=backend)
    grads = torch.autograd.grad(out, (x, h), G.float().cuda())
    assert rel(out, ref) < 1e-4
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_proves_the_kernel_then_uses_it(dtype, monkeypatch):
    monkeypatch.delenv(kernel_guard.ENV_VAR, raising=False)
    kernel_guard.reset()
    x = rotations(2, 300, 8, 8).to("cuda", dtype)
    out = matrec.mru_scan(x)  # auto
    ok, reason = kernel_guard.verdicts()[("mru_scan", str(torch.device("cuda", torch.cuda.current_device())), dtype, 8)]
    assert ok, reason
    assert rel(out.float(), naive_mru_scan(x.double().cpu())) < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("nonlinearity,backend", [
    ("tanh", "auto"), ("relu", "auto"),
    ("modrelu", "torch"), ("modrelu", "triton"),
    ("identity", "torch"), ("identity", "chunked"), ("identity", "triton"),
])
@pytest.mark.parametrize("T", [1, 7, 100])
def test_mornn_on_cuda_matches_cpu(nonlinearity, backend, T, monkeypatch):
    # tanh/relu run cuDNN, which computes in TF32 unless told not to (as for nn.RNN): the first GPU
    # run measured 3e-4 relative error with it on; the check here is of the float32 path.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    # the reference is the CPU op in float64 (Triton's interpreter would run a "triton" CPU model)
    cpu = matrec.MORNN(5, 32, num_layers=2, batch_first=True, nonlinearity=nonlinearity,
                       recurrence_backend="torch" if backend == "triton" else backend).double()
    gpu = matrec.MORNN(5, 32, num_layers=2, batch_first=True, nonlinearity=nonlinearity,
                       recurrence_backend=backend).cuda()
    gpu.load_state_dict({k: v.float() for k, v in cpu.state_dict().items()})
    x = torch.randn(3, T, 5, dtype=torch.float64)
    out_c, h_c = cpu(x)
    xg = x.float().cuda().requires_grad_()
    out_g, h_g = gpu(xg)
    assert rel(out_g, out_c) < 1e-4 and rel(h_g, h_c) < 1e-4
    (out_c.sum() + h_c.sum()).backward()
    (out_g.sum() + h_g.sum()).backward()
    pc, pg = dict(cpu.named_parameters()), dict(gpu.named_parameters())
    for name in pc:
        assert rel(pg[name].grad, pc[name].grad) < 1e-3, name


@pytest.mark.parametrize("state_matrix", ["ldu", "cayley", "expm"])
def test_mru_layer_under_bf16_autocast_matches_fp32(state_matrix):
    torch.manual_seed(0)
    mru = matrec.MRU(64, num_heads=4, state_matrix=state_matrix).cuda()
    x = torch.randn(2, 129, 64, device="cuda")
    ref, _ = mru(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, state = mru(x)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert rel(y.float(), ref) < 5e-2
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mru.parameters() if p.grad is not None)


@pytest.mark.parametrize("preset", ["shakespeare-mru", "shakespeare-attn", "shakespeare-linear_attn"])
def test_presets_train_a_step_on_cuda(preset):
    torch.manual_seed(0)
    model = matrec.build_model(preset, vocab_size=65, output_size=65).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (4, 65), device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
