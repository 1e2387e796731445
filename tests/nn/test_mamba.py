"""The mamba mixer (mambapy, the `mamba` extra): equal to mambapy's own block, streamable in chunks."""
import subprocess
import sys

import pytest
import torch

import matrec
from matrec.models import MIXERS, num_parameters

mamba = pytest.importorskip("mambapy.mamba", reason="needs the mamba extra (pip install 'matrec[mamba]')")


def make(seed=0, d_model=12, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    mixer = MIXERS.get("mamba")(d_model, d_state=4, **options)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer.to(dtype)


# mambapy computes A and D in float32 whatever the parameters' dtype: the comparisons with its own
# forward and step run in float32; the mixer's own consistency (chunks, gradients) in float64
F32 = dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("T", [1, 7, 100])
def test_equals_mambapys_own_block_outputs_and_gradients(T):
    mixer = make(T, dtype=torch.float32)
    x = torch.randn(2, T, 12, requires_grad=True)
    y, _ = mixer(x)
    y_ref = mixer.block(x)  # the package's forward, from a zero state
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # float32: the same operations
    cot = torch.randn_like(y)
    leaves = [x, *mixer.parameters()]
    g = torch.autograd.grad((y * cot).sum(), leaves)
    g_ref = torch.autograd.grad((y_ref * cot).sum(), leaves)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **F32)


def test_sequential_scan_of_the_package_agrees():
    mixer = make(3, dtype=torch.float32)
    mixer.block.config.pscan = False  # mambapy's step-by-step selective scan
    x = torch.randn(2, 100, 12)
    torch.testing.assert_close(mixer(x)[0], mixer.block(x), **F32)


@pytest.mark.parametrize("chunks", [(1, 1, 1), (3, 1, 7), (5, 6)])
def test_chunks_with_state_equal_one_call_and_the_packages_steps(chunks):
    mixer = make(1, d_conv=4)
    T = sum(chunks)
    x = torch.randn(2, T, 12, dtype=torch.float64)
    full, _ = mixer(x)
    ys, state, t = [], None, 0
    for c in chunks:
        y, state = mixer(x[:, t:t + c], state)
        ys.append(y)
        t += c
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-10, atol=1e-10)
    # mambapy's one-token step from its (h, inputs) cache: the same state layout (float32)
    mixer, x = mixer.float(), x.float()
    full, state = mixer(x)
    cache = (None, torch.zeros(2, mixer.config.d_inner, 3))
    steps = []
    for i in range(T):
        y, cache = mixer.block.step(x[:, i], cache)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), full, **F32)
    torch.testing.assert_close(state[0], cache[0], **F32)
    torch.testing.assert_close(state[1], cache[1], **F32)


def test_model_is_registered_and_sized():
    model = matrec.build_model("mamba", vocab_size=10, output_size=9, d_model=18, n_layers=2)
    out, state = model(torch.randint(0, 10, (2, 5)))
    assert out.shape == (2, 5, 9)
    assert 13_000 < num_parameters(model) < 15_500  # matched to MORNN hidden 128 (14,089)
    with pytest.raises(ValueError, match="n_layers is not an option of the mamba mixer"):
        MIXERS.get("mamba")(8, n_layers=2)


def test_import_matrec_does_not_import_mambapy():
    code = "import sys, matrec, matrec.models; print('mambapy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
