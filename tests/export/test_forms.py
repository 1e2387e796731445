"""matrec.export's forms in eager PyTorch: the same outputs and states as the models, streamed in
chunks, with padding; unsupported models refused by name. (The exported graphs: test_runtimes.py.)

The forms run with ``mode="step"``, whose loops over time are unrolled (any length eagerly); the
scan HOP path is what the runtime tests export."""
import pytest
import torch
from torch import nn

from matrec.export import UnsupportedModelError, exportable
from matrec.models import build_model
from matrec.models.mixers import RNNMixer
from matrec.nn.mornn import MORNN
from matrec.ops.state_matrix import STATE_MATRICES, StateMatrix

V = 11
TOL = dict(atol=1e-5, rtol=1e-5)


def noisy(model, scale=0.05, seed=0):
    """``model`` in eval mode, moved off its init (zero W_in, identity-like matrices)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def zoo_model(d=16):
    """One SequenceModel holding every exportable mixer, the MORNN with each nonlinearity."""
    pattern = ["mornn"] * 4 + ["mru", "linear_attn", "attn", "rnn", "mlp"]
    model = build_model("sequence", pattern=pattern, vocab_size=V, output_size=V, d_model=d, n_heads=2)
    for layer, phi in zip(model.layers, ("tanh", "relu", "modrelu", "identity")):
        layer.mixer = RNNMixer(MORNN(d, d, batch_first=True, nonlinearity=phi))
    return noisy(model)


MODELS = {
    "zoo": zoo_model,
    "mornn": lambda: noisy(build_model("mornn", vocab_size=V, output_size=V, hidden_size=8, num_layers=2)),
    "rnn": lambda: noisy(build_model("rnn", vocab_size=V, output_size=V, hidden_size=8)),
    "features": lambda: noisy(build_model("mru", input_size=3, output_size=2, d_model=8, n_heads=2, n_layers=1)),
    # per-row positions (the masked path) serve xPos as they serve RoPE
    "xpos": lambda: noisy(build_model("attn", vocab_size=V, output_size=V, d_model=8, n_layers=1, pos="xpos")),
}


def _inputs(form, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    if form.vocab_size is not None:
        return torch.randint(0, V, (B, T), generator=g)
    return torch.randn(B, T, form.input_size, generator=g)


@pytest.mark.parametrize("name", list(MODELS))
def test_form_matches_model_whole_and_streamed(name):
    model = MODELS[name]()
    form = exportable(model, "step")
    x = _inputs(form, 2, 13)
    ones = torch.ones(2, 13, dtype=torch.bool)
    with torch.no_grad():
        ref, _ = model(x)
        out, *_ = form(x, ones, *form.initial_state(2))
        torch.testing.assert_close(out, ref, **TOL)
        state = form.initial_state(2)
        for a, b in ((0, 5), (5, 6), (6, 13)):  # a prompt, one step, the rest
            out, *state = form(x[:, a:b], ones[:, a:b], *state)
            torch.testing.assert_close(out, ref[:, a:b], **TOL)


@pytest.mark.parametrize("name", ["zoo", "mornn", "xpos"])
def test_padding_leaves_the_state_as_after_the_valid_prefix(name):
    model = MODELS[name]()
    form = exportable(model, "step")
    x = _inputs(form, 2, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        out, *state = form(x, mask, *form.initial_state(2))
        ref, _ = model(x[1:, :4])
        torch.testing.assert_close(out[1, :4], ref[0], **TOL)
        # the next token continues row 1 from its 4 valid ones
        nxt = _inputs(form, 2, 1, seed=1)
        step, *_ = form(nxt, torch.ones(2, 1, dtype=torch.bool), *state)
        ref2, _ = model(torch.cat((x[1:, :4], nxt[1:]), dim=1))
        torch.testing.assert_close(step[1, 0], ref2[0, -1], **TOL)


def test_state_is_plain_tensors_named_and_specified():
    form = exportable(zoo_model(), "sequence")
    state = form.initial_state(3)
    assert all(isinstance(s, torch.Tensor) for s in state)
    assert len(state) == len(form.state_names) == len(form.state_spec(3))
    spec = {s["name"]: s for s in form.state_spec(3)}
    assert spec["4.H"]["init"] == "identity" and spec["6.valid"]["dtype"] == "bool"
    assert [list(s.shape) for s in state] == [s["shape"] for s in form.state_spec(3)]


def test_mornn_matrix_is_materialised_once():
    model = MODELS["mornn"]()
    form = exportable(model, "step")
    W = model.rnn.orthogonal_weight("weight_hh_l0")
    torch.testing.assert_close(form.model.rnn.all_weights[0][1], W)
    names = [n for n, _ in form.named_parameters()] + [n for n, _ in form.named_buffers()]
    assert not any(n.endswith(("_A", "_base")) for n in names)


@pytest.mark.parametrize("model, match", [
    (lambda: nn.Linear(2, 2), "neither a matrec SequenceModel"),
    (lambda: build_model("lstm", vocab_size=V, output_size=V, hidden_size=4), "LSTM"),
    (lambda: build_model("mornn", vocab_size=V, output_size=V, hidden_size=4, bidirectional=True),
     "bidirectional"),
    (lambda: build_model("txl", vocab_size=V, output_size=V, d_model=8, n_layers=1), "TransformerXL"),
    (lambda: build_model("attn", vocab_size=V, output_size=V, d_model=8, n_layers=1, window=4),
     "sliding-window attention"),
    (lambda: build_model("mru_rotary", vocab_size=V, output_size=V, d_model=8, n_layers=1, chunk_size=2),
     "MRURotaryAttention takes no mask"),
    (lambda: build_model("lru", vocab_size=V, output_size=V, d_model=8, n_layers=1), "its state is complex"),
    (lambda: build_model("mru", vocab_size=V, output_size=V, d_model=8, n_layers=1, n_heads=1,
                         normalize="spectral"), "normalize='spectral' has no export form"),
    (lambda: build_model("mru", vocab_size=V, output_size=V, d_model=8, n_layers=1, n_heads=1,
                         normalize="direction"), "normalize='direction' has no export form"),
])
def test_unsupported_models_are_refused_by_name(model, match):
    with pytest.raises(UnsupportedModelError, match=match):
        exportable(model())


def test_construction_without_an_export_form_is_refused_by_name():
    """A construction registered from user code exports only if it registers a form too."""
    STATE_MATRICES.register("mine", StateMatrix(lambda x, d: x.unflatten(-1, (d, d)) + torch.eye(d),
                                                lambda d: d * d))
    try:
        model = build_model("mru", vocab_size=V, output_size=V, d_model=8, n_layers=1, n_heads=1,
                            state_matrix="mine")
        with pytest.raises(UnsupportedModelError, match="state_matrix='mine' has no export form"):
            exportable(model)
    finally:
        STATE_MATRICES.unregister("mine")


def test_bad_mode_and_model_type():
    with pytest.raises(ValueError, match="mode must be one of"):
        exportable(MODELS["rnn"](), "stream")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        exportable("model")


def test_every_zoo_preset_exports():
    """The shakespeare and ablation presets (every MRU construction among them): each has an export
    form equal to the model."""
    from matrec.models.zoo import PRESETS
    constructions = {p["mixer_options"].get("mru", {}).get("state_matrix") for p in PRESETS.values()}
    assert set(STATE_MATRICES.names()) <= constructions
    x = torch.randint(0, 65, (1, 5), generator=torch.Generator().manual_seed(0))
    for name in PRESETS:
        model = noisy(build_model(name, vocab_size=65, output_size=65), scale=0.01)
        form = exportable(model, "step")
        with torch.no_grad():
            torch.testing.assert_close(form(x, torch.ones(1, 5, dtype=torch.bool), *form.initial_state())[0],
                                       model(x)[0], **TOL, msg=name)
