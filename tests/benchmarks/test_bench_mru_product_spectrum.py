"""benchmarks/mru_product_spectrum.py: the renormalised singular values of running products equal
the plain products' where those fit in float64, the exact ones where they do not, and a trained
run's MRU state matrices are the ones its own layer multiplies."""
import math

import pytest
import torch

import matrec
from matrec.train import Trainer, TrainConfig
from support import SHAKESPEARE_FILE, load_benchmark

spectrum = load_benchmark("mru_product_spectrum")


def plain_extremes(M):
    """log of the largest and smallest singular value of each prefix product, formed directly."""
    P = torch.eye(M.shape[-1], dtype=torch.float64).expand(*M.shape[:-3], -1, -1)
    tops, bottoms = [], []
    for t in range(M.shape[-3]):
        P = P @ M[..., t, :, :]
        s = torch.linalg.svdvals(P)
        tops.append(s[..., 0].log())
        bottoms.append(s[..., -1].log())
    return torch.stack(tops, -1), torch.stack(bottoms, -1)


@pytest.mark.parametrize("T, chunk", [(1, 64), (7, 3), (100, 7)])
def test_extremes_equal_the_plain_products(T, chunk):
    g = torch.Generator().manual_seed(T)
    M = torch.eye(4, dtype=torch.float64) + 0.1 * torch.randn(2, 3, T, 4, 4, generator=g, dtype=torch.float64)
    top, bottom = spectrum.log_singular_extremes(M, chunk)
    ref_top, ref_bottom = plain_extremes(M)
    # the plain SVD's smallest value is only accurate while the condition number is far below 1e16
    assert (ref_top - ref_bottom).max() < math.log(1e8)
    torch.testing.assert_close(top, ref_top, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bottom, ref_bottom, rtol=1e-7, atol=1e-7)


def test_extremes_beyond_float64_range_are_exact():
    # M = U diag(2, 1/2, 1) U^T: P_t has singular values 2^t and 2^-t, 2^3000 ~ 1e903 > float64's max
    U = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    M = (U @ torch.diag(torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)) @ U.T).expand(3000, 3, 3)
    top, bottom = spectrum.log_singular_extremes(M, chunk=64)
    t = torch.arange(1, 3001, dtype=torch.float64)
    torch.testing.assert_close(top, t * math.log(2), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(bottom, -t * math.log(2), rtol=1e-10, atol=1e-8)
    with pytest.raises(FloatingPointError, match="grew past float64 within 2000 steps"):
        spectrum.log_sigma_max_of_products(M * 2, chunk=2000)


def test_a_singular_matrix_makes_the_smallest_singular_value_zero_from_then_on():
    M = torch.eye(2, dtype=torch.float64).repeat(5, 1, 1) * 1.5
    M[2] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    top, bottom = spectrum.log_singular_extremes(M, chunk=2)
    assert torch.isfinite(bottom[:2]).all() and (bottom[2:] == -math.inf).all()
    torch.testing.assert_close(top, torch.tensor([1, 2, 2, 3, 4], dtype=torch.float64) * math.log(1.5))


@pytest.mark.skipif(not SHAKESPEARE_FILE.exists(), reason="needs the tiny-shakespeare file")
@pytest.mark.parametrize("normalize", [None, "spectral"])
def test_a_trained_runs_state_matrices_are_its_layers(tmp_path, normalize):
    cfg = TrainConfig(task="shakespeare", task_args={"seq_len": 16, "path": str(SHAKESPEARE_FILE)}, model="mru",
                      model_args={"d_model": 16, "n_layers": 1, "n_heads": 2, "state_matrix": "ldu",
                                  "normalize": normalize},
                      steps=3, batch_size=2, lr=0.05, eval_every=3, eval_batches=1, ckpt_every=3, seed=0,
                      out_dir=str(tmp_path / "runs"), run_name="r", progress=False, plot=False,
                      tensorboard=False, threads=1)
    trainer = Trainer(cfg)
    trainer.train()
    T = 150
    (name, M), = spectrum.state_matrices_of_run(tmp_path / "runs" / "r", T).items()
    # reference: the layer itself in float64 on the same tokens, its own scan's states H_t
    layer = dict(trainer.model.named_modules())[name].double()
    task = matrec.data.tasks.build_task("shakespeare", seq_len=T, path=str(SHAKESPEARE_FILE))
    x, _ = task.get_batch("val", 1, torch.Generator().manual_seed(0))
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        trainer.model.double()(x)
        handle.remove()
        raw = layer.in_proj(captured["x"]) * layer.element_scale
        M_ref = matrec.ops.state_matrix.state_matrix("ldu", raw.view(1, T, 2, layer.numel).transpose(1, 2), layer.order)
        if normalize is not None:
            M_ref = matrec.ops.state_matrix.spectral_normalize(M_ref)
        H = matrec.mru_scan(M_ref)[0]                                              # [h, T, d, d]
    torch.testing.assert_close(M, M_ref[0])
    assert not torch.allclose(M, torch.eye(layer.order, dtype=torch.float64).expand_as(M))  # trained off the identity
    s = torch.linalg.svdvals(H)
    top, bottom = spectrum.log_singular_extremes(M)
    # (the layer's scan multiplies in another order: rounding differs at ~1e-8 after 150 steps)
    torch.testing.assert_close(top, s[..., 0].log(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bottom, s[..., -1].log(), rtol=1e-6, atol=1e-6)
    if normalize is not None:
        assert top.max() <= 1e-12   # the normalised product never grows
    table = spectrum.main(["--runs", str(tmp_path / "runs" / "r"), "--length", str(T)])
    row, = table.rows
    assert row["seeds"] == 1 and row["max_top"] == pytest.approx(s[..., 0].max().log10().item(), rel=1e-6)
    assert row["train_top"] == pytest.approx(s[:, 15, 0].max().log10().item(), rel=1e-6)   # trained at seq_len 16
    assert row["f32"] == "no"
    # a run without an MRU layer is left out (no forward over the long sequence)
    other = TrainConfig.from_dict({**cfg.to_dict(), "model": "attn", "model_args": {"d_model": 8, "n_layers": 1},
                                   "run_name": "a"})
    Trainer(other).train()
    assert spectrum.state_matrices_of_run(tmp_path / "runs" / "a", T) == {}
    assert len(spectrum.analyse(tmp_path / "runs", T).rows) == 1
