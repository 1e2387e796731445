"""MORNN / MORNNCell run through PyTorch's own test definitions for nn.RNN / nn.RNNCell.

The definitions are read from the installed torch at test time
(``torch.testing._internal.common_modules.module_db``): every sample input (``module_inputs_func``,
packed sequences included), every error input (``module_error_inputs_func``), and generic module
checks in the manner of PyTorch's ``test/test_modules.py`` (the no-batch-dim reference, repr,
factory kwargs, state_dict round trip, ``to()``, pickling, deepcopy, non-contiguous inputs,
gradcheck / gradgradcheck, train/eval). Each check runs on the nn module and on ours; behaviour
must be identical, values and gradients compared with nn's module holding the same (orthogonal)
weights, except for the deliberate differences listed in DELIBERATE_DIFFERENCES (the one place;
docs/mornn.md, "Deliberate differences from nn.RNN", lists the same keys).
"""
import copy
import io
import pickle
import re
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from matrec.nn.mornn import MORNN, MORNNCell
from matrec.ops.orthogonal import orthogonality_error, project_orthogonal
from support import ROOT


pytest.importorskip("expecttest", reason="torch's test helpers need expecttest (the dev extra)")


def _import_common_modules():
    # Importing torch's test helpers parses sys.argv, seeds the global RNGs, freezes the backend flags
    # and adds warning filters for the whole process: undo all of that for the rest of the suite.
    argv, filters, rng = sys.argv, warnings.filters[:], torch.get_rng_state()
    frozen = torch.backends.flags_frozen()
    sys.argv = argv[:1]
    try:
        from torch.testing._internal import common_modules
    finally:
        sys.argv = argv
        warnings.filters[:] = filters
        torch.set_rng_state(rng)
        if not frozen:
            setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)
    return common_modules


common_modules = _import_common_modules()
INFOS = {cls: next(i for i in common_modules.module_db if i.module_cls is cls) for cls in (nn.RNN, nn.RNNCell)}
OURS = {nn.RNN: MORNN, nn.RNNCell: MORNNCell}

# Where MORNN / MORNNCell deliberately behave differently from nn.RNN / nn.RNNCell. The checks below
# name the difference they allow; docs/mornn.md documents each under the same key.
DELIBERATE_DIFFERENCES = {
    "parameters": "weight_hh_l{k} is a computed property, not a parameter: the trainable "
                  "weight_hh_l{k}_A and the buffer weight_hh_l{k}_base stand in the parameter list "
                  "and the state dict; read without autograd it does not require grad",
    "orthogonal-writes": "a matrix written in place to weight_hh_l{k} is replaced by its nearest "
                         "orthogonal matrix, taken at the module's next use",
    "assignment": "assigning weight_hh_l{k} (a tensor or a Parameter) raises AttributeError",
    "to-dtype": ".to(dtype) re-projects the base onto the orthogonal group of the new precision",
    "repr": "the repr always names nonlinearity, orthogonal_map and init",
    "cell-dtype-messages": "MORNNCell's dtype mismatch errors (same type, RuntimeError) name the "
                           "argument instead of the kernel's 'mat1 and mat2 must have the same dtype'",
    "hx-dtype-message": "MORNN's hx dtype mismatch error (same type) names hx",
    "non-tensor-input": "a non-tensor input raises TypeError naming it, not AttributeError",
    "unknown-nonlinearity": "the error for an unknown nonlinearity (same type) lists the valid ones; "
                            "MORNN also accepts 'modrelu' and 'identity'",
}


def deliberate(key):
    assert key in DELIBERATE_DIFFERENCES, key
    return key


def samples(cls, dtype, packed=False):
    info = INFOS[cls]
    kwargs = {"with_packed_sequence": True} if packed else {}
    out = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True, **kwargs)
    if packed:  # only the packed ones (the others are the unpacked samples again)
        out = [s for s in out if isinstance(s.forward_input.args[0], PackedSequence)]
    return out


def error_samples(cls, dtype):
    info = INFOS[cls]
    return info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False, training=True)


SAMPLE_IDS = [(cls, dtype, packed, i) for cls in (nn.RNN, nn.RNNCell) for dtype in (torch.float32, torch.float64)
              for packed in ((False, True) if cls is nn.RNN else (False,))
              for i in range(len(samples(cls, dtype, packed)))]


def sample_id(case):
    cls, dtype, packed, i = case
    return f"{cls.__name__}-{str(dtype)[6:]}-{'packed-' if packed else ''}{i}"


def build_pair(cls, sample, dtype):
    """nn's module (recurrent matrices made orthogonal) and ours with the same weights."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    theirs = cls(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(project_orthogonal(p))
    if cls is nn.RNN:
        ours = MORNN.from_rnn(theirs)
    else:
        ours = MORNNCell(*args, **kwargs, dtype=dtype)
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                getattr(ours, name).copy_(p)  # weight_hh too: an in-place write (projected: unchanged to rounding)
    return theirs, ours


def fresh_inputs(args):
    """Independent leaf copies of the forward inputs (a PackedSequence's data included)."""
    out = []
    for a in args:
        if isinstance(a, PackedSequence):
            data = a.data.detach().clone().requires_grad_(a.data.requires_grad)
            out.append(PackedSequence(data, a.batch_sizes, a.sorted_indices, a.unsorted_indices))
        else:
            out.append(a.detach().clone().requires_grad_(a.requires_grad))
    return out


def leaves(inputs):
    return [a.data if isinstance(a, PackedSequence) else a for a in inputs]


def flat_outputs(out):
    out = out if isinstance(out, tuple) else (out,)
    return [o.data if isinstance(o, PackedSequence) else o for o in out]


def assert_same_gradients(theirs, ours):
    """Every parameter's gradient; W_hh's reaches ours as nn's dL/dW chained through W(A)."""
    for name, p in theirs.named_parameters():
        if name.startswith("weight_hh"):
            A = getattr(ours, f"{name}_A")
            (want,) = torch.autograd.grad(ours.orthogonal_weight(name), A, p.grad)
            torch.testing.assert_close(A.grad, want, msg=name)
        else:
            torch.testing.assert_close(getattr(ours, name).grad, p.grad, msg=name)


@pytest.mark.parametrize("case", SAMPLE_IDS, ids=sample_id)
def test_sample_inputs_match_nn_values_and_gradients(case):
    cls, dtype, packed, i = case
    torch.manual_seed(i)
    sample = samples(cls, dtype, packed)[i]
    theirs, ours = build_pair(cls, sample, dtype)
    results = []
    for m in (theirs, ours):
        inputs = fresh_inputs(sample.forward_input.args)
        outs = flat_outputs(m(*inputs, **sample.forward_input.kwargs))
        torch.manual_seed(100 + i)
        cotangents = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, cotangents)
        results.append((outs, [x.grad for x in leaves(inputs)]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(g2, g1)
    assert_same_gradients(theirs, ours)


@pytest.mark.parametrize("case", [c for c in SAMPLE_IDS if not c[2]], ids=sample_id)
def test_no_batch_dim_reference(case):
    """test_modules.py's test_forward: the sample's reference function (the batched call) agrees."""
    cls, dtype, _, i = case
    sample = samples(cls, dtype)[i]
    for m in build_pair(cls, sample, dtype):
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        torch.testing.assert_close(m(*args, **kwargs), sample.reference_fn(m, *args, **kwargs))


ERROR_IDS = [(cls, dtype, i) for cls in (nn.RNN, nn.RNNCell) for dtype in (torch.float32, torch.float64)
             for i in range(len(error_samples(cls, dtype)))]


@pytest.mark.parametrize("case", ERROR_IDS, ids=lambda c: f"{c[0].__name__}-{str(c[1])[6:]}-{c[2]}")
def test_error_inputs_raise_what_nn_raises(case):
    cls, dtype, i = case
    error = error_samples(cls, dtype)[i]
    sample = error.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    for module_cls in (cls, OURS[cls]):
        if error.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                module_cls(*args, **kwargs)
        else:
            m = module_cls(*args, **kwargs)
            with pytest.raises(error.error_type, match=error.error_regex):
                m(*sample.forward_input.args, **sample.forward_input.kwargs)


# -- generic module checks (test_modules.py's, adapted), on one sample per configuration ------------

GENERIC = [c for c in SAMPLE_IDS if c[1] == torch.float64 and not c[2]]


def forward_values(m, sample):
    with torch.no_grad():
        return flat_outputs(m(*fresh_inputs(sample.forward_input.args), **sample.forward_input.kwargs))


@pytest.mark.parametrize("case", GENERIC, ids=sample_id)
def test_repr_names_the_configuration(case):
    cls, dtype, _, i = case
    sample = samples(cls, dtype)[i]
    theirs, ours = build_pair(cls, sample, dtype)
    want = repr(theirs)[len(cls.__name__):]  # nn's arguments, e.g. "(2, 3, num_layers=2, bias=False)"
    got = repr(ours)
    assert got.startswith(OURS[cls].__name__ + "(")
    # deliberate("repr"): ours adds nonlinearity, orthogonal_map and init; nn's arguments all appear
    for part in want.strip("()").split(", "):
        part = re.sub(r"nonlinearity=(\w+)", r"nonlinearity='\1'", part)
        assert part in got, (part, got)
    deliberate("repr")
    assert "orthogonal_map='cayley'" in got and "init='henaff'" in got


@pytest.mark.parametrize("case", GENERIC, ids=sample_id)
def test_factory_kwargs_place_every_parameter_and_buffer(case):
    cls, _, _, i = case
    sample = samples(cls, torch.float64)[i]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    for module_cls in (cls, OURS[cls]):
        m = module_cls(*args, **kwargs, device="cpu", dtype=torch.float64)
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            assert t.dtype == torch.float64 and t.device.type == "cpu", (module_cls, name)


@pytest.mark.parametrize("case", GENERIC, ids=sample_id)
def test_state_dict_round_trip_is_exact(case):
    cls, dtype, _, i = case
    sample = samples(cls, dtype)[i]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    for m in build_pair(cls, sample, dtype):
        with torch.no_grad():  # away from the initial values, so the copy has something to carry
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        other = type(m)(*args, **kwargs, dtype=dtype)
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        other.load_state_dict(torch.load(buf))
        assert all(torch.equal(a, b) for a, b in zip(forward_values(other, sample), forward_values(m, sample)))
    deliberate("parameters")  # the keys differ in weight_hh only
    theirs, ours = build_pair(cls, sample, dtype)
    extra = {k for k in ours.state_dict() if k.endswith(("_A", "_base", "_extra_state"))}
    assert set(ours.state_dict()) - extra == {k for k in theirs.state_dict() if not k.startswith("weight_hh")}


@pytest.mark.parametrize("case", GENERIC, ids=sample_id)
def test_pickle_and_deepcopy(case):
    cls, dtype, _, i = case
    sample = samples(cls, dtype)[i]
    for m in build_pair(cls, sample, dtype):
        ref = forward_values(m, sample)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        for back in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert all(torch.equal(a, b) for a, b in zip(forward_values(back, sample), ref))


@pytest.mark.parametrize("case", GENERIC, ids=sample_id)
def test_to_another_dtype(case):
    cls, _, _, i = case
    sample32 = samples(cls, torch.float32)[i]
    theirs, ours = build_pair(cls, sample32, torch.float32)
    for m in (theirs, ours):
        m.to(torch.float64)
        assert all(t.dtype == torch.float64 for t in [*m.parameters(), *m.buffers()] if t.is_floating_point())
    deliberate("to-dtype")  # ours is orthogonal to float64 rounding at once; nn's is its float32 matrix
    for name in ours._orthogonal_names:
        assert orthogonality_error(getattr(ours, name).detach()) <= 1e-12
    sample64 = samples(cls, torch.float64)[i]
    torch.testing.assert_close(forward_values(ours, sample64), forward_values(theirs, sample64), atol=1e-6, rtol=0)


def non_contiguous(t):
    """The same values in strided memory (every other element of a tensor twice as wide)."""
    wide = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    assert not wide.is_contiguous() or wide.numel() <= 1
    return wide.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("case", GENERIC, ids=sample_id)
def test_non_contiguous_inputs(case):
    cls, dtype, _, i = case
    sample = samples(cls, dtype)[i]
    for m in build_pair(cls, sample, dtype):
        results = []
        for make in (lambda t: t.detach().clone().requires_grad_(), non_contiguous):
            inputs = [make(a) for a in sample.forward_input.args]
            outs = flat_outputs(m(*inputs))
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            results.append((outs, [x.grad for x in inputs]))
            m.zero_grad()
        torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("case", GENERIC[::4], ids=sample_id)
def test_gradcheck_and_gradgradcheck(case):
    """test_modules.py's test_grad / test_gradgrad: inputs and every parameter, float64."""
    cls, dtype, _, i = case
    sample = samples(cls, dtype)[i]
    for m in build_pair(cls, sample, dtype):
        inputs = fresh_inputs(sample.forward_input.args)
        params = tuple(m.parameters())

        def fn(*flat, m=m, n=len(inputs)):  # m reads its parameters itself; gradcheck perturbs them in place
            return tuple(flat_outputs(m(*flat[:n])))

        assert torch.autograd.gradcheck(fn, (*inputs, *params), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (*inputs, *params), fast_mode=True)


@pytest.mark.parametrize("case", GENERIC, ids=sample_id)
def test_train_and_eval(case):
    """train_and_eval_differ (nn.RNN: dropout): without dropout both modes give the same values."""
    cls, dtype, _, i = case
    sample = samples(cls, dtype)[i]
    for m in build_pair(cls, sample, dtype):
        train = forward_values(m.train(), sample)
        assert all(torch.equal(a, b) for a, b in zip(forward_values(m.eval(), sample), train))
        assert not m.training and all(not c.training for c in m.modules())


# -- the deliberate differences, each shown --------------------------------------------------------

def test_deliberate_writes_and_assignment():
    theirs, ours = build_pair(nn.RNN, samples(nn.RNN, torch.float64)[0], torch.float64)
    M = torch.randn(2, 2, dtype=torch.float64)
    for m in (theirs, ours):
        m.weight_hh_l1.data.copy_(M)
    torch.testing.assert_close(theirs.weight_hh_l1, M)
    deliberate("orthogonal-writes")
    torch.testing.assert_close(ours.weight_hh_l1, project_orthogonal(M))
    theirs.weight_hh_l1 = nn.Parameter(M)
    deliberate("assignment")
    with pytest.raises(AttributeError, match="cannot be assigned"):
        ours.weight_hh_l1 = nn.Parameter(M)


def test_deliberate_error_messages():
    deliberate("cell-dtype-messages")
    for module_cls, match in ((nn.RNNCell, "mat1 and mat2 must have the same dtype"),
                              (MORNNCell, r"input dtype \(torch.float64\) does not match weight dtype")):
        with pytest.raises(RuntimeError, match=match):
            module_cls(3, 4)(torch.randn(2, 3, dtype=torch.float64))
    deliberate("hx-dtype-message")
    for module_cls, match in ((nn.RNN, "mat1 and mat2 must have the same dtype"), (MORNN, "hx must have")):
        with pytest.raises(RuntimeError, match=match):
            module_cls(3, 4)(torch.randn(5, 2, 3), torch.randn(1, 2, 4, dtype=torch.float64))
    deliberate("non-tensor-input")
    for module_cls, ours in ((nn.RNN, MORNN), (nn.RNNCell, MORNNCell)):
        with pytest.raises(AttributeError):
            module_cls(3, 4)([[1.0, 2.0, 3.0]])
        with pytest.raises(TypeError, match="input must be a Tensor"):
            ours(3, 4)([[1.0, 2.0, 3.0]])
    deliberate("unknown-nonlinearity")
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        MORNN(3, 4, nonlinearity="gelu")
    with pytest.raises(RuntimeError, match=r"^Unknown nonlinearity: gelu \(nonlinearity must be one of"):
        MORNNCell(3, 4, nonlinearity="gelu")(torch.randn(2, 3))


def test_every_deliberate_difference_is_documented():
    doc = (ROOT / "docs" / "mornn.md").read_text()
    section = doc.split("## Deliberate differences from nn.RNN", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^- \*\*([\w-]+)\*\*", section, flags=re.M)) == set(DELIBERATE_DIFFERENCES)
