"""Every mixer: causal, chunked-with-state == one call; mixer-specific properties."""
from importlib.util import find_spec

import pytest
import torch

import matrec
from matrec.models import MIXERS
from matrec.nn.attention import MRURotaryAttention
from matrec.ops.attention import causal_attention, causal_attention_reference
from matrec.ops.linear_attention import chunked_form, recurrent_form
from support import perturbed

E, H = 16, 2
ALL_MIXERS = ["mlp", "mru", "attn", "linear_attn", "txl", "mru_rotary", "lstm", "gru", "rnn", "mornn", "lru"]
ALL_MIXERS += ["mamba"] if find_spec("mambapy") else []  # the mamba extra (tests/nn/test_mamba.py skips without it)
OPTIONS = {"txl": {"mem_len": 64}, "mru_rotary": {"chunk_size": 4}}


def make(name, seed=0, **extra):
    torch.manual_seed(seed)
    mixer = MIXERS.get(name)(E, n_heads=H, dropout=0.0, **{**OPTIONS.get(name, {}), **extra})
    mixer.init_weights(0.02, 0.01)  # every mixer has one (the SequenceModel contract)
    return perturbed(mixer, 0.2)


def test_registry_lists_every_mixer():
    assert set(ALL_MIXERS) <= set(MIXERS.names())


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_mixer_is_causal(name):
    mixer = make(name)
    x = torch.randn(2, 9, E, dtype=torch.float64)
    y, _ = mixer(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 4, E, dtype=torch.float64)
    y2, _ = mixer(x2)
    torch.testing.assert_close(y2[:, :5], y[:, :5], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y2[:, 5:], y[:, 5:])  # the perturbed steps did change


@pytest.mark.parametrize("name", [n for n in ALL_MIXERS if n != "mlp"])
@pytest.mark.parametrize("chunks", [(1,), (3, 1, 7), (5, 6)])
def test_chunked_calls_with_state_equal_one_call(name, chunks):
    mixer = make(name)
    T = sum(chunks)
    x = torch.randn(3, T, E, dtype=torch.float64)
    y_full, _ = mixer(x)
    ys, state, t = [], None, 0
    for c in chunks:
        y, state = mixer(x[:, t:t + c], state)
        ys.append(y)
        t += c
    torch.testing.assert_close(torch.cat(ys, dim=1), y_full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL_MIXERS)
def test_odd_width_runs_causally_and_chunks_like_one_call(name):
    # width 15 = 3 heads of 5 (odd head size: RoPE needs even, so attn runs without positions here;
    # the MRU's default order would be 1, whose det-1 matrices are constant: order 5 instead)
    options = {"attn": {"pos": "none"}, "mru_rotary": {"chunk_size": 5}, "txl": {"mem_len": 16},
               "mru": {"state_size": 75}}
    torch.manual_seed(0)
    mixer = MIXERS.get(name)(15, n_heads=3, **options.get(name, {}))
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    mixer = mixer.double().eval()
    x = torch.randn(2, 7, 15, dtype=torch.float64)
    y_full, _ = mixer(x)
    a, state = mixer(x[:, :3], state=None)
    b, _ = mixer(x[:, 3:], state)
    torch.testing.assert_close(torch.cat((a, b), 1), y_full, rtol=1e-9, atol=1e-9)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(mixer(x2)[0][:, :4], y_full[:, :4], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", [n for n in ALL_MIXERS if n not in ("mlp", "txl")])
def test_chunked_calls_with_state_have_the_gradients_of_one_call(name):
    # the carried state stays in the graph (txl detaches its memory by design: tested apart)
    mixer = make(name)
    x = torch.randn(2, 11, E, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(2, 11, E, dtype=torch.float64)
    params = [x] + list(mixer.parameters())
    g_full = torch.autograd.grad((mixer(x)[0] * cot).sum(), params, allow_unused=True)
    ys, state = [], None
    for a, b in ((0, 4), (4, 5), (5, 11)):
        y, state = mixer(x[:, a:b], state)
        ys.append(y)
    g_chunked = torch.autograd.grad((torch.cat(ys, 1) * cot).sum(), params, allow_unused=True)
    for a, b in zip(g_chunked, g_full):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def reference_attention(q, k, v, offset, window):
    """softmax(q k^T / sqrt(D) + mask) v, the mask spelled out position by position."""
    T, S = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, T, S]
    for i in range(T):
        for j in range(S):
            qp, kp = offset + i, offset + T - S + j  # absolute positions
            if kp > qp or (window is not None and kp <= qp - window):
                scores[..., i, j] = float("-inf")
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("T, S, offset, window", [(7, 7, 0, None), (1, 1, 0, None), (3, 8, 5, None),
                                                  (1, 6, 5, None), (7, 7, 0, 3), (3, 5, 9, 4)])
def test_causal_attention_equals_the_spelled_out_reference_with_gradients(T, S, offset, window):
    torch.manual_seed(T + S)
    q = torch.randn(2, 3, T, 5, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, S, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y, y_ref = causal_attention(q, k, v, offset, window), reference_attention(q, k, v, offset, window)
    torch.testing.assert_close(y, y_ref)
    cot = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (q, k, v), cot), torch.autograd.grad(y_ref, (q, k, v), cot)):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("T", [1, 7, 100])
def test_linear_attention_chunked_equals_recurrent_outputs_and_grads(T):
    torch.manual_seed(T)
    B, Hh, D = 2, 3, 5
    q, k = (torch.rand(B, Hh, T, D, dtype=torch.float64) + 0.1 for _ in range(2))
    v = torch.randn(B, Hh, T, D, dtype=torch.float64)
    S = torch.rand(B, Hh, D, D, dtype=torch.float64)
    z = torch.rand(B, Hh, D, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, S, z)]
    outs_ref = recurrent_form(*inputs, 1e-6)
    outs = chunked_form(*inputs, 1e-6, chunk_size=16)
    cot = [torch.randn_like(o) for o in outs_ref]
    g_ref = torch.autograd.grad(outs_ref, inputs, cot)
    g = torch.autograd.grad(outs, inputs, cot)
    for a, b in zip(outs, outs_ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_linear_attention_forms_agree_in_the_mixer():
    x = torch.randn(2, 13, E, dtype=torch.float64)
    y_chunked, s1 = make("linear_attn", form="chunked", chunk_size=4)(x)
    y_rec, s2 = make("linear_attn", form="recurrent")(x)
    torch.testing.assert_close(y_chunked, y_rec)
    torch.testing.assert_close(s1[0], s2[0])


@pytest.mark.parametrize("pos", ["rope", "xpos"])
def test_rotary_scores_depend_on_relative_position_only(pos):
    enc = matrec.models.POSITIONS.get(pos)(8)
    q, k = torch.randn(1, 1, 6, 8, dtype=torch.float64), torch.randn(1, 1, 6, 8, dtype=torch.float64)
    q0, k0 = enc(q, k, 0)
    q1, k1 = enc(q, k, 37)
    torch.testing.assert_close(q0 @ k0.transpose(-1, -2), q1 @ k1.transpose(-1, -2))
    assert not torch.allclose(q0, q1)


def test_attention_positions_matter():
    x = torch.randn(1, 6, E, dtype=torch.float64)
    x_rev = x.clone()
    x_rev[:, :5] = x[:, :5].flip(1)  # same set of earlier tokens, other order
    for pos in ("rope", "xpos"):
        mixer = make("attn", pos=pos)
        assert not torch.allclose(mixer(x)[0][:, -1], mixer(x_rev)[0][:, -1])
    mixer = make("attn", pos="none")  # without positions the last output ignores order
    torch.testing.assert_close(mixer(x)[0][:, -1], mixer(x_rev)[0][:, -1])


@pytest.mark.parametrize("construction", ["cayley", "expm", "householder"])
def test_mru_rotary_keeps_query_and_key_norms(construction):
    mixer = make("mru_rotary", orthogonal_map=construction)
    x = torch.randn(2, 11, E, dtype=torch.float64)
    q, k = torch.randn(2, H, 11, E // H, dtype=torch.float64), torch.randn(2, H, 11, E // H, dtype=torch.float64)
    q2, k2, (P,) = mixer.encode_positions(x, q, k, 0, ())
    assert not torch.allclose(q2, q)  # it did rotate
    for a, b in ((q, q2), (k, k2)):
        torch.testing.assert_close(b.norm(dim=-1), a.norm(dim=-1))
        # chunk by chunk too: each d-sized piece is rotated on its own
        torch.testing.assert_close(b.unflatten(-1, (-1, 4)).norm(dim=-1), a.unflatten(-1, (-1, 4)).norm(dim=-1))
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(P.transpose(-1, -2) @ P, eye.expand_as(P))


def test_mru_rotary_scores_depend_on_tokens_in_between():
    """(P_i q)^T (P_j k) = q^T (M_(j+1)..M_i)^T k: shifting the prefix before j changes nothing."""
    mixer = make("mru_rotary")
    x = torch.randn(1, 8, E, dtype=torch.float64)
    q, k = torch.randn(1, H, 8, E // H, dtype=torch.float64), torch.randn(1, H, 8, E // H, dtype=torch.float64)
    qa, ka, _ = mixer.encode_positions(x, q, k, 0, ())
    x2 = x.clone()
    x2[:, :3] = torch.randn(1, 3, E, dtype=torch.float64)  # other tokens before position 3
    qb, kb, _ = mixer.encode_positions(x2, q, k, 0, ())
    s_a, s_b = qa @ ka.transpose(-1, -2), qb @ kb.transpose(-1, -2)  # [1, H, 8, 8]
    torch.testing.assert_close(s_b[..., 3:, 3:], s_a[..., 3:, 3:])
    assert not torch.allclose(s_b[..., 3:, :3], s_a[..., 3:, :3])


def test_txl_memory_changes_outputs_and_is_detached():
    mixer = make("txl", mem_len=5)
    mixer.train()  # dropout is 0: train mode only matters for the graph
    x1 = torch.randn(2, 6, E, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 4, E, dtype=torch.float64)
    y1, mem = mixer(x1)
    assert mem.shape == (2, 5, E) and not mem.requires_grad
    torch.testing.assert_close(mem, x1[:, -5:].detach())
    y2_mem, mem2 = mixer(x2, mem)
    y2_none, _ = mixer(x2)
    assert not torch.allclose(y2_mem, y2_none)
    torch.testing.assert_close(mem2, torch.cat((x1[:, -1:].detach(), x2), 1))
    y2_mem.sum().backward()  # gradients stop at the segment boundary
    assert x1.grad is None
    assert mixer.q.weight.grad is not None


def test_txl_steps_beyond_the_memory_equal_a_call_on_the_last_mem_len_tokens():
    # relative positions + bounded memory: a step sees exactly its mem_len predecessors
    M = 3
    mixer = make("txl", mem_len=M)
    x = torch.randn(2, 10, E, dtype=torch.float64)
    state, steps = None, []
    for t in range(10):
        y, state = mixer(x[:, t:t + 1], state)
        steps.append(y)
    for t in range(10):
        window, _ = mixer(x[:, max(0, t - M):t + 1])
        torch.testing.assert_close(steps[t][:, 0], window[:, -1], rtol=1e-10, atol=1e-10)
    full, _ = mixer(x)  # a full call sees the whole past, so later steps differ from it
    assert not torch.allclose(torch.cat(steps, 1)[:, M + 1:], full[:, M + 1:])


def test_txl_memory_is_bounded_and_zero_means_none():
    mixer = make("txl", mem_len=3)
    _, mem = mixer(torch.randn(1, 10, E, dtype=torch.float64))
    assert mem.shape == (1, 3, E)
    _, mem = make("txl", mem_len=0)(torch.randn(1, 10, E, dtype=torch.float64))
    assert mem is None


def test_mixer_errors():
    with pytest.raises(ValueError, match="mixer must be one of"):
        MIXERS.get("nope")
    with pytest.raises(ValueError, match="n_heads must divide d_model"):
        MIXERS.get("attn")(10, n_heads=3)
    with pytest.raises(ValueError, match="chunk_size must divide the head size"):
        MRURotaryAttention(16, n_heads=2, chunk_size=3)
    with pytest.raises(ValueError, match="orthogonal_map must be one of"):
        MRURotaryAttention(16, n_heads=2, orthogonal_map="ldu")
    with pytest.warns(DeprecationWarning, match="now orthogonal_map"):
        assert MRURotaryAttention(16, n_heads=2, construction="expm").orthogonal_map == "expm"
    with pytest.raises(ValueError, match=r"d_model=15, n_heads=3 \(head size 5\).*must be even"):
        MIXERS.get("attn")(15, n_heads=3, pos="rope")
    with pytest.raises(ValueError, match="pos must be one of"):
        MIXERS.get("attn")(16, n_heads=2, pos="alibi")
    with pytest.raises(ValueError, match="form must be one of"):
        MIXERS.get("linear_attn")(16, n_heads=2, form="fast")
    with pytest.raises(ValueError, match="window must be an int >= 1 or None"):
        MIXERS.get("attn")(16, n_heads=2, window=0)
    with pytest.raises(ValueError, match="mem_len must be an int >= 0"):
        MIXERS.get("txl")(16, n_heads=2, mem_len=-1)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        MIXERS.get("linear_attn")(16, n_heads=2, chunk_size=0)
    with pytest.raises(ValueError, match="n_heads must be an int >= 1"):
        MIXERS.get("attn")(16, n_heads=True)
    with pytest.raises(ValueError, match="expansion must be an int >= 1"):
        MIXERS.get("mlp")(16, expansion=0)


@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("offset,S,window", [(0, None, None), (0, None, 3), (5, 12, None), (5, 8, 4)])
def test_causal_attention_equals_reference(T, offset, S, window):
    """The SDPA form against the definition (scores, mask, softmax), outputs and every gradient."""
    S = T if S is None else min(S + T, offset + T)
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, S, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    out = causal_attention(q, k, v, offset, window)
    ref = causal_attention_reference(q, k, v, offset, window)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [q, k, v])
    refs = torch.autograd.grad((ref * w).sum(), [q, k, v])
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["attn", "mru_rotary"])
def test_sliding_window_chunked_equals_one_call_and_bounds_the_cache(name):
    mixer = make(name, window=4)
    x = torch.randn(2, 13, E, dtype=torch.float64)
    y_full, _ = mixer(x)
    ys, state = [], None
    for a, b in ((0, 5), (5, 6), (6, 13)):
        y, state = mixer(x[:, a:b], state)
        ys.append(y)
        assert state[0].shape[-2] <= 4 and int(state[2]) == b
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-9, atol=1e-9)


def test_sliding_window_equals_attention_over_the_last_window_tokens():
    windowed, full = make("attn", window=4), make("attn")  # same seed: same weights
    x = torch.randn(2, 10, E, dtype=torch.float64)
    y, _ = windowed(x)
    for t in (2, 6, 9):  # RoPE is relative, so the window's absolute offset does not matter
        ref, _ = full(x[:, max(0, t - 3):t + 1])
        torch.testing.assert_close(y[:, t], ref[:, -1])
    assert not torch.allclose(y[:, 9], full(x)[0][:, 9])


@pytest.mark.parametrize("name", ["linear_attn", "mru_rotary"])
def test_running_sums_and_products_stay_fp32_under_bf16_autocast(name):
    mixer = make(name).float()
    x = torch.randn(2, 9, E)
    ref, _ = mixer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = mixer(x)
    carried = state[-1]  # z for linear attention, the running product P for MRU-rotary
    assert carried.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("pos", ["rope", "xpos"])
def test_rotary_encodings_equal_complex_rotation_reference(pos):
    # pair i is (x[i], x[i + D/2]) as one complex number, turned by position * base^(-2i/D);
    # xPos also scales q by zeta_i^(m/512) and k by zeta_i^(-m/512)
    D, T, offset = 6, 5, 11
    enc = matrec.models.POSITIONS.get(pos)(D)
    q, k = torch.randn(2, 3, T, D, dtype=torch.float64), torch.randn(2, 3, T, D, dtype=torch.float64)
    q2, k2 = enc(q, k, offset)
    i = torch.arange(D // 2, dtype=torch.float32)  # the encodings keep their frequencies in fp32
    freq, zeta = (10000.0 ** (-2 * i / D)).double(), ((2 * i / D + 0.4) / 1.4).double()
    m = torch.arange(offset, offset + T, dtype=torch.float64)[:, None]  # [T, 1]
    turn = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), m * freq)
    scale = zeta ** (m / 512) if pos == "xpos" else torch.ones_like(turn.real)
    for x, x2, s in ((q, q2, scale), (k, k2, 1 / scale)):
        z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * turn * s
        torch.testing.assert_close(x2, torch.cat((z.real, z.imag), -1))


def _txl_reference(mixer, x, mem):
    # score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_r R_(i - j)) / sqrt(D), j <= i over [memory; x]
    from matrec.nn.transformer_xl import sinusoid

    B, T, _ = x.shape
    h = x if mem is None else torch.cat((mem, x), 1)  # [B, K, E]; query i sits at position M + i
    K, Hh, D = h.shape[1], mixer.n_heads, mixer.head_dim
    M = K - T
    q = mixer.q(x).view(B, T, Hh, D)
    k, v = (t.view(B, K, Hh, D) for t in mixer.kv(h).split(E, dim=-1))
    r = mixer.r(sinusoid(K, E, x.device, x.dtype)).view(K, Hh, D)  # row = distance
    out = torch.zeros(B, T, Hh, D, dtype=x.dtype)
    for i in range(T):
        for n in range(Hh):
            scores = torch.stack([((q[:, i, n] + mixer.u[n]) * k[:, j, n]).sum(-1)
                                  + ((q[:, i, n] + mixer.v[n]) * r[M + i - j, n]).sum(-1)
                                  for j in range(M + i + 1)], -1) / D ** 0.5  # [B, j <= M + i]
            out[:, i, n] = (scores.softmax(-1)[..., None] * v[:, : M + i + 1, n]).sum(1)
    return mixer.residual_proj(out.reshape(B, T, E))


@pytest.mark.parametrize("T, M", [(3, 4), (1, 0), (1, 6), (7, 5), (7, 0), (10, 2)])
def test_txl_scores_equal_the_spelled_out_relative_formula(T, M):
    mixer = make("txl", mem_len=4)
    with torch.no_grad():  # u and v start at zero: move them so that their terms count
        mixer.u.normal_()
        mixer.v.normal_()
    mem = torch.randn(2, M, E, dtype=torch.float64) if M else None
    x = torch.randn(2, T, E, dtype=torch.float64, requires_grad=True)
    y, _ = mixer(x, mem)
    ref = _txl_reference(mixer, x, mem)
    torch.testing.assert_close(y, ref)
    inputs, cot = [x] + list(mixer.parameters()), torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, inputs, cot), torch.autograd.grad(ref, inputs, cot)):
        torch.testing.assert_close(g, g_ref)


def test_mru_rotary_equals_a_loop_over_running_products():
    mixer = make("mru_rotary")  # chunk_size 4: 2 chunks per head of 8
    x = torch.randn(2, 5, E, dtype=torch.float64, requires_grad=True)
    q, k = (torch.randn(2, H, 5, E // H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    P0 = torch.linalg.qr(torch.randn(2, H, 2, 4, 4, dtype=torch.float64)).Q  # a carried state
    q2, k2, (P_last,) = mixer.encode_positions(x, q, k, 3, (P0,))
    M = mixer.rotations(x)  # [B, H, C, T, d, d]
    P, refs = P0, {"q": [], "k": []}
    for t in range(5):
        P = P @ M[:, :, :, t]  # P_t = P_(t-1) M_t
        for name, a in (("q", q), ("k", k)):  # chunk c of token t: P_t u
            refs[name].append(torch.cat([(P[:, :, c] @ a[:, :, t, 4 * c:4 * c + 4, None])[..., 0]
                                         for c in range(2)], -1))
    q_ref, k_ref = (torch.stack(refs[n], 2) for n in ("q", "k"))
    for out, ref in ((q2, q_ref), (k2, k_ref), (P_last, P)):
        torch.testing.assert_close(out, ref)
    inputs = [x, q, k, mixer.rotation.weight, mixer.rotation.bias]
    cots = [torch.randn_like(t) for t in (q2, k2, P)]
    g = torch.autograd.grad((q2, k2, P_last), inputs, cots)
    g_ref = torch.autograd.grad((q_ref, k_ref, P), inputs, cots)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
