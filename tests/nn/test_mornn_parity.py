"""MORNN against nn.RNN where test_mornn.py does not reach: packed sequences, dropout masks and bad
input compared call for call; orthogonality of every layer and direction under several optimisers,
bf16 autocast and loading; the recurrent matrix built once per forward, on the fast paths."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import matrec.nn.mornn as mornn_module
import matrec.nn.orthogonal as parametrisation
from matrec.nn.mornn import MORNN, MORNNCell
from matrec.ops.orthogonal import orthogonality_error, project_orthogonal
from support import orthogonal_rnn


@torch.no_grad()
def max_orth_error(m) -> float:
    """max |W^T W - I| over every layer and direction of ``m``."""
    return max(float(orthogonality_error(getattr(m, n))) for n in m._orthogonal_names)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_sequence_matches_nn_rnn(nonlinearity, num_layers, bidirectional, enforce_sorted, with_hx):
    torch.manual_seed(20)
    rnn = orthogonal_rnn(4, 5, num_layers=num_layers, nonlinearity=nonlinearity,
                         bidirectional=bidirectional, dtype=torch.float64)
    m = MORNN.from_rnn(rnn)
    D = 2 if bidirectional else 1
    lengths = torch.tensor([7, 5, 3]) if enforce_sorted else torch.tensor([3, 7, 5])
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    hx = torch.randn(num_layers * D, 3, 5, dtype=torch.float64) if with_hx else None
    (o1, h1), (o2, h2) = m(packed, hx), rnn(packed, hx)
    assert type(o1) is type(o2)
    for a, b in zip(o1, o2):  # data, batch_sizes, sorted_indices, unsorted_indices
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(h1, h2)
    (o1.data.square().sum() + h1.sum()).backward()
    (o2.data.square().sum() + h2.sum()).backward()
    for name, p in rnn.named_parameters():
        if name.startswith("weight_hh"):  # nn.RNN's dL/dW_hh chained through W = base @ f(A)
            A = getattr(m, f"{name}_A")
            (want,) = torch.autograd.grad(m.orthogonal_weight(name), A, p.grad)
            torch.testing.assert_close(A.grad, want)
        else:
            torch.testing.assert_close(getattr(m, name).grad, p.grad)


def test_unbatched_without_hx_matches_nn_rnn():
    torch.manual_seed(21)
    rnn = orthogonal_rnn(3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
    m = MORNN.from_rnn(rnn)
    x = torch.randn(6, 3, dtype=torch.float64)
    (o1, h1), (o2, h2) = m(x), rnn(x)
    assert o1.shape == (6, 8) and h1.shape == (4, 4)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_dropout_masks_match_nn_rnn(nonlinearity):
    """Same seed, same dropout masks: the fused path calls the kernel nn.RNN calls, dropout included."""
    torch.manual_seed(22)
    rnn = orthogonal_rnn(4, 6, num_layers=3, nonlinearity=nonlinearity, dropout=0.5)
    m = MORNN.from_rnn(rnn, refold_every=0)
    x = torch.randn(7, 4, 4)
    torch.manual_seed(3)
    a = m(x)[0]
    torch.manual_seed(3)
    b = rnn(x)[0]
    torch.manual_seed(4)
    c = rnn(x)[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(b, c)  # the masks do matter: another seed gives other outputs


# Each case builds a module from the class it is given and calls it badly; MORNN must raise the
# exception type nn.RNN / nn.RNNCell raises for the same mistake.
RNN_CASES = {
    "input size": lambda M: M(3, 4, num_layers=2)(torch.randn(5, 2, 4)),
    "hx layers": lambda M: M(3, 4, num_layers=2)(torch.randn(5, 2, 3), torch.randn(1, 2, 4)),
    "hx batch": lambda M: M(3, 4)(torch.randn(5, 2, 3), torch.randn(1, 3, 4)),
    "hx hidden": lambda M: M(3, 4, bidirectional=True)(torch.randn(5, 2, 3), torch.randn(2, 2, 5)),
    "2-D hx, batched": lambda M: M(3, 4)(torch.randn(5, 2, 3), torch.randn(2, 4)),
    "3-D hx, unbatched": lambda M: M(3, 4)(torch.randn(5, 3), torch.randn(1, 1, 4)),
    "1-D input": lambda M: M(3, 4)(torch.randn(5)),
    "4-D input": lambda M: M(3, 4)(torch.randn(5, 2, 3, 1)),
    "integer input": lambda M: M(3, 4)(torch.randint(0, 3, (5, 2, 3))),
    "float64 input": lambda M: M(3, 4)(torch.randn(5, 2, 3, dtype=torch.float64)),
    "unknown nonlinearity": lambda M: M(3, 4, nonlinearity="sigmoid"),
    "float hidden_size": lambda M: M(3, 4.0),
    "zero input_size": lambda M: M(0, 4),
    "zero hidden_size": lambda M: M(3, 0),
    "zero num_layers": lambda M: M(3, 4, num_layers=0),
    "float num_layers": lambda M: M(3, 4, num_layers=2.0),
    "dropout > 1": lambda M: M(3, 4, dropout=1.5),
    "bias not bool": lambda M: M(3, 4, bias="yes"),
}
CELL_CASES = {
    "input size": lambda M: M(3, 4)(torch.randn(2, 4)),
    "3-D input": lambda M: M(3, 4)(torch.randn(1, 2, 3)),
    "hx batch": lambda M: M(3, 4)(torch.randn(2, 3), torch.randn(3, 4)),
    "hx hidden": lambda M: M(3, 4)(torch.randn(2, 3), torch.randn(2, 5)),
    "float64 input": lambda M: M(3, 4)(torch.randn(2, 3, dtype=torch.float64)),
}


def raised(call, cls):
    with pytest.raises(Exception) as info:
        call(cls)
    return info.type


@pytest.mark.parametrize("case", list(RNN_CASES))
def test_bad_input_raises_what_nn_rnn_raises(case):
    assert raised(RNN_CASES[case], MORNN) is raised(RNN_CASES[case], nn.RNN)


@pytest.mark.parametrize("nonlinearity", ["tanh", "modrelu", "identity"])
def test_hx_of_another_dtype_raises_as_in_nn_rnn(nonlinearity):
    # the modrelu/identity recurrences are ours: they must refuse it too, not cast silently
    x, hx = torch.randn(5, 2, 3), torch.randn(1, 2, 4, dtype=torch.float64)
    expected = raised(lambda M: M(3, 4)(x, hx), nn.RNN)
    assert raised(lambda M: M(3, 4, nonlinearity=nonlinearity)(x, hx), MORNN) is expected
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts both, as it does for nn.RNN
        x, hx = x.bfloat16(), torch.zeros(1, 2, 4)
        assert nn.RNN(3, 4)(x, hx)[0].shape == (5, 2, 4)
        assert MORNN(3, 4, nonlinearity=nonlinearity)(x, hx)[0].shape == (5, 2, 4)


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_bad_cell_input_raises_what_nn_rnncell_raises(case):
    assert raised(CELL_CASES[case], MORNNCell) is raised(CELL_CASES[case], nn.RNNCell)


OPTIMISERS = {
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    "adamw-decay": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
}


@pytest.mark.parametrize("optimiser", list(OPTIMISERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_every_layer_and_direction_stays_orthogonal_under_optimisers(optimiser, dtype, tol):
    torch.manual_seed(23)
    m = MORNN(3, 6, num_layers=2, bidirectional=True, nonlinearity="modrelu", dtype=dtype,
              init="random", refold_every=40)
    start = {n: getattr(m, n).detach().clone() for n in m._orthogonal_names}
    opt = OPTIMISERS[optimiser](m.parameters())
    x, target = torch.randn(5, 2, 3, dtype=dtype), torch.randn(5, 2, 12, dtype=dtype)
    for _ in range(150):
        opt.zero_grad()
        ((m(x)[0] - target) ** 2).mean().backward()
        opt.step()
    assert max_orth_error(m) <= tol
    for n in m._orthogonal_names:  # every recurrent matrix really moved
        assert (getattr(m, n) - start[n]).abs().max() > 1e-2, n


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "modrelu", "identity"])
def test_bf16_autocast_with_bf16_inputs_keeps_every_matrix_orthogonal(nonlinearity):
    """Under autocast the layer before MORNN hands it bf16; W_hh is still built in float32."""
    torch.manual_seed(24)
    enc = nn.Linear(3, 3)
    m = MORNN(3, 8, num_layers=2, bidirectional=True, nonlinearity=nonlinearity, init="random",
              refold_every=10)
    opt = torch.optim.Adam([*enc.parameters(), *m.parameters()], lr=1e-2)
    x = torch.randn(6, 2, 3)
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xi = enc(x)
            assert xi.dtype == torch.bfloat16
            W = m.weight_hh_l1_reverse
            out, h_n = m(xi)
        assert W.dtype == torch.float32 and m.weight_hh_l0_A.dtype == torch.float32
        assert orthogonality_error(W.detach()) <= 1e-5  # as built inside autocast, not only after
        (out.float().square().mean() + h_n.float().mean()).backward()
        opt.step()
    assert max_orth_error(m) <= 1e-5


def test_load_state_dict_from_another_precision_reprojects_every_base():
    """A float32 checkpoint loaded into a float64 module: its bases are orthogonal only to float32
    rounding, and are re-projected to float64's."""
    torch.manual_seed(25)
    m32 = MORNN(3, 9, num_layers=2, bidirectional=True, init="random")
    m64 = MORNN(3, 9, num_layers=2, bidirectional=True, dtype=torch.float64)
    m64.load_state_dict(m32.state_dict())
    bases = [v.double() for k, v in m32.state_dict().items() if k.endswith("_base")]
    assert max(float(orthogonality_error(b)) for b in bases) > 1e-12  # so loading must re-project
    assert max_orth_error(m64) <= 1e-12
    torch.testing.assert_close(m64.weight_hh_l1_reverse, m32.weight_hh_l1_reverse.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "modrelu", "identity"])
def test_recurrent_matrix_built_once_per_forward_on_the_fast_path(nonlinearity, monkeypatch):
    """One W_hh per layer and direction per forward, whatever T; modrelu/identity go to one
    recurrence op call per layer and direction (no step-by-step autograd), tanh/relu too on the
    compiled CPU loop, and to the fused kernel where it is not used (recurrence_backend="torch")."""
    calls = {"map": 0, "fused": 0, "recurrence": 0}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(parametrisation, "orthogonal_from", counting("map", parametrisation.orthogonal_from))
    monkeypatch.setattr(mornn_module, "recurrence", counting("recurrence", mornn_module.recurrence))
    for key, (seq, cell) in list(mornn_module._FUSED.items()):
        monkeypatch.setitem(mornn_module._FUSED, key, (counting("fused", seq), cell))
    torch.manual_seed(26)
    m = MORNN(3, 5, num_layers=2, bidirectional=True, nonlinearity=nonlinearity, refold_every=0)
    out, h_n = m(torch.randn(40, 2, 3))
    (out.sum() + h_n.sum()).backward()
    assert calls["map"] == 4
    on_cpp = m._tanh_relu_on_cpp(out)
    if nonlinearity in ("tanh", "relu") and not on_cpp:
        assert calls == {"map": 4, "fused": 1, "recurrence": 0}
    else:
        assert calls == {"map": 4, "fused": 0, "recurrence": 4}
    assert all(getattr(m, f"{n}_A").grad.abs().sum() > 0 for n in m._orthogonal_names)
    if nonlinearity in ("tanh", "relu"):  # the fused kernel when asked for
        calls.update(map=0, fused=0, recurrence=0)
        m.recurrence_backend = "torch"
        out, h_n = m(torch.randn(40, 2, 3))
        assert calls == {"map": 4, "fused": 1, "recurrence": 0}


def test_refold_of_a_diverged_parameter_names_it():
    m = MORNN(3, 4, num_layers=2, refold_every=1)
    base = m.weight_hh_l1_base.clone()
    with torch.no_grad():
        m.weight_hh_l1_A[0] = float("nan")
    with pytest.raises(RuntimeError, match="weight_hh_l1_A holds non-finite values"):
        m(torch.randn(2, 1, 3))
    assert torch.equal(m.weight_hh_l1_base, base)


def test_refold_reprojects_a_drifted_base():
    """The refold is what keeps rounding from accumulating in the base over long training: a base
    that has drifted from orthogonal comes out of it orthogonal again, next to the same matrix."""
    torch.manual_seed(27)
    m = MORNN(3, 7, bidirectional=True, dtype=torch.float64, refold_every=0)
    with torch.no_grad():
        m.weight_hh_l0_A.normal_(std=0.3)
        m.weight_hh_l0_reverse_base.add_(1e-4 * torch.randn(7, 7, dtype=torch.float64))
    before = m.weight_hh_l0_reverse.detach()
    assert orthogonality_error(before) > 1e-5
    m.refold()
    assert max_orth_error(m) <= 1e-12
    torch.testing.assert_close(m.weight_hh_l0_reverse, before, atol=1e-3, rtol=0)


@pytest.mark.parametrize("nonlinearity,backend", [("modrelu", "torch"), ("identity", "torch"),
                                                  ("identity", "chunked")])
@pytest.mark.parametrize("packed", [False, True])
def test_fast_recurrence_matches_the_autograd_loop_with_every_gradient(nonlinearity, backend, packed):
    """modrelu/identity: MORNN on the fused op (or identity's chunked form) against the same module on
    the plain autograd loop, on odd sizes: outputs, h_n, and the gradient of every parameter, of the
    input and of hx."""
    torch.manual_seed(28)
    fast = MORNN(3, 5, num_layers=2, bidirectional=True, nonlinearity=nonlinearity, init="random",
                 dtype=torch.float64, recurrence_backend=backend)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.1 * torch.randn_like(p))  # A != 0, modReLU biases of both signs
    ref = copy.deepcopy(fast)
    ref.recurrence_backend = "loop"
    x = torch.randn(19, 3, 3, dtype=torch.float64)
    hx = torch.randn(4, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([11, 19, 6])
    grads = []
    for m in (fast, ref):
        xi, hi = x.clone().requires_grad_(), hx.clone().requires_grad_()
        inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) if packed else xi
        out, h_n = m(inp, hi)
        data = out.data if packed else out
        (data.square().sum() + (h_n * torch.arange(5)).sum()).backward()
        grads.append((data, h_n, xi.grad, hi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (o1, h1, gx1, gh1, gp1), (o2, h2, gx2, gh2, gp2) = grads
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(gx1, gx2)
    torch.testing.assert_close(gh1, gh2)
    assert set(gp1) == set(gp2)
    for name in gp1:
        torch.testing.assert_close(gp1[name], gp2[name], msg=name)
        assert gp1[name].abs().sum() > 0, name


@pytest.mark.parametrize("bias", [True, False])
def test_all_weights_as_nn_rnn(bias):
    torch.manual_seed(29)
    rnn = orthogonal_rnn(3, 4, num_layers=2, bidirectional=True, bias=bias, dtype=torch.float64)
    got, want = MORNN.from_rnn(rnn).all_weights, rnn.all_weights
    assert [len(ws) for ws in got] == [len(ws) for ws in want] == [4 if bias else 2] * 4
    for ws_got, ws_want in zip(got, want):
        for a, b in zip(ws_got, ws_want):
            torch.testing.assert_close(a, b)


def test_resumed_module_refolds_at_the_same_step():
    """The refold counter travels in the state dict, so a resumed run refolds where the original does."""
    torch.manual_seed(30)
    m = MORNN(3, 4, refold_every=4)
    x = torch.randn(3, 2, 3)
    for _ in range(3):
        m(x)
        with torch.no_grad():
            m.weight_hh_l0_A.add_(0.1)
    resumed = MORNN(3, 4, refold_every=4)
    resumed.load_state_dict(m.state_dict())
    for mod in (m, resumed):
        assert torch.count_nonzero(mod.weight_hh_l0_A) > 0
        mod(x)  # the 4th training forward of both
        assert torch.count_nonzero(mod.weight_hh_l0_A) == 0
    torch.testing.assert_close(resumed.weight_hh_l0_base, m.weight_hh_l0_base)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_cell_gradients_match_nn_rnncell(nonlinearity):
    torch.manual_seed(31)
    rc = nn.RNNCell(3, 5, nonlinearity=nonlinearity, dtype=torch.float64)
    with torch.no_grad():
        rc.weight_hh.copy_(project_orthogonal(rc.weight_hh))
    cell = MORNNCell(3, 5, nonlinearity=nonlinearity, dtype=torch.float64)
    with torch.no_grad():
        for n in ("weight_ih", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(rc, n))
        cell.weight_hh_base.copy_(rc.weight_hh)
    x, h = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    ins = []
    for mod in (cell, rc):
        xi, hi = x.clone().requires_grad_(), h.clone().requires_grad_()
        out = mod(xi, mod(xi, hi))  # two steps, so W_hh's gradient sees a state it made
        out.square().sum().backward()
        ins.append((out, xi.grad, hi.grad))
    torch.testing.assert_close(ins[0], ins[1])
    for n in ("weight_ih", "bias_ih", "bias_hh"):
        torch.testing.assert_close(getattr(cell, n).grad, getattr(rc, n).grad)
    (want,) = torch.autograd.grad(cell.weight_hh, cell.weight_hh_A, rc.weight_hh.grad)
    torch.testing.assert_close(cell.weight_hh_A.grad, want)
    assert want.abs().sum() > 0


@pytest.mark.parametrize("value", [torch.zeros(4, 4), nn.Parameter(torch.zeros(4, 4))])
def test_assigning_the_computed_matrix_is_refused(value):
    """nn.RNN code may assign weight_hh_l0; here that would shadow the orthogonal matrix."""
    m = MORNN(3, 4, bidirectional=True)
    cell = MORNNCell(3, 4)
    with pytest.raises(AttributeError, match="weight_hh_l0_reverse is computed"):
        m.weight_hh_l0_reverse = value
    with pytest.raises(AttributeError, match="weight_hh is computed"):
        cell.weight_hh = value
    assert orthogonality_error(m.weight_hh_l0_reverse.detach()) < 1e-5
    m.weight_ih_l0 = nn.Parameter(torch.zeros(4, 3))  # other attributes assign as usual
    assert m.weight_ih_l0.abs().sum() == 0
