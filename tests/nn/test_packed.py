"""Packed variable-length sequences (``starts``, the mixer protocol): documents packed into one row
compute exactly as each document run alone, outputs and every gradient, in float64 at odd lengths;
the ops' segmented forms against their references (every PyTorch backend); refusals by name."""
import pytest
import torch

from matrec.models import build_model
from matrec.models.mixers import MIXERS
from matrec.nn.protocol import starts_from_cu_seqlens, takes_starts
from matrec.ops.attention import padded_causal_attention, padded_causal_attention_reference
from matrec.ops.linear_attention import LINEAR_ATTENTION_FORMS
from matrec.ops.mru_scan import SCAN_BACKENDS, ScanBackend, mru_scan, naive_mru_scan
from matrec.ops.rnn_recurrence import recurrence, recurrence_reference

E = 8
TOL = dict(atol=1e-10, rtol=1e-10)
PACKED = ["mru", "linear_attn", "attn", "rnn", "mornn", "lru", "mlp", "lstm", "gru", "txl"]
LENGTHS = [(1, 5, 7), (6, 4, 3)]  # two rows of 13 tokens, three documents each, boundaries differ


def _starts(lengths_per_row):
    return torch.cat([starts_from_cu_seqlens(torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()]))
                      for ls in lengths_per_row])


def _mixer(name, **options):
    torch.manual_seed(0)
    mixer = MIXERS.get(name)(E, n_heads=2, **options)
    mixer.init_weights(0.02, 0.02)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mixer.double()


def _grads(mixer, x, loss):
    return torch.autograd.grad(loss, [x, *mixer.parameters()], allow_unused=True)


# the MORNN alone runs nn.RNN's fused recurrence ("torch"), packed the layer driver (the op run
# between restarts); an LSTM / GRU packed runs itself between restarts; sliding-window attention
# (window 4 < the documents' 5 and 7 tokens) and Transformer-XL keep their own packed paths
@pytest.mark.parametrize("name, options", [(n, {"recurrence_backend": "torch"} if n == "mornn" else {})
                                           for n in PACKED] + [
    ("attn", {"window": 4}), ("txl", {"mem_len": 3}), ("mornn", {"recurrence_backend": "loop"}),
    ("linear_attn", {"form": "recurrent"}), ("linear_attn", {"chunk_size": 4}), ("mru", {"backend": "sequential"}),
    ("mru", {"backend": "chunked"}), ("mru", {"state_matrix": "cayley"})])
def test_packed_documents_equal_each_document_alone(name, options):
    mixer = _mixer(name, **options)
    assert takes_starts(mixer)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 13, E, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 13, E, generator=g, dtype=torch.float64)
    y, _ = mixer(x, None, starts=_starts(LENGTHS))
    packed = _grads(mixer, x, (y * w).sum())
    alone, loss = [], 0.0
    for row, lengths in enumerate(LENGTHS):
        a = 0
        for n in lengths:
            ya, _ = mixer(x[row:row + 1, a:a + n], None)
            alone.append(ya[0])
            loss = loss + (ya[0] * w[row, a:a + n]).sum()
            a += n
    torch.testing.assert_close(y.reshape(-1, E), torch.cat(alone), **TOL)
    for got, want in zip(packed, _grads(mixer, x, loss)):
        if want is None:
            assert got is None or not got.abs().any()
        else:
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name, options", [(n, {}) for n in ["mru", "linear_attn", "attn", "rnn", "lru"]] + [
    ("lstm", {}), ("gru", {}), ("txl", {}), ("txl", {"mem_len": 6}), ("attn", {"window": 3})])
def test_a_call_continues_the_last_document(name, options):
    """Packed in one call then one more token (with a mask where the mixer takes one, else with
    starts all False or none): the token continues the row's last document alone."""
    mixer = _mixer(name, **options)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 9, E, generator=g, dtype=torch.float64)
    starts = _starts([(4, 5)])
    one = {"mask": torch.ones(1, 1, dtype=torch.bool)}
    if name in ("lstm", "gru", "txl") or options.get("window"):  # no mask: a packed call, or a plain one
        one = {"starts": torch.zeros(1, 1, dtype=torch.bool)} if name != "gru" else {}
    with torch.no_grad():
        _, state = mixer(x[:, :8], None, starts=starts[:, :8])
        y, _ = mixer(x[:, 8:], state, **one)
        want, _ = mixer(x[:, 4:], None)
    torch.testing.assert_close(y[0, 0], want[0, -1], **TOL)


@pytest.mark.parametrize("name, options", [("txl", {"mem_len": 3}), ("attn", {"window": 3}), ("lstm", {})])
def test_packed_calls_in_chunks_equal_each_document_alone(name, options):
    """Chunks of 5 tokens of rows of three documents read with the state carried: each document's
    outputs are those of that document alone read in the same chunks (Transformer-XL's memory
    depends on them), across chunk edges and with the memory or window cache holding earlier
    documents' slots."""
    mixer = _mixer(name, **options)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 17, E, generator=g, dtype=torch.float64)
    starts = _starts([(8, 3, 6), (2, 11, 4)])
    state, ys = None, []
    with torch.no_grad():
        for a in range(0, 17, 5):
            y, state = mixer(x[:, a:a + 5], state, starts=starts[:, a:a + 5])
            ys.append(y)
        y = torch.cat(ys, 1)
        for row, lengths in enumerate([(8, 3, 6), (2, 11, 4)]):
            a = 0
            for n in lengths:
                edges = sorted({a, a + n, *range(5 * (a // 5 + 1), a + n, 5)})
                alone, s = [], None
                for lo, hi in zip(edges, edges[1:]):
                    ya, s = mixer(x[row:row + 1, lo:hi], s)
                    alone.append(ya[0])
                torch.testing.assert_close(y[row, a:a + n], torch.cat(alone), **TOL)
                a += n


def test_starts_from_cu_seqlens_and_its_errors():
    assert _starts([(1, 5, 7)]).nonzero()[:, 1].tolist() == [0, 1, 6]
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and increase strictly"):
        starts_from_cu_seqlens(torch.tensor([0, 3, 3]))
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 9"):
        starts_from_cu_seqlens(torch.tensor([0, 3, 8]), 9)


@pytest.mark.parametrize("name", ["mru_rotary"])
def test_a_model_with_a_mixer_that_cannot_pack_says_so(name):
    model = build_model("sequence", pattern=[name], vocab_size=5, output_size=5, d_model=16, n_heads=2)
    with pytest.raises((ValueError, NotImplementedError),
                       match=r"starts \(packed documents\) is not supported by mixer|MRURotary\w+ takes no mask"):
        model(torch.randint(0, 5, (1, 4)), starts=torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("T", [1, 7, 100])
def test_segmented_mru_scan_every_torch_backend(T):
    g = torch.Generator().manual_seed(T)
    M = (torch.eye(3) + 0.2 * torch.randn(2, 2, T, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    H0 = (torch.eye(3) + 0.2 * torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    R = torch.rand(2, 2, T, generator=g) < 0.2
    R[0, 0, 0] = True  # a row whose first document ignores the initial state
    ref = naive_mru_scan(M, H0, R)
    w = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * w).sum(), (M, H0))
    for backend in [b for b in SCAN_BACKENDS.names() if b != "triton"]:
        H = mru_scan(M, H0, backend=backend, resets=R)
        torch.testing.assert_close(H, ref, msg=backend)
        for got, want in zip(torch.autograd.grad((H * w).sum(), (M, H0)), ref_grads):
            torch.testing.assert_close(got, want, msg=backend)
    # the reference itself against each document alone (row 1 of head 0)
    starts = R[1, 0].nonzero().flatten().tolist()
    bounds = sorted({0, *starts, T})
    for a, b in zip(bounds, bounds[1:]):
        alone = naive_mru_scan(M[1, 0, a:b], None if a in starts else H0[1, 0])
        torch.testing.assert_close(ref[1, 0, a:b], alone)


def test_a_scan_function_without_resets_is_refused(registered_backend):
    M = torch.eye(2).expand(1, 3, 2, 2)
    with pytest.raises(NotImplementedError, match="backend 'plain' does not take resets"):
        mru_scan(M, backend="plain", resets=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"resets must be None or a bool tensor \[1, 3\]"):
        mru_scan(M, backend="sequential", resets=torch.zeros(3, dtype=torch.bool))


@pytest.fixture
def registered_backend():
    SCAN_BACKENDS.register("plain", ScanBackend(function=lambda s, h0: naive_mru_scan(s, h0)))
    yield
    SCAN_BACKENDS.unregister("plain")


@pytest.mark.parametrize("T", [1, 7, 100])
def test_segmented_linear_attention_forms(T):
    g = torch.Generator().manual_seed(T)
    q, k = (torch.rand(2, 2, T, 3, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    v = torch.randn(2, 2, T, 3, generator=g, dtype=torch.float64)
    S, z = torch.rand(2, 2, 3, 3, generator=g, dtype=torch.float64), torch.rand(2, 2, 3, generator=g,
                                                                                dtype=torch.float64)
    starts = torch.rand(2, T, generator=g) < 0.15
    q.requires_grad_()
    ref = LINEAR_ATTENTION_FORMS.get("recurrent")(q, k, v, S, z, 1e-6, starts=starts)
    (ref_grad,) = torch.autograd.grad(sum(t.sum() for t in ref), q)
    for form, chunk in (("chunked", 4), ("chunked", 64), ("scan", 0)):
        got = LINEAR_ATTENTION_FORMS.get(form)(q, k, v, S, z, 1e-6, chunk, starts=starts)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
        (grad,) = torch.autograd.grad(sum(t.sum() for t in got), q)
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("nonlinearity", ["tanh", "modrelu"])
def test_recurrence_restarts_at_resets(nonlinearity):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    b = -0.1 * torch.rand(4, generator=g, dtype=torch.float64) if nonlinearity == "modrelu" else None
    resets = _starts(LENGTHS).t()
    ref = recurrence_reference(x, W, None, b, nonlinearity, resets=resets)
    out = recurrence(x, W, None, b, nonlinearity, backend="scan", resets=resets)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ref[6:13, 0], recurrence_reference(x[6:13, :1], W, None, b, nonlinearity)[:, 0])
    # a backend without resets runs between the restarts: outputs and gradients as the reference
    w = torch.randn_like(ref)
    (want,) = torch.autograd.grad((ref * w).sum(), x)
    for backend in ("torch", "auto"):
        got = recurrence(x, W, None, b, nonlinearity, backend=backend, resets=resets)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(torch.autograd.grad((got * w).sum(), x)[0], want)
    with pytest.raises(ValueError, match="mask is not supported by backend='torch'"):
        recurrence(x, W, None, b, nonlinearity, backend="torch", resets=resets,
                   mask=torch.ones_like(resets))


def test_block_diagonal_attention_against_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    valid = torch.ones(2, 9, dtype=torch.bool)
    docs = _starts([(2, 3, 4), (5, 4)]).long().cumsum(-1)  # [B, S]: each slot's document
    torch.testing.assert_close(padded_causal_attention(q, k, v, valid, docs=docs),
                               padded_causal_attention_reference(q, k, v, valid, docs))
