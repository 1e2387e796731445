"""Registered sequence models and the presets of the experiments in docs/models.md.

Plain models (small defaults, every size overridable): ``mru``, ``attn``, ``linear_attn``, ``txl``,
``mru_rotary``, ``lru``, ``mamba`` (needs the ``mamba`` extra) — ``n_layers`` x (mixer + MLP) — and
``mlp`` (``n_layers`` MLP sublayers). Extra
keyword arguments go to the mixer (e.g. ``state_matrix="cayley"`` for ``mru``, ``pos="xpos"`` for
``attn``, ``mem_len=128`` for ``txl``). ``sequence`` takes an explicit ``pattern``.

Presets fix the architecture of an experiment (vocab/input/output sizes still come from the task):
- ``shakespeare-{mru,attn,linear_attn}``: 6 x (mixer + MLP), width 384, 6 heads, T 256.
- ``ablation-<mixer>``: one mixer + 4 MLPs, width 256 (4 heads), T 256, for every MRU
  construction (``ablation-mru-ldu`` ...), ``attn``, ``linear_attn``; ``ablation-mlp`` is the 4 MLPs
  alone.
"""
from __future__ import annotations

from ..checks import check_int
from ..ops.state_matrix import STATE_MATRICES
from .registry import MODELS, build_model
from .sequence import SequenceModel, num_parameters, sequence_defaults

# one ablation preset per registered state-matrix construction
MRU_CONSTRUCTIONS = tuple(STATE_MATRICES.names())

PRESETS: dict[str, dict] = {}


def sequence_factory(architecture, doc: str):
    """A ``build_model`` factory that builds the SequenceModel ``architecture(**kwargs)`` writes
    out (``("sequence", arguments)``; :func:`matrec.models.registry.architecture` reads it back)."""
    def build(*, vocab_size=None, input_size=None, output_size, **kwargs):
        args = dict(architecture(**kwargs)[1])
        return SequenceModel(args.pop("pattern"), vocab_size=vocab_size, input_size=input_size,
                             output_size=output_size, **args)

    build.architecture, build.kind, build.__doc__ = architecture, "sequence", doc
    return build


def _explicit(*, pattern, **kwargs) -> tuple[str, dict]:
    return "sequence", {**sequence_defaults(), **kwargs, "pattern": pattern}


MODELS.register("sequence", sequence_factory(_explicit, "A SequenceModel with an explicit ``pattern``."))


def _plain(mixer: str | None):
    def architecture(*, d_model=128, n_layers=2, n_heads=4, dropout=0.0, tie_embeddings=True,
                     context_length=None, **mixer_kwargs) -> tuple[str, dict]:
        check_int("n_layers", n_layers)   # named here: an empty pattern would not say why
        pattern = [mixer, "mlp"] * n_layers if mixer else ["mlp"] * n_layers
        options = {mixer or "mlp": mixer_kwargs} if mixer_kwargs else {}
        return _explicit(pattern=pattern, d_model=d_model, n_heads=n_heads, dropout=dropout,
                         tie_embeddings=tie_embeddings, mixer_options=options, context_length=context_length)

    return sequence_factory(architecture, f"``n_layers`` x ({mixer} + MLP) sequence model." if mixer
                            else "``n_layers`` MLP sublayers: no sequence mixing at all.")


for _mixer in ("mru", "attn", "linear_attn", "txl", "mru_rotary", "lru", "mamba"):
    MODELS.register(_mixer, _plain(_mixer))
MODELS.register("mlp", _plain(None))


def register_preset(name: str, pattern: list[str], *, d_model: int, n_heads: int, context_length: int,
                    description: str, mixer_options: dict | None = None, dropout: float = 0.0,
                    mixer_args: dict[str, str] | None = None) -> None:
    """Register ``name`` in ``MODELS`` as a fixed SequenceModel architecture.

    ``mixer_args`` ``{key: mixer}``: build keywords passed on into that mixer's options, so an
    experiment can sweep one mixer option by name (``model_args.element_scale``).
    """
    config = dict(pattern=list(pattern), d_model=d_model, n_heads=n_heads,
                  context_length=context_length, mixer_options=mixer_options or {}, dropout=dropout)
    PRESETS[name] = dict(config, description=description)

    def architecture(**overrides) -> tuple[str, dict]:
        cfg = {**config, **overrides}
        options = {k: dict(v) for k, v in cfg["mixer_options"].items()}
        for key, mixer in (mixer_args or {}).items():
            if key in cfg:
                options.setdefault(mixer, {})[key] = cfg.pop(key)
        cfg["mixer_options"] = options
        return _explicit(**cfg)

    MODELS.register(name, sequence_factory(architecture, description))


for _mixer in ("mru", "attn", "linear_attn"):
    register_preset(f"shakespeare-{_mixer}", [_mixer, "mlp"] * 6, d_model=384, n_heads=6,
                    context_length=256, dropout=0.2,
                    description=f"shakespeare-char: 6 x ({_mixer} + MLP), width 384, 6 heads, T 256")

for _c in MRU_CONSTRUCTIONS:
    register_preset(f"ablation-mru-{_c}", ["mru"] + ["mlp"] * 4, d_model=256, n_heads=4,
                    context_length=256, mixer_options={"mru": {"state_matrix": _c}},
                    mixer_args={"element_scale": "mru", "normalize": "mru"},
                    description=f"ablation: one MRU ({_c}) + 4 MLPs, width 256")
for _mixer in ("attn", "linear_attn"):
    register_preset(f"ablation-{_mixer}", [_mixer] + ["mlp"] * 4, d_model=256, n_heads=4,
                    context_length=256, description=f"ablation: one {_mixer} + 4 MLPs, width 256")
register_preset("ablation-mlp", ["mlp"] * 4, d_model=256, n_heads=4, context_length=256,
                description="ablation: the 4 MLPs alone (no sequence mixing)")


def list_presets(vocab_size: int = 65) -> list[dict]:
    """Every preset with its description and parameter count for a ``vocab_size``-token LM
    (65 = tiny-shakespeare characters)."""
    rows = []
    for name, preset in PRESETS.items():
        model = build_model(name, vocab_size=vocab_size, output_size=vocab_size)
        rows.append({"name": name, "description": preset["description"],
                     "parameters": num_parameters(model)})
    return rows


def print_presets_table(vocab_size: int = 65) -> None:
    """Print the presets table of docs/models.md (``python -m matrec.models``)."""
    print(f"| preset | architecture | parameters (vocab {vocab_size}) |\n|---|---|---|")
    for row in list_presets(vocab_size):
        print(f"| `{row['name']}` | {row['description'].split(': ', 1)[1]} | {row['parameters']:,} |")
