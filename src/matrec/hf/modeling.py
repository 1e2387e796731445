"""``MatrecForCausalLM``: a matrec language model as a transformers ``PreTrainedModel``.

The wrapped backbone is the plain matrec model (``self.model``), so the weights are the same
tensors under a ``model.`` prefix and the forward is matrec's own. Generation state travels in a
:class:`MatrecCache`, a transformers ``Cache`` holding each layer's matrec state batch-first.

Left padding: a row's pad positions are never fed to the backbone. Rows are grouped by their
number of pads and each group runs on its unpadded tokens, so a padded row computes exactly what
the same prompt computes alone, for every mixer (recurrent states start from their initial value,
attention sees no pad key, positions start at 0). After the prompt, groups whose states have the
same shapes (recurrences: MRU, RNNs, linear attention) are merged into one batch; attention-like
layers, whose caches have the prompt's length, keep one group per prompt length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.mixers import RNNMixer
from .configuration import MatrecConfig



def _tree_map(fn, obj):
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tree_map(fn, o) for o in obj)
    raise TypeError(f"unexpected state entry of type {type(obj).__name__}")


def _leaves(obj) -> list:
    if obj is None:
        return []
    if isinstance(obj, Tensor):
        return [obj]
    return [t for o in obj for t in _leaves(o)]


def _batch_map(fn, state):
    """Apply ``fn`` to every batch-first tensor of ``state``; 0-dim tensors (an attention cache's
    position counter) are shared by the whole batch and stay as they are."""
    return _tree_map(lambda t: fn(t) if t.dim() > 0 else t, state)


def _structure(obj):
    if obj is None or isinstance(obj, Tensor):
        return type(obj).__name__
    return (type(obj).__name__, tuple(_structure(o) for o in obj))


class MatrecCache(Cache):
    """The generation state of a :class:`MatrecForCausalLM`: the backbone's per-layer states.

    States are kept batch-first (torch RNN states, ``[layers, B, H]``, are stored ``[B, layers, H]``)
    so ``reorder_cache`` (beam search), ``batch_repeat_interleave`` and ``batch_select_indices``
    index dimension 0 of every tensor. ``groups`` is a list of ``(rows, state)``: ``rows`` (int64
    indices, or None for all rows) are the batch rows whose state is ``state``; there is more than
    one group only for left-padded prompts of attention-like models (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.groups: list[tuple[Tensor | None, object]] = []
        self.seen_tokens = 0
        self.batch = 0

    # what transformers' generation loop asks of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # it counts the tokens it has seen: generate slices the inputs by it

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.groups)

    @property
    def batch_size(self) -> int:
        return self.batch if self.groups else -1

    def reset(self) -> None:
        self.groups, self.seen_tokens, self.batch = [], 0, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a matrec cache holds recurrent states, which cannot be rolled back "
                                  "(assisted / speculative decoding is not supported)")

    def _rows(self, rows: Tensor | None, device) -> Tensor:
        return torch.arange(self.batch, device=device) if rows is None else rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` takes the state of row ``beam_idx[i]`` (beam search)."""
        groups = []
        for rows, state in self.groups:
            r = self._rows(rows, beam_idx.device)
            src = beam_idx[r]
            pos = torch.searchsorted(r, src).clamp(max=len(r) - 1)
            if not torch.equal(r[pos], src):
                raise ValueError("reorder_cache: beam_idx moves a row into a group of a different "
                                 "prompt length (beams must stay within their prompt)")
            groups.append((rows, _batch_map(lambda t: t.index_select(0, pos.to(t.device)), state)))
        self.groups = groups

    def batch_repeat_interleave(self, repeats: int) -> None:
        groups = []
        for rows, state in self.groups:
            if rows is not None:
                rows = (rows[:, None] * repeats + torch.arange(repeats, device=rows.device)).flatten()
            groups.append((rows, _batch_map(lambda t: t.repeat_interleave(repeats, dim=0), state)))
        self.groups, self.batch = groups, self.batch * repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        groups = []
        for rows, state in self.groups:
            r = self._rows(rows, indices.device)
            keep = torch.isin(indices, r).nonzero().flatten()  # new row numbers
            if len(keep):
                pos = torch.searchsorted(r, indices[keep])
                groups.append((keep, _batch_map(lambda t: t.index_select(0, pos.to(t.device)), state)))
        self.groups, self.batch = groups, len(indices)


def _merge(groups):
    """One group holding every row, when all groups' states have the same structure, the same
    per-row shapes and the same shared (0-dim) values; else ``groups`` unchanged."""
    if len(groups) < 2:
        return groups
    first = groups[0][1]
    if any(_structure(s) != _structure(first) for _, s in groups):
        return groups
    leaves = [_leaves(s) for _, s in groups]
    for column in zip(*leaves):
        t0 = column[0]
        if t0.dim() == 0:
            if any(not torch.equal(t, t0) for t in column):
                return groups
        elif any(t.shape[1:] != t0.shape[1:] for t in column):
            return groups
    order = torch.cat([rows for rows, _ in groups])
    inverse = torch.argsort(order)
    merged = []
    for column in zip(*leaves):
        t0 = column[0]
        merged.append(t0 if t0.dim() == 0 else torch.cat(column).index_select(0, inverse.to(t0.device)))
    it = iter(merged)
    return [(None, _tree_map(lambda _: next(it), first))]


class MatrecPreTrainedModel(PreTrainedModel):
    config_class = MatrecConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _is_stateful = True  # recurrent states cannot be rolled back: no assisted decoding
    _no_split_modules = []

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward creates its own MatrecCache

    def _init_weights(self, module) -> None:
        # The backbone initialises itself when built. transformers' from_pretrained builds it on the
        # meta device and loads the saved tensors; buffers that are not saved (rotary frequencies)
        # come back uninitialised, so they are copied from a freshly built backbone.
        if not self.__dict__.get("_built_on_meta") or not getattr(module, "_non_persistent_buffers_set", None):
            return
        fresh = self.__dict__.get("_fresh_buffers")
        if fresh is None:
            with torch.random.fork_rng(devices=[]):
                backbone = self.config.build()
            fresh = {f"model.{name}": buf for name, buf in backbone.named_buffers()}
            self.__dict__["_fresh_buffers"] = fresh
        prefix = next(name for name, m in self.named_modules() if m is module)
        with torch.no_grad():
            for name in module._non_persistent_buffers_set:
                buf = getattr(module, name)
                if buf is not None:
                    buf.copy_(fresh[f"{prefix}.{name}"])


class MatrecForCausalLM(MatrecPreTrainedModel, GenerationMixin):
    """A matrec language model (``SequenceModel`` of any mixers, or a recurrent model) for
    transformers: ``from_pretrained``, ``generate`` (greedy, sampling, beam search), ``pipeline``.

    ``forward(input_ids [B, T], attention_mask [B, T] | None, cache | None, labels | None)`` returns
    ``CausalLMOutputWithPast(loss, logits [B, T, vocab_size], cache)``. ``attention_mask`` must be
    left padding (zeros, then ones); logits at pad positions are zero.
    """

    _tied_weights_keys = {"model.head.weight": "model.encoder.weight"}

    def __init__(self, config: MatrecConfig) -> None:
        super().__init__(config)
        self.model = config.build()
        # from_pretrained builds on the meta device: only then do unsaved buffers need restoring
        self.__dict__["_built_on_meta"] = any(t.is_meta for t in self.model.parameters())
        if config.backbone == "sequence":
            # layers whose state is torch's RNN hidden state: [layers, B, H] (an LSTM: a pair of them)
            self._rnn_layers = [isinstance(layer.mixer, RNNMixer) for layer in self.model.layers]
        self.post_init()

    def get_input_embeddings(self):
        return self.model.encoder

    def set_input_embeddings(self, value) -> None:
        self.model.encoder = value

    def get_output_embeddings(self):
        return self.model.head

    def set_output_embeddings(self, value) -> None:
        self.model.head = value

    # torch RNN states are [layers, B, H]; the cache keeps everything batch-first
    def _swap_rnn_dims(self, state, contiguous: bool):
        swap = lambda t: t.transpose(0, 1).contiguous() if contiguous else t.transpose(0, 1)  # noqa: E731
        if state is None:
            return None
        if self.config.backbone != "sequence":   # a recurrent model: its state is the RNN's
            return _tree_map(swap, state)
        return [_tree_map(swap, s) if rnn else s for s, rnn in zip(state, self._rnn_layers)]

    def _prompt_groups(self, attention_mask: Tensor | None, T: int):
        """``[(rows | None, pads)]``: the rows with ``pads`` left pad positions."""
        if attention_mask is None:
            return [(None, 0)]
        if attention_mask.shape[-1] != T or attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [B, T] = [B, {T}] like input_ids, got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask.to(torch.long)
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("attention_mask must be left padding (zeros, then ones in every row); "
                             "set tokenizer.padding_side = 'left'")
        pads = T - mask.sum(-1)
        if (pads == T).any():
            raise ValueError("attention_mask has a row without any token")
        if not pads.any():
            return [(None, 0)]
        return [((pads == p).nonzero().flatten(), int(p)) for p in torch.unique(pads).tolist()]

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: Tensor | None = None,
                cache: MatrecCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, inputs_embeds: Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is not None:
            raise ValueError("MatrecForCausalLM takes input_ids, not inputs_embeds")
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag):
                raise ValueError(f"MatrecForCausalLM does not return {flag[7:]}; got {flag}=True")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be token ids [B, T], got "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        if cache is not None and not isinstance(cache, MatrecCache):
            raise TypeError(f"cache must be a MatrecCache (returned by this model), got {type(cache).__name__}")
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and cache.groups:
            # a continuation: the new tokens are real; the padding was handled with the prompt
            if attention_mask is not None and not bool(attention_mask[:, -T:].all()):
                raise ValueError("attention_mask: only the prompt may be padded; the tokens fed after "
                                 "it (with a cache) must all be real")
            if cache.batch != B:
                raise ValueError(f"cache holds {cache.batch} rows, input_ids has {B}")
            runs = [(rows, 0, self._swap_rnn_dims(state, True)) for rows, state in cache.groups]
        else:
            runs = [(rows, pads, None) for rows, pads in self._prompt_groups(attention_mask, T)]

        logits, groups = None, []
        for rows, pads, state in runs:
            x = (input_ids if rows is None else input_ids[rows])[:, pads:]
            if x.numel() and (int(x.max()) >= self.config.vocab_size or int(x.min()) < 0):
                raise ValueError(f"input_ids holds the id {int(x.max()) if int(x.min()) >= 0 else int(x.min())} "
                                 f"at an unmasked position, outside the model's vocabulary of "
                                 f"{self.config.vocab_size} tokens")
            out, new_state = self.model(x, state)  # [b, T - pads, V]
            if rows is None and pads == 0:
                logits = out
            else:
                if logits is None:
                    logits = out.new_zeros(B, T, out.shape[-1])
                logits[(rows if rows is not None else slice(None)), pads:] = out
            groups.append((rows, self._swap_rnn_dims(new_state, False)))

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if use_cache:
            cache = cache if cache is not None else MatrecCache()
            cache.groups = _merge(groups) if not cache.groups else groups
            cache.seen_tokens += T
            cache.batch = B
        else:
            cache = None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
