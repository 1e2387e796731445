"""Every recipe of docs/architecture.md, done exactly as the page says: one registration, then use."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from matrec import MRU, build_model, generate, mru_scan
from matrec.data.tasks import TASKS, Task, build_task
from matrec.models.mixers import MIXERS
from matrec.nn.init import init_linear
from matrec.nn.protocol import StateSpec
from matrec.ops.mru_scan import SCAN_BACKENDS, ScanBackend, naive_mru_scan
from matrec.ops.rnn_recurrence import NONLINEARITIES, Phi, recurrence, recurrence_reference
from matrec.ops.state_matrix import STATE_MATRICES, StateMatrix


@pytest.fixture
def registered():
    """Registers through the public registry and removes the entries afterwards."""
    added = []

    def register(registry, name, obj):
        registry.register(name, obj)
        added.append((registry, name))
        return obj

    yield register
    for registry, name in reversed(added):
        registry.unregister(name)


class CumulativeMean(nn.Module):
    """A causal mixer: y_t = W (mean of the valid x_1..x_t); state (running sum [B, E], count [B, 1])."""

    def __init__(self, d_model: int, *, n_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.d_model = d_model
        self.proj = nn.Linear(d_model, d_model)

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.proj, residual_std)

    def state_spec(self) -> list[StateSpec]:
        return [StateSpec("total", ("B", self.d_model)), StateSpec("count", ("B", 1))]

    def forward(self, x: Tensor, state=None, *, mask: Tensor | None = None):
        B, T, E = x.shape
        total, count = (x.new_zeros(B, E), x.new_zeros(B, 1)) if state is None else state
        keep = x.new_ones(B, T, 1) if mask is None else mask[..., None].to(x.dtype)  # padding adds nothing
        sums = total[:, None] + (x * keep).cumsum(1)  # [B, T, E]
        counts = count[:, None] + keep.cumsum(1)  # [B, T, 1]
        return self.proj(sums / counts.clamp(min=1)), (sums[:, -1], counts[:, -1])


@pytest.fixture
def mean_model(registered):
    """The recipe's mixer registered, and a model built with it (tokens 0..10)."""
    registered(MIXERS, "cumulative_mean", CumulativeMean)
    torch.manual_seed(0)
    return build_model("sequence", pattern=["cumulative_mean", "mlp"], vocab_size=11, output_size=11)


def assert_same_with_grads(out, ref, inputs):
    """Equal values, and equal gradients of every input under one random cotangent."""
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for a, b in zip(torch.autograd.grad(out, inputs, w), torch.autograd.grad(ref, inputs, w)):
        torch.testing.assert_close(a, b)


def test_add_a_mixer(mean_model):
    model = mean_model
    x = torch.randint(0, 11, (2, 9))
    out, _ = model(x)
    assert out.shape == (2, 9, 11)
    # causal and stateful: streaming in two pieces equals one call, so generation can pass the state
    first, state = model(x[:, :4])
    second, _ = model(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), out)
    streamed = generate(model, x[:, :3], 5, temperature=0)
    refed = generate(model, x[:, :3], 5, temperature=0, use_state=False)
    assert torch.equal(streamed, refed)


def test_an_added_mixer_exports(mean_model):
    """The mixer of the recipe exports as it is (export/ knows nothing of it): the export form is
    the model's own forward, streamed, with padding; below, its ONNX graph matches the model."""
    from matrec.export import exportable

    model = mean_model.eval()
    x = torch.randint(0, 11, (1, 9))
    with torch.no_grad():
        want = model(x)[0]
        form = exportable(model, "step")
        out, *state = form(x[:, :4], torch.ones(1, 4, dtype=torch.bool), *form.initial_state())
        torch.testing.assert_close(out, want[:, :4])
        assert form.state_names == ["0.total", "0.count"] and state[1].item() == 4
        mask = torch.tensor([[True] * 3 + [False] * 2])   # two padded steps add nothing
        _, *state = form(x[:, 4:9], mask, *state)
        torch.testing.assert_close(state[1], torch.tensor([[7.0]]))


@pytest.mark.slow  # an ONNX export: ~10 s
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed (export extra)")
def test_an_added_mixer_runs_in_onnx_runtime(mean_model, tmp_path):
    from matrec.export import export, exportable, load

    model = mean_model.eval()
    x = torch.randint(0, 11, (1, 9))
    with torch.no_grad():
        want = model(x)[0]
    path = tmp_path / "mean.onnx"
    export(exportable(model), path, "onnx", max_length=32)
    runner = load(path, threads=1)
    for T in (1, 7):
        got, _ = runner(x[:, :T])
        torch.testing.assert_close(got, want[:, :T], atol=1e-5, rtol=1e-5)
    got, state = runner(x[:, :4])
    got2, _ = runner(x[:, 4:], state=state)
    torch.testing.assert_close(torch.cat((got, got2), 1), want, atol=1e-5, rtol=1e-5)


class Stateless(nn.Module):
    """A mixer outside the protocol (no mask, no state_spec): it runs, and export names what it lacks."""

    def __init__(self, d_model: int, *, n_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)

    def init_weights(self, std: float, residual_std: float) -> None:
        init_linear(self.proj, residual_std)

    def forward(self, x: Tensor, state=None):
        return self.proj(x), None


def test_a_mixer_outside_the_protocol_is_refused_by_export_naming_what_it_lacks(registered):
    from matrec.export import UnsupportedModelError, exportable

    registered(MIXERS, "stateless", Stateless)
    model = build_model("sequence", pattern=["mlp", "stateless"], vocab_size=5, output_size=5)
    assert model(torch.randint(0, 5, (1, 3)))[0].shape == (1, 3, 5)
    with pytest.raises(UnsupportedModelError, match=r"layer 1 \(mixer 'stateless', Stateless\) does not implement "
                       r"the mixer protocol .*its forward takes no mask\); state_spec\(\)"):
        exportable(model)


class NoInit(CumulativeMean):
    init_weights = None


def test_a_mixer_without_init_weights_is_named(registered):
    registered(MIXERS, "no_init", NoInit)
    with pytest.raises(TypeError, match=r"mixer 'no_init' \(NoInit\) must define init_weights"):
        build_model("sequence", pattern=["no_init"], vocab_size=5, output_size=5)


def test_add_a_state_construction(registered):
    def diagonal(x: Tensor, d: int) -> Tensor:  # exp of a diagonal: identity at x = 0
        return torch.diag_embed(torch.exp(x))

    registered(STATE_MATRICES, "diagonal", StateMatrix(build=diagonal, numel=lambda d: d, guarantee="none"))
    torch.manual_seed(0)
    mru = MRU(16, num_heads=2, state_matrix="diagonal")
    x = torch.randn(2, 7, 16, requires_grad=True)
    y, state = mru(x)
    assert y.shape == (2, 7, 16) and state.shape == (2, 2, 2, 2)
    y.sum().backward()
    assert x.grad is not None and mru.in_proj.weight.grad.abs().sum() > 0


def test_add_a_scan_backend(registered):
    def written_out(x: Tensor, chunk_size=None) -> Tensor:
        """A pattern: the sequential one written out (x [N, T, r, d], r = d or 2d)."""
        d = x.shape[-1]
        for t in range(1, x.shape[1]):
            prev, cur = x[:, t - 1], x[:, t]
            new = prev @ cur[..., :d, :]
            if cur.shape[-2] > d:
                new[..., d:, :] += cur[..., d:, :]
            x[:, t] = new
        return x

    registered(SCAN_BACKENDS, "mine", ScanBackend(pattern=written_out))
    g = torch.Generator().manual_seed(0)
    M = torch.linalg.matrix_exp(0.1 * torch.randn(3, 7, 4, 4, generator=g, dtype=torch.float64))
    M.requires_grad_()
    assert_same_with_grads(mru_scan(M, backend="mine"), naive_mru_scan(M), [M])
    assert MRU(16, backend="mine").backend == "mine"

    def nowhere(device):
        return False, "needs a device that does not exist"

    registered(SCAN_BACKENDS, "never", ScanBackend(pattern=written_out, available=nowhere))
    with pytest.raises(RuntimeError, match="backend 'never' is not available on cpu: needs a device"):
        mru_scan(M, backend="never")


class Parity(Task):
    """Features [B, T, 1] of 0/1; target: the parity of the last two bits (at every step)."""

    name = "parity"
    input_size = 1
    output_size = 2

    def __init__(self, length: int = 8) -> None:
        self.length = length

    def get_batch(self, split, batch_size, generator):
        bits = torch.randint(0, 2, (batch_size, self.length), generator=generator)
        prev = torch.cat([torch.zeros_like(bits[:, :1]), bits[:, :-1]], 1)
        return bits[..., None].float(), (bits + prev) % 2

    def loss(self, output, target):
        return F.cross_entropy(output.reshape(-1, 2).float(), target.reshape(-1))


def test_add_a_task(registered, tmp_path):
    from matrec.train import Trainer, TrainConfig

    registered(TASKS, "parity", Parity)
    assert isinstance(build_task("parity", length=5), Parity)
    cfg = TrainConfig(task="parity", task_args={"length": 8}, model="gru", model_args={"hidden_size": 8},
                      batch_size=4, steps=3, eval_every=3, eval_batches=1, log_every=1, ckpt_every=3,
                      out_dir=str(tmp_path), run_name="parity", progress=False, tensorboard=False, plot=False,
                      threads=1, device="cpu")
    summary = Trainer(cfg).train()
    assert summary["eval"]["loss"] > 0


def test_add_a_nonlinearity(registered):
    softsign = Phi(lambda z, b: z / (1 + z.abs()), lambda z, h, b: (1 - h.abs()) ** 2)
    registered(NONLINEARITIES, "softsign", softsign)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0].requires_grad_()
    assert_same_with_grads(recurrence(x, W, None, None, "softsign", backend="torch"),
                           recurrence_reference(x, W, None, None, "softsign"), [x, W])
    with pytest.raises(ValueError, match="nonlinearity 'softsign' is not supported by backend='chunked'"):
        recurrence(x, W, None, None, "softsign", backend="chunked")
