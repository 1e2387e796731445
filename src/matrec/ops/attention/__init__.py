"""Causal softmax attention with a KV cache and an optional sliding window.

``naive`` is the definition (the reference), ``sdpa`` the fast form on PyTorch's fused kernels.
"""
from .naive import causal_attention_reference, padded_causal_attention_reference
from .sdpa import causal_attention, causal_mask, padded_causal_attention, padded_causal_mask

__all__ = ["causal_attention", "causal_attention_reference", "causal_mask", "padded_causal_attention",
           "padded_causal_attention_reference", "padded_causal_mask"]
