"""MORNN / MORNNCell as drop-ins: writes to the recurrent matrix take effect, dtype conversion keeps
the precision's orthogonality bound, the matrix is an explicit property, the built matrix is kept
while nothing needs a gradient and is never stale, and MORNNCell constructs as nn.RNNCell does."""
import copy
import io
import os
import pickle

import pytest
import torch
from torch import nn

from matrec.nn.mornn import MORNN, MORNNCell, OrthogonalMatrixProperty, track_optimizer_steps
from matrec.ops.orthogonal import orthogonality_error, project_orthogonal
from support import ROOT


def orthogonal(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return project_orthogonal(torch.randn(n, n, generator=g, dtype=torch.float64)).to(dtype)


# Every way nn.RNN code writes a recurrent matrix in place; each gets the module and the matrix name.
def write_data_copy(m, name, W):
    getattr(m, name).data.copy_(W)


def write_no_grad_copy(m, name, W):
    with torch.no_grad():
        getattr(m, name).copy_(W)


def write_through_all_weights(m, name, W):
    with torch.no_grad():
        m.all_weights[m._orthogonal_names.index(name)][1].copy_(W)


def write_data_assign(m, name, W):
    getattr(m, name).data = W


WRITES = {"data.copy_": write_data_copy, "no_grad copy_": write_no_grad_copy,
          "all_weights": write_through_all_weights, ".data =": write_data_assign}


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("grad_mode", [True, False])
def test_an_in_place_write_sets_the_matrix(write, grad_mode):
    torch.manual_seed(0)
    m = MORNN(3, 5, num_layers=2, nonlinearity="tanh", dtype=torch.float64)
    Q = orthogonal(5, 1, torch.float64)
    with torch.set_grad_enabled(grad_mode):
        WRITES[write](m, "weight_hh_l1", Q)
    # taken at the next use, whatever it is: here the forward, which must equal nn.RNN's with Q
    rnn = m.to_rnn()
    with torch.no_grad():
        rnn.weight_hh_l1.copy_(Q)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), rnn(x))
    torch.testing.assert_close(m.weight_hh_l1, Q)
    assert torch.count_nonzero(m.weight_hh_l1_A) == 0


@pytest.mark.parametrize("use", ["read", "state_dict", "refold", "to", "cell forward"])
def test_a_write_is_taken_at_every_next_use(use):
    Q = orthogonal(4, 2)
    if use == "cell forward":
        m = MORNNCell(3, 4)
        m.weight_hh.data.copy_(Q)
        m(torch.randn(2, 3))
        torch.testing.assert_close(m.weight_hh_base, Q)
        return
    m = MORNN(3, 4)
    m.weight_hh_l0.data.copy_(Q)  # the tensor written to is dropped at once; the write is not
    if use == "read":
        torch.testing.assert_close(m.weight_hh_l0, Q)
    elif use == "state_dict":
        torch.testing.assert_close(m.state_dict()["weight_hh_l0_base"], Q)
    elif use == "refold":
        m.refold()
        torch.testing.assert_close(m.weight_hh_l0_base, Q)
    else:
        torch.testing.assert_close(m.double().weight_hh_l0, Q.double(), atol=1e-6, rtol=0)


def test_read_matrices_are_watched_while_held_and_released_after():
    m = MORNN(3, 4)
    for _ in range(50):
        m.weight_hh_l0.sum()  # read and dropped: nothing to watch after the next use
    held = m.weight_hh_l0
    m(torch.randn(2, 1, 3))
    assert [len(v) for v in m._handed_out.values()] == [1]
    Q = orthogonal(4, 10)
    held.data.copy_(Q)   # long after it was read, the write still takes effect
    m(torch.randn(2, 1, 3))
    torch.testing.assert_close(m.weight_hh_l0_base, Q)
    del held
    m(torch.randn(2, 1, 3))
    assert m._handed_out == {}


def test_written_matrices_are_projected_onto_the_orthogonal_group():
    torch.manual_seed(3)
    m = MORNN(3, 6, bidirectional=True, dtype=torch.float64)
    nn.init.orthogonal_(m.weight_hh_l0, gain=3.0)  # not orthogonal: scaled by 3
    M = torch.randn(6, 6, dtype=torch.float64)
    with torch.no_grad():
        m.weight_hh_l0_reverse.copy_(M)
    assert orthogonality_error(m.weight_hh_l0.detach()) < 1e-12
    torch.testing.assert_close(m.weight_hh_l0_reverse, project_orthogonal(M))  # the nearest one


@pytest.mark.parametrize("bad,match", [(torch.zeros(4, 4), r"singular \(rank 0 < 4\)"),
                                       (torch.full((4, 4), float("nan")), "non-finite")])
def test_a_write_that_cannot_take_effect_raises_and_is_discarded(bad, match):
    m = MORNN(3, 4)
    before = m.weight_hh_l0.detach().clone()
    m.weight_hh_l0.data.copy_(bad)
    written = "the matrix written in place to weight_hh_l0 .*" + match + ".*the write is discarded"
    with pytest.raises(ValueError, match=written):
        m(torch.randn(2, 1, 3))
    torch.testing.assert_close(m.weight_hh_l0, before)  # the module stays usable, as it was
    m(torch.randn(2, 1, 3))


def test_assignment_is_refused_with_the_in_place_alternative():
    m, cell = MORNN(3, 4), MORNNCell(3, 4)
    for value in (torch.eye(4), nn.Parameter(torch.eye(4))):
        with pytest.raises(AttributeError, match=r"weight_hh_l0 is computed .*module.weight_hh_l0.copy_\(W\)"):
            m.weight_hh_l0 = value
        with pytest.raises(AttributeError, match="weight_hh is computed"):
            cell.weight_hh = value


def test_the_matrices_are_per_instance_and_no_instance_changes_its_class():
    before = {cls: dict(vars(cls)) for cls in (MORNN, MORNNCell)}
    m = MORNN(3, 4, num_layers=3, bidirectional=True)
    for name in m._orthogonal_names:
        torch.testing.assert_close(getattr(m, name), m.orthogonal_weight(name))
        assert name not in vars(MORNN) and name not in vars(m)
    assert {cls: dict(vars(cls)) for cls in (MORNN, MORNNCell)} == before
    assert isinstance(MORNNCell.__dict__["weight_hh"], OrthogonalMatrixProperty)  # a fixed name: declared
    with pytest.raises(AttributeError, match="has no attribute 'weight_hh_l2'"):
        getattr(MORNN(3, 4), "weight_hh_l2")  # another instance's layer is not this one's
    assert not hasattr(MORNN(3, 4), "weight_hh_l1")


def test_importing_installs_no_process_wide_hook_and_the_opt_in_does():
    """No optimiser hook is installed by importing matrec; track_optimizer_steps is the opt-in."""
    import subprocess
    import sys

    code = ("import torch.optim.optimizer as o, matrec, matrec.nn.mornn, matrec.train; "
            "assert not o._global_optimizer_post_hooks, o._global_optimizer_post_hooks; "
            "handle = matrec.track_optimizer_steps(); assert len(o._global_optimizer_post_hooks) == 1; "
            "handle.remove(); assert not o._global_optimizer_post_hooks")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}   # this checkout's matrec
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_unpickled_in_a_fresh_process_still_reads_its_matrices():
    """A fresh interpreter never built a 5-layer MORNN: the matrices' names come from the instance."""
    import subprocess
    import sys

    m = MORNN(3, 4, num_layers=5)  # weight_hh_l4 exists in this process only because of this module
    buf = io.BytesIO()
    torch.save(m, buf)
    code = ("import io, sys, torch; m = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False); "
            "print(float((m.weight_hh_l4 - m.weight_hh_l4_base).abs().max()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}   # this checkout's matrec
    out = subprocess.run([sys.executable, "-c", code], input=buf.getvalue(), capture_output=True, check=True,
                         env=env)
    assert float(out.stdout) == 0.0


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_to_float64_reaches_the_float64_bound_at_once_and_round_trips_bit_for_bit(num_layers, bidirectional):
    torch.manual_seed(4)
    m = MORNN(3, 9, num_layers=num_layers, bidirectional=bidirectional, init="random")
    with torch.no_grad():
        for name in m._orthogonal_names:
            getattr(m, f"{name}_A").normal_(std=0.1)
    m.to(torch.float64)
    for name in m._orthogonal_names:
        assert orthogonality_error(getattr(m, name).detach()) <= 1e-12
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ref = m(x)
    again = MORNN(3, 9, num_layers=num_layers, bidirectional=bidirectional, dtype=torch.float64)
    again.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again(x), ref))
    back = pickle.loads(pickle.dumps(m))
    assert all(torch.equal(a, b) for a, b in zip(back(x), ref))


def test_to_empty_keeps_garbage_for_reset_parameters():
    m = MORNN(3, 4).to_empty(device="cpu")  # no projection of uninitialised memory
    m.reset_parameters()
    assert orthogonality_error(m.weight_hh_l0.detach()) < 1e-5


# -- the kept matrix ---------------------------------------------------------------------------

def count_builds(monkeypatch):
    import matrec.nn.orthogonal as parametrisation
    calls = [0]
    real = parametrisation.orthogonal_from

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(parametrisation, "orthogonal_from", counting)
    return calls


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("cls", [MORNN, MORNNCell])
def test_the_matrix_is_built_once_while_nothing_changes(mode, cls, monkeypatch):
    torch.manual_seed(5)
    m = cls(3, 6).eval()
    x = torch.randn(2, 3) if cls is MORNNCell else torch.randn(4, 2, 3)
    ref = m(x)
    calls = count_builds(monkeypatch)
    if mode == "frozen":
        m.freeze()
        outs = [m(x) for _ in range(5)]
        assert not any(p.requires_grad for n, p in m.named_parameters() if n.endswith("_A"))
    else:
        ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
        with ctx():
            outs = [m(x) for _ in range(5)]
    assert calls[0] == 1
    for out in outs:
        torch.testing.assert_close(out, ref)


def test_eval_with_autograd_on_rebuilds_so_gradients_reach_A(monkeypatch):
    m = MORNN(3, 6).eval()
    calls = count_builds(monkeypatch)
    for _ in range(3):
        m(torch.randn(4, 2, 3))[0].sum().backward()
    assert calls[0] == 3 and m.weight_hh_l0_A.grad.abs().sum() > 0


OPTIMISERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "adam foreach": lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=True),
    "adam fused": lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),  # bumps no version counter
}


@pytest.mark.parametrize("optimiser", list(OPTIMISERS))
def test_an_optimiser_step_is_seen_by_the_next_forward(optimiser):
    """With the opt-in (the Trainer's): a fused step bumps no version counter, the hook counts it."""
    torch.manual_seed(6)
    m = MORNN(3, 6)
    opt = OPTIMISERS[optimiser](m.parameters())
    track_optimizer_steps(opt)
    x = torch.randn(4, 2, 3)
    m(x)[0].square().sum().backward()   # gradients first, then a no-grad forward fills the cache
    with torch.no_grad():
        before = m(x)[0]
    opt.step()
    with torch.no_grad():
        after = m(x)[0]
    fresh = copy.deepcopy(m)  # a module that never kept anything
    fresh._matrix_cache.clear()
    with torch.no_grad():
        torch.testing.assert_close(after, fresh(x)[0], rtol=0, atol=0)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("change", ["in-place on A", "in-place on base", "load_state_dict",
                                    "load_state_dict assign", "write to the matrix", "refold",
                                    "data loop then train forward"])
def test_the_kept_matrix_is_never_stale(change):
    torch.manual_seed(7)
    m = MORNN(3, 6, init="random").eval()
    other = MORNN(3, 6, init="random").eval()
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        m(x)  # fills the cache
        if change == "in-place on A":
            m.weight_hh_l0_A.add_(0.3)
        elif change == "in-place on base":
            m.weight_hh_l0_base.copy_(orthogonal(6, 8))
        elif change == "load_state_dict":
            m.load_state_dict(other.state_dict())
        elif change == "load_state_dict assign":
            m.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
        elif change == "write to the matrix":
            m.weight_hh_l0.copy_(orthogonal(6, 9))
        elif change == "refold":
            m.weight_hh_l0_A.data.add_(0.2)   # .data: unseen by the version counter ...
    if change == "refold":
        m.refold()                           # ... but the refold rewrites A and base in place
    if change == "data loop then train forward":
        m.train()
        m(x)[0].sum().backward()
        m.weight_hh_l0_A.data.sub_(0.5 * m.weight_hh_l0_A.grad)  # a hand-written SGD step
        m.eval()
    with torch.no_grad():
        got = m(x)[0]
        m._matrix_cache.clear()
        torch.testing.assert_close(got, m(x)[0], rtol=0, atol=0)


def test_freeze_and_unfreeze():
    m = MORNN(3, 4, num_layers=2)
    assert m.freeze() is m
    assert [n for n, p in m.named_parameters() if not p.requires_grad] == ["weight_hh_l0_A", "weight_hh_l1_A"]
    out = m(torch.randn(2, 1, 3))[0]
    out.sum().backward()  # the other parameters still train
    assert m.weight_ih_l0.grad is not None and m.weight_hh_l0_A.grad is None
    assert m.unfreeze() is m and all(p.requires_grad for p in m.parameters())


def test_freeze_takes_the_parameters_as_they_are_now():
    """The documented way past a write through .data (which no version counter sees)."""
    m = MORNN(3, 4).freeze()
    x = torch.randn(2, 1, 3)
    before = m(x)[0]
    m.weight_hh_l0_A.data.add_(0.5)
    m.freeze()
    after = m(x)[0]
    m._matrix_cache.clear()
    assert not torch.allclose(after, before) and torch.equal(after, m(x)[0])


# -- MORNNCell constructs and fails as nn.RNNCell ------------------------------------------------

@pytest.mark.parametrize("args,kwargs", [((5, 4, False), {}), ((5, 4), {"bias": 1}), ((5, 4, "relu"), {}),
                                         ((5, 0), {}), ((0, 4), {}), ((5, 4, True, "relu"), {})])
def test_cell_constructs_like_nn_rnncell(args, kwargs):
    ours, theirs = MORNNCell(*args, **kwargs), nn.RNNCell(*args, **kwargs)
    assert ours.bias == theirs.bias and ours.nonlinearity == theirs.nonlinearity
    assert [n for n, _ in ours.named_parameters() if n != "weight_hh_A"] == \
           [n for n, _ in theirs.named_parameters() if n != "weight_hh"]
    x = torch.randn(3, args[0])
    assert ours(x).shape == theirs(x).shape


def test_cell_repr_shows_its_arguments():
    assert repr(MORNNCell(3, 4)) == "MORNNCell(3, 4, nonlinearity='tanh', orthogonal_map='cayley', init='henaff')"
    assert repr(MORNNCell(3, 4, bias=False, nonlinearity="modrelu", orthogonal_map="expm", init="random")) == \
        "MORNNCell(3, 4, bias=False, nonlinearity='modrelu', orthogonal_map='expm', init='random')"


@pytest.mark.parametrize("nonlinearity", ["tanh", "modrelu"])
def test_cell_dtype_mismatches_name_the_argument(nonlinearity):
    cell = MORNNCell(3, 4, nonlinearity=nonlinearity)
    with pytest.raises(RuntimeError,
                       match=r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"):
        cell(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"input dtype \(torch.int64\)"):
        cell(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"hx dtype \(torch.float64\) does not match input dtype \(torch.float32\)"):
        cell(torch.randn(2, 3), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be a Tensor, got list"):
        cell([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="hx must be a Tensor or None, got list"):
        cell(torch.randn(2, 3), [0.0] * 4)


@pytest.mark.parametrize("nonlinearity", ["modrelu", "identity"])
def test_zero_length_inputs_on_the_recurrence_path(nonlinearity):
    """Length 0 fails as nn.RNN does (not with the recurrence op's internal argument name); an empty
    batch gives empty outputs, as nn.RNN's."""
    m = MORNN(3, 4, nonlinearity=nonlinearity)
    with pytest.raises(RuntimeError, match="^Expected sequence length to be larger than 0 in RNN$"):
        m(torch.randn(0, 2, 3))
    with pytest.raises(RuntimeError, match="^Expected sequence length to be larger than 0 in RNN$"):
        MORNN(3, 4, nonlinearity=nonlinearity, batch_first=True)(torch.randn(2, 0, 3))
    out, h = m(torch.randn(5, 0, 3))
    assert out.shape == (5, 0, 4) and h.shape == (1, 0, 4)
    assert MORNNCell(3, 4, nonlinearity=nonlinearity)(torch.randn(0, 3)).shape == (0, 4)


def test_proj_size_raises_as_for_nn_rnn():
    for cls in (nn.RNN, MORNN):
        with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"):
            cls(3, 4, proj_size=2)


def test_the_docs_examples_run_and_print_what_they_show(capsys):
    import re

    doc = (ROOT / "docs" / "mornn.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S)
              if "rnn.weight_hh_l0.data.copy_" in b or ".freeze()" in b]
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/mornn.md", "exec"), {})
        lines = block.strip().splitlines()
        shown = [line[2:] for line in lines[len(lines) - next(i for i, line in enumerate(reversed(lines))
                                                                if not line.startswith("# ")):]]
        assert capsys.readouterr().out.split() == shown


def test_state_dict_keys_are_unchanged_so_old_checkpoints_load():
    """The format checkpoints were written in: nn.RNN's keys, with weight_hh_l{k} as _A and _base."""
    m = MORNN(3, 4, num_layers=2, bidirectional=True, nonlinearity="modrelu")
    layer = ["weight_ih_l{s}", "weight_hh_l{s}_A", "weight_hh_l{s}_base", "bias_ih_l{s}", "bias_hh_l{s}",
             "modrelu_bias_l{s}"]
    want = [k.format(s=s) for s in ("0", "0_reverse", "1", "1_reverse") for k in layer] + ["_extra_state"]
    assert sorted(m.state_dict()) == sorted(want)
    assert sorted(MORNNCell(3, 4).state_dict()) == ["_extra_state", "bias_hh", "bias_ih", "weight_hh_A",
                                                    "weight_hh_base", "weight_ih"]
    old = {k: v.clone() for k, v in m.state_dict().items()}  # as written by any earlier version
    again = MORNN(3, 4, num_layers=2, bidirectional=True, nonlinearity="modrelu", init="random")
    again.load_state_dict(old)
    x = torch.randn(5, 2, 3)
    assert all(torch.equal(a, b) for a, b in zip(again(x), m(x)))


def test_from_rnn_refuses_a_matrix_without_a_nearest_orthogonal_one():
    rnn = nn.RNN(3, 4, num_layers=2)
    nn.init.zeros_(rnn.weight_hh_l1)
    with pytest.raises(ValueError, match=r"the matrix given for weight_hh_l1 is singular \(rank 0 < 4\)"):
        MORNN.from_rnn(rnn)
