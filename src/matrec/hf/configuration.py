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

from ..checks import check_int
from ..models import MODELS
from ..models.registry import architecture, model_kind
from ..models.sequence import sequence_defaults

# the fields a config.json must hold (the rest have defaults), per kind of backbone
REQUIRED_FIELDS = {"sequence": ("backbone", "vocab_size", "pattern", "d_model", "n_heads"),
                   "recurrent": ("backbone", "vocab_size", "hidden_size", "num_layers")}
_RECURRENT_FIELDS = ("hidden_size", "num_layers", "embed_dim")   # the rest of a recurrent spec: rnn_options


def recurrent_backbones() -> list[str]:
    """The registered recurrent models (``rnn``, ``lstm``, ``gru``, ``mornn`` and any added later)."""
    return [n for n in MODELS.names() if model_kind(n) == "recurrent"]


def backbones() -> list[str]:
    return ["sequence"] + recurrent_backbones()


def _check_backbone(backbone) -> None:
    if backbone != "sequence" and (not isinstance(backbone, str) or backbone not in MODELS
                                   or model_kind(backbone) != "recurrent"):
        raise ValueError(f"MatrecConfig: backbone must be one of {backbones()}, got {backbone!r}")


def _signature_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


# defaults of the default config (transformers builds one): SequenceModel's and the recurrent zoo's own
_SEQUENCE = sequence_defaults()
_RECURRENT = _signature_defaults(MODELS.get("rnn").architecture)


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
    d_model: int = _SEQUENCE["d_model"]
    n_heads: int = _SEQUENCE["n_heads"]
    dropout: float = _SEQUENCE["dropout"]
    tie_embeddings: bool = _SEQUENCE["tie_embeddings"]
    mixer_options: dict | None = None
    context_length: int | None = _SEQUENCE["context_length"]
    hidden_size: int = _RECURRENT["hidden_size"]
    num_layers: int = _RECURRENT["num_layers"]
    embed_dim: int | None = _RECURRENT["embed_dim"]
    rnn_options: dict | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        _check_backbone(self.backbone)
        check_int("vocab_size", self.vocab_size)
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
                             f"(expected one of {backbones()})")
        _check_backbone(backbone)
        missing = [f for f in REQUIRED_FIELDS[model_kind(backbone) or backbone] if f not in config_dict]
        if missing:
            raise ValueError(f"matrec config (backbone {backbone!r}) is missing the field(s) {missing}")
        return super().from_dict(config_dict, **kwargs)

    def model_kwargs(self) -> tuple[str, dict]:
        """``(name, kwargs)`` such that ``matrec.build_model(name, **kwargs)`` builds the backbone."""
        io = dict(vocab_size=self.vocab_size, output_size=self.vocab_size)
        if self.backbone == "sequence":
            args = {k: getattr(self, k) for k in _SEQUENCE}
            args.update(pattern=list(self.pattern), mixer_options=dict(self.mixer_options or {}))
            return "sequence", {**io, **args}
        return self.backbone, {**io, **{k: getattr(self, k) for k in _RECURRENT_FIELDS},
                               **(self.rnn_options or {})}

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


def config_from_model_spec(name: str, *, vocab_size: int, **model_args) -> MatrecConfig:
    """The explicit :class:`MatrecConfig` of ``matrec.build_model(name, vocab_size=vocab_size,
    output_size=vocab_size, **model_args)`` (a registered sequence or recurrent model, a preset, or
    ``"sequence"``): the architecture the model's own factory writes out
    (:func:`matrec.models.registry.architecture`), so nothing about the zoo is restated here."""
    kind, spec = architecture(name, **model_args)   # unknown name: ValueError listing the models
    if kind == "recurrent":
        fields = {k: spec.pop(k) for k in _RECURRENT_FIELDS}
        return MatrecConfig(backbone=name, vocab_size=vocab_size, rnn_options=spec, **fields)
    spec["mixer_options"] = spec.get("mixer_options") or {}
    return MatrecConfig(backbone="sequence", vocab_size=vocab_size, **spec)
