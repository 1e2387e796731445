"""``MatrecConfig``: everything that rebuilds a matrec language model, as a transformers config.

Two backbones, both built through :func:`matrec.build_model`:

- ``backbone="sequence"``: a :class:`matrec.models.SequenceModel` (``pattern`` of mixers, ``d_model``,
  ``n_heads``, ``dropout``, ``tie_embeddings``, ``mixer_options``, ``context_length``);
- ``backbone`` one of ``"rnn"``, ``"lstm"``, ``"gru"``, ``"mornn"``: the zoo's recurrent model
  (``hidden_size``, ``num_layers``, ``embed_dim``, ``rnn_options``).

:func:`config_from_model_spec` turns a workbench model (a registry name and its arguments, presets
included) into this explicit form, so a saved directory does not depend on preset definitions.
"""
from __future__ import annotations

import inspect
from typing import Any

from transformers import PretrainedConfig

RECURRENT_BACKBONES = ("rnn", "lstm", "gru", "mornn")
BACKBONES = ("sequence",) + RECURRENT_BACKBONES
# the fields a config.json must hold (the rest have defaults)
REQUIRED_FIELDS = {"sequence": ("backbone", "vocab_size", "pattern", "d_model", "n_heads"),
                   **{b: ("backbone", "vocab_size", "hidden_size", "num_layers") for b in RECURRENT_BACKBONES}}


class MatrecConfig(PretrainedConfig):
    """Configuration of :class:`~matrec.hf.MatrecForCausalLM` (``model_type="matrec"``).

    Args:
        backbone: ``"sequence"`` or a recurrent cell (``"rnn"``, ``"lstm"``, ``"gru"``, ``"mornn"``).
        vocab_size: tokens of the vocabulary (the model's input and output size).
        pattern, d_model, n_heads, dropout, tie_embeddings, mixer_options, context_length: the
            :class:`matrec.models.SequenceModel` arguments (``backbone="sequence"``).
        hidden_size, num_layers, embed_dim, rnn_options: the recurrent model's arguments
            (``rnn_options`` go to the cell, e.g. ``{"nonlinearity": "modrelu"}`` for MORNN).
    """

    model_type = "matrec"

    backbone: str = "sequence"
    vocab_size: int = 65
    pattern: list | None = None
    d_model: int = 128
    n_heads: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True
    mixer_options: dict | None = None
    context_length: int | None = None
    hidden_size: int = 128
    num_layers: int = 1
    embed_dim: int | None = None
    rnn_options: dict | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.backbone not in BACKBONES:
            raise ValueError(f"MatrecConfig: backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"MatrecConfig: vocab_size must be a positive int, got {self.vocab_size!r}")
        if self.backbone == "sequence":
            if self.pattern is None:  # the default config (transformers builds one to diff against)
                self.pattern = ["mru", "mlp", "mru", "mlp"]
            _check_pattern(self.pattern, self.mixer_options)
        # transformers ties the head to the embedding when this is set; matrec ties it itself in
        # exactly this case (SequenceModel with vocab_size == output_size)
        self.tie_word_embeddings = self.backbone == "sequence" and bool(self.tie_embeddings)
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """As transformers' ``from_dict``, but a config.json missing a required field is an error
        naming it (a silent default would build a different model than the weights expect)."""
        backbone = config_dict.get("backbone")
        if not config_dict:
            raise ValueError("no matrec model config found: config.json is missing or empty")
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"not a matrec model: config.json has model_type "
                             f"{config_dict['model_type']!r}, expected {cls.model_type!r}")
        if backbone is None:
            raise ValueError("not a matrec model config: the field 'backbone' is missing "
                             f"(expected one of {list(BACKBONES)})")
        if backbone not in BACKBONES:
            raise ValueError(f"MatrecConfig: backbone must be one of {list(BACKBONES)}, got {backbone!r}")
        missing = [f for f in REQUIRED_FIELDS[backbone] if f not in config_dict]
        if missing:
            raise ValueError(f"matrec config (backbone {backbone!r}) is missing the field(s) {missing}")
        return super().from_dict(config_dict, **kwargs)

    def model_kwargs(self) -> tuple[str, dict]:
        """``(name, kwargs)`` such that ``matrec.build_model(name, **kwargs)`` builds the backbone."""
        if self.backbone == "sequence":
            return "sequence", dict(
                vocab_size=self.vocab_size, output_size=self.vocab_size, pattern=list(self.pattern),
                d_model=self.d_model, n_heads=self.n_heads, dropout=self.dropout,
                tie_embeddings=self.tie_embeddings, mixer_options=dict(self.mixer_options or {}),
                context_length=self.context_length)
        return self.backbone, dict(
            vocab_size=self.vocab_size, output_size=self.vocab_size, hidden_size=self.hidden_size,
            num_layers=self.num_layers, embed_dim=self.embed_dim, **(self.rnn_options or {}))

    def build(self):
        """A freshly initialised backbone (``SequenceModel`` or recurrent model)."""
        import matrec

        name, kwargs = self.model_kwargs()
        return matrec.build_model(name, **kwargs)


def _check_pattern(pattern, mixer_options) -> None:
    from matrec.models import MIXERS

    if isinstance(pattern, str) or not isinstance(pattern, (list, tuple)) or not pattern:
        raise ValueError(f"MatrecConfig: pattern must be a non-empty list of mixer names, got {pattern!r}")
    valid = MIXERS.names()
    unknown = [p for p in pattern if p not in valid]
    if unknown:
        raise ValueError(f"MatrecConfig: pattern names unknown mixer(s) {unknown}; valid mixers are {valid}")
    if mixer_options is not None and not isinstance(mixer_options, dict):
        raise ValueError(f"MatrecConfig: mixer_options must be a dict of mixer -> options, got {mixer_options!r}")


def _defaults(factory) -> dict:
    return {n: p.default for n, p in inspect.signature(factory).parameters.items()
            if p.default is not inspect.Parameter.empty}


def config_from_model_spec(name: str, *, vocab_size: int, **model_args) -> MatrecConfig:
    """The explicit :class:`MatrecConfig` of ``matrec.build_model(name, vocab_size=vocab_size,
    output_size=vocab_size, **model_args)`` (a registered model, preset, or ``"sequence"``).

    The result is checked: it must build a model with the same parameter names and shapes.
    """
    from matrec.models import MODELS, PRESETS

    factory = MODELS.get(name)  # unknown name: ValueError listing the registered models
    args = dict(model_args)
    if name in RECURRENT_BACKBONES:
        d = _defaults(factory)
        fields = dict(backbone=name, hidden_size=args.pop("hidden_size", d.get("hidden_size")),
                      num_layers=args.pop("num_layers", d.get("num_layers")),
                      embed_dim=args.pop("embed_dim", None), rnn_options=args)
    else:
        if name == "sequence":
            spec = args
        elif name in PRESETS:
            spec = {**{k: v for k, v in PRESETS[name].items() if k != "description"}, **args}
        else:  # a plain zoo model: n_layers x (mixer + MLP) ("mlp": n_layers MLPs)
            d = _defaults(factory)
            n_layers = args.pop("n_layers", d.get("n_layers"))
            spec = {k: args.pop(k, d[k]) for k in ("d_model", "n_heads", "dropout", "tie_embeddings",
                                                    "context_length") if k in d}
            spec["pattern"] = [name, "mlp"] * n_layers if name != "mlp" else ["mlp"] * n_layers
            spec["mixer_options"] = {name: args} if args else {}
            args = {}
        fields = dict(backbone="sequence", **spec)
        if "pattern" not in fields:
            raise ValueError(f"model {name!r}: cannot find its layer pattern (pass pattern=...)")
        fields.setdefault("mixer_options", {})
        for k in ("d_model", "n_heads", "dropout", "tie_embeddings", "context_length"):
            if k not in fields:
                fields[k] = _sequence_default(k)
    config = MatrecConfig(vocab_size=vocab_size, **fields)
    _check_same_architecture(name, config, vocab_size, model_args)
    return config


def _sequence_default(arg: str):
    from matrec.models import SequenceModel

    return inspect.signature(SequenceModel.__init__).parameters[arg].default


def _check_same_architecture(name, config, vocab_size, model_args) -> None:
    import matrec

    want = matrec.build_model(name, vocab_size=vocab_size, output_size=vocab_size, **model_args)
    got = config.build()
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    if shapes(want) != shapes(got):
        raise ValueError(f"model {name!r} with {model_args} cannot be expressed as a MatrecConfig: "
                         f"the rebuilt model's parameters differ")
