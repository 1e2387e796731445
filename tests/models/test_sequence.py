"""SequenceModel / registered models: the build_model contract, state passing and generation."""
from importlib.util import find_spec

import pytest
import torch

from matrec.models import MODELS, SequenceModel, build_model, generate, num_parameters
from support import perturbed

V = 13
SEQUENCE_MODELS = ["mru", "attn", "linear_attn", "txl", "mru_rotary", "mlp", "lru"]
SEQUENCE_MODELS += ["mamba"] if find_spec("mambapy") else []  # the mamba extra
ALL_MODELS = SEQUENCE_MODELS + ["rnn", "lstm", "gru", "mornn"]


def tiny(name, seed=0, **kw):
    torch.manual_seed(seed)
    size = dict(d_model=16, n_layers=2, n_heads=2) if name in SEQUENCE_MODELS else dict(hidden_size=16)
    return perturbed(build_model(name, vocab_size=V, output_size=V, **{**size, **kw}), 0.1)


def test_all_models_registered():
    assert set(ALL_MODELS) <= set(MODELS.names())


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_tokens_and_features_contract(name):
    model = build_model(name, vocab_size=V, output_size=5, d_model=16, n_layers=1, n_heads=2)
    out, state = model(torch.randint(0, V, (3, 7)))
    assert out.shape == (3, 7, 5) and len(state) == len(model.layers)
    model = build_model(name, input_size=4, output_size=2, d_model=16, n_layers=1, n_heads=2)
    out, _ = model(torch.randn(3, 7, 4))
    assert out.shape == (3, 7, 2)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pattern_tied_embeddings_and_gpt2_init():
    model = SequenceModel(["attn", "mlp", "linear_attn", "mlp"], vocab_size=V, output_size=V, d_model=32,
                          n_heads=4, mixer_options={"attn": {"pos": "xpos"}})
    assert model.head.weight is model.encoder.weight
    assert [layer.mixer.__class__.__name__ for layer in model.layers] == [
        "CausalSelfAttention", "MLP", "LinearAttention", "MLP"]
    assert model.layers[0].mixer.position.__class__.__name__ == "XPos"
    # residual projections scaled by depth: 0.02 / sqrt(4 sublayers) = 0.01
    std_res = model.layers[1].mixer.residual_proj.weight.std().item()
    std_in = model.layers[1].mixer.fc.weight.std().item()
    assert 0.008 < std_res < 0.012 and 0.018 < std_in < 0.022
    untied = SequenceModel(["mlp"], vocab_size=V, output_size=3)
    assert untied.head.weight is not untied.encoder.weight
    assert num_parameters(model) == sum(p.numel() for p in set(model.parameters()))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_chunked_with_state_equals_one_call(name):
    model = tiny(name)
    x = torch.randint(0, V, (2, 12))
    full, _ = model(x)
    a, state = model(x[:, :5])
    b, state = model(x[:, 5:6], state)
    c, _ = model(x[:, 6:], state)
    torch.testing.assert_close(torch.cat((a, b, c), 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_generation_equals_full_recomputation(name):
    model = tiny(name)
    prompt = torch.randint(0, V, (2, 4))
    greedy = generate(model, prompt, 9, temperature=0)
    assert greedy.shape == (2, 13) and torch.equal(greedy[:, :4], prompt)
    torch.testing.assert_close(greedy, generate(model, prompt, 9, temperature=0, use_state=False))
    # each greedy token is the argmax of a full recomputation at its position
    logits, _ = model(greedy)
    torch.testing.assert_close(logits[:, 3:-1].argmax(-1), greedy[:, 4:])
    sampled = [generate(model, prompt, 9, temperature=0.8, top_k=5, use_state=s,
                        generator=torch.Generator().manual_seed(1)) for s in (True, False)]
    torch.testing.assert_close(sampled[0], sampled[1])


def test_generate_method_sampling_and_errors():
    model = tiny("attn")
    one = model.generate(torch.tensor([1, 2, 3]), 4, top_k=1)  # top_k=1 is greedy
    assert one.shape == (7,)
    torch.testing.assert_close(one, generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0)[0])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(generate(model, one[None], 20, generator=g()), generate(model, one[None], 20, generator=g()))
    assert torch.equal(generate(model, one, 0), one)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, one, -1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, one, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, one, 1, top_k=0)
    with pytest.raises(ValueError, match="prompt must be token ids"):
        generate(model, torch.randn(1, 3), 1)
    # bools pass as ints and nan passes every comparison: both refused by name
    for kwargs, match in (({"max_new_tokens": True}, "max_new_tokens"), ({"temperature": float("nan")}, "temperature"),
                          ({"temperature": float("inf")}, "temperature"), ({"top_k": True}, "top_k")):
        with pytest.raises(ValueError, match=match):
            generate(model, one, **{"max_new_tokens": 1, **kwargs})
    with pytest.raises(TypeError, match="prompt must be a Tensor of token ids, got list"):
        generate(model, [1, 2], 1)
    with pytest.raises(ValueError, match=rf"prompt token ids must be in \[0, {V}\)"):
        generate(model, torch.tensor([1, 99]), 1)
    for name in ("attn", "lstm"):  # a features model cannot generate
        with pytest.raises(ValueError, match="model must take token ids"):
            generate(build_model(name, input_size=3, output_size=3), one, 1)
    assert model.training is False
    model.train()
    generate(model, one, 1)
    assert model.training is True  # mode restored
    lstm = tiny("lstm")
    torch.testing.assert_close(lstm.generate(one, 5, temperature=0), generate(lstm, one, 5, temperature=0))


def test_sequence_model_errors():
    with pytest.raises(ValueError, match="pattern must be a non-empty list"):
        SequenceModel("attn", vocab_size=V, output_size=V)
    with pytest.raises(ValueError, match="mixer must be one of"):
        SequenceModel(["attn", "conv"], vocab_size=V, output_size=V)
    with pytest.raises(ValueError, match="exactly one of vocab_size and input_size"):
        SequenceModel(["attn"], output_size=V)
    with pytest.raises(ValueError, match="mixer_options names mixers not in the pattern"):
        SequenceModel(["attn"], vocab_size=V, output_size=V, mixer_options={"mru": {}})
    model = SequenceModel(["attn", "mlp"], vocab_size=V, output_size=V, d_model=16, n_heads=2)
    with pytest.raises(ValueError, match=r"x must be token ids \[B, T\]"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="state must be a list of 2"):
        model(torch.randint(0, V, (2, 3)), [None])
    feats = SequenceModel(["mlp"], input_size=3, output_size=1)
    with pytest.raises(ValueError, match=r"x must be features \[B, T, 3\]"):
        feats(torch.randn(2, 3, 4))


def test_hybrid_pattern_streams_like_one_call_and_generates_identically():
    torch.manual_seed(0)
    model = build_model("sequence", pattern=["attn", "mlp", "linear_attn", "txl", "mru_rotary", "lstm"],
                        vocab_size=V, output_size=V, d_model=16, n_heads=2,
                        mixer_options={"attn": {"pos": "xpos", "window": 5}, "mru_rotary": {"chunk_size": 4}})
    model = model.double().eval()
    x = torch.randint(0, V, (2, 11))
    a, state = model(x[:, :4])
    b, _ = model(x[:, 4:], state)
    torch.testing.assert_close(torch.cat((a, b), 1), model(x)[0], rtol=1e-9, atol=1e-9)
    prompt = x[:, :3]
    torch.testing.assert_close(generate(model, prompt, 8, temperature=0),
                               generate(model, prompt, 8, temperature=0, use_state=False))


# mixer -> name of its residual (output) projection, the layer GPT-2 scales down by depth
RESIDUAL_PROJ = {"mlp": "residual_proj", "attn": "residual_proj", "linear_attn": "residual_proj",
                 "txl": "residual_proj", "mru_rotary": "residual_proj", "mru": "residual_proj",
                 "lru": "residual_proj"}


@pytest.mark.parametrize("name", sorted(RESIDUAL_PROJ))
def test_gpt2_init_scales_every_residual_projection_by_depth(name):
    for depth in (2, 8):
        torch.manual_seed(depth)
        model = SequenceModel([name] * depth, vocab_size=V, output_size=V, d_model=64, n_heads=4)
        for layer in model.layers:
            std = getattr(layer.mixer, RESIDUAL_PROJ[name]).weight.std().item()
            expected = 0.02 / depth ** 0.5  # 0.0141 at depth 2, 0.0071 at depth 8
            assert abs(std - expected) < 0.1 * expected, (depth, std, expected)
    assert abs(model.encoder.weight.std().item() - 0.02) < 0.002  # the embedding is not scaled


STREAMING = ["mru", "linear_attn", "mru_rotary", "attn", "rnn", "lstm", "gru", "mornn", "lru"]


def _numel(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() if state.dim() > 0 else 0  # 0-dim: a position counter
    if isinstance(state, (list, tuple)):
        return sum(_numel(s) for s in state)
    return 0


@pytest.mark.parametrize("name", STREAMING)
def test_generate_streams_one_token_per_step_and_recurrent_state_stays_constant(name):
    model = tiny(name)
    calls, sizes = [], []

    def record(module, args, out):  # returns None: the output is left as it is
        calls.append(tuple(args[0].shape))
        sizes.append(_numel(out[1]))

    model.register_forward_hook(record)
    generate(model, torch.randint(0, V, (2, 5)), 12, temperature=0)
    assert calls == [(2, 5)] + [(2, 1)] * 11  # the prompt once, then one token per call
    if name in ("attn", "mru_rotary"):  # the KV cache grows by one token per step
        assert all(b > a for a, b in zip(sizes, sizes[1:]))
    else:  # recurrent state: the same size whatever the generated length
        assert len(set(sizes)) == 1 and sizes[0] > 0
