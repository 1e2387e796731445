"""The mixer protocol (matrec.nn.protocol) for every registered mixer: it is implemented, the masked
state is laid out as ``state_spec()`` says, and a padded step is invisible (float64, odd lengths):
outputs on the valid prefix and everything after the padding equal a run of the prefix alone."""
import importlib.util

import pytest
import torch

from matrec.models.mixers import MIXERS
from matrec.nn.protocol import NoExportForm, StateSpec, flatten_state, missing_protocol, unflatten_state

E = 16
NAMES = [n for n in MIXERS.names() if n != "mamba" or importlib.util.find_spec("mambapy") is not None]
# layers whose state cannot honour a mask by construction (docs/architecture.md, "The mixer protocol")
NO_MASK = {"txl", "mamba", "mru_rotary", "lstm", "gru"}
TOL = dict(atol=1e-10, rtol=1e-10)


def build(name, dtype=torch.float64):
    torch.manual_seed(0)
    mixer = MIXERS.get(name)(E, n_heads=2)
    mixer.init_weights(0.02, 0.02)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the identity-like init, so every path carries signal
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mixer.to(dtype).eval()


@pytest.mark.parametrize("name", NAMES)
def test_every_mixer_implements_the_protocol(name):
    mixer = build(name)
    assert missing_protocol(mixer) == []
    assert all(isinstance(s, StateSpec) for s in mixer.state_spec())


@pytest.mark.parametrize("name", sorted(set(NAMES) - NO_MASK))
def test_masked_state_is_laid_out_as_its_spec(name):
    mixer = build(name, torch.float32)
    x, T = torch.randn(3, 7, E), 7
    with torch.no_grad():
        _, state = mixer(x, None, mask=torch.ones(3, T, dtype=torch.bool))
    specs = mixer.state_spec()
    tensors = flatten_state(specs, state)
    for spec, t in zip(specs, tensors):
        assert tuple(t.shape) == spec.sizes(3, slots=T) and t.dtype == spec.dtype, (spec, t.shape, t.dtype)
    assert type(unflatten_state(specs, tensors)) is type(state)
    # the initial state the spec describes is a state the layer continues from
    init = unflatten_state(specs, [s.initial(3) for s in specs])
    with torch.no_grad():
        mixer(x, init, mask=torch.ones(3, T, dtype=torch.bool))


@pytest.mark.parametrize("name", sorted(set(NAMES) - NO_MASK))
def test_a_padded_step_is_invisible(name):
    mixer = build(name)
    g = torch.Generator().manual_seed(2)
    x, nxt = torch.randn(2, 7, E, generator=g, dtype=torch.float64), torch.randn(2, 4, E, generator=g,
                                                                                 dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 3:] = False  # row 1: 3 tokens, then padding
    mask[0, 2] = False   # row 0: a hole in the middle
    ones = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        full, _ = mixer(x, None)
        torch.testing.assert_close(mixer(x, None, mask=torch.ones_like(mask))[0], full, **TOL)
        y, state = mixer(x, None, mask=mask)
        after, _ = mixer(nxt, state, mask=ones)
        alone, s1 = mixer(x[1:, :3], None, mask=mask[1:, :3])
        torch.testing.assert_close(y[1, :3], alone[0], **TOL)
        torch.testing.assert_close(after[1], mixer(nxt[1:], s1, mask=ones[1:])[0][0], **TOL)
        kept = x[:1, [0, 1, 3, 4, 5, 6]]  # row 0 without its padded step
        _, s0 = mixer(kept, None, mask=torch.ones(1, 6, dtype=torch.bool))
        torch.testing.assert_close(after[0], mixer(nxt[:1], s0, mask=ones[:1])[0][0], **TOL)


@pytest.mark.parametrize("name", sorted(set(NAMES) & NO_MASK))
def test_a_mixer_that_cannot_mask_says_so(name):
    mixer = build(name, torch.float32)
    with pytest.raises(NoExportForm, match="takes no mask"):
        mixer(torch.randn(1, 3, E), None, mask=torch.ones(1, 3, dtype=torch.bool))


def test_bad_mask_is_named():
    mixer = build("mru", torch.float32)
    with pytest.raises(ValueError, match=r"mask must be None or a bool tensor \[B, T\] = \[1, 3\]"):
        mixer(torch.randn(1, 3, E), mask=torch.ones(1, 3))
