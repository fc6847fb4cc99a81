"""Exercise 6 (core): the causal + padding attention mask.

Read: model.py `attention_mask_4d` and `Llama.forward` (how past, T and the (B, S) padding mask
meet during batched generation with left padding).
Write: `attention_mask_4d` below.
Check: python exercises/check.py causal_mask path/to/your/causal_mask.py
"""

import torch


def attention_mask_4d(attention_mask, past, T):
    """
    attention_mask (B, S) with 1 = real token, 0 = padding, covering the `past` cached tokens and the
    T new ones (S = past + T) -> bool (B, 1, T, S), True = may attend.

    Query t sits at absolute position past + t and may see key s when s is a real token and
    s <= past + t. A padding query would then see nothing at all, and softmax over an all-masked row
    is NaN: let every query see itself (its output is never used).
    """
    raise NotImplementedError("write attention_mask_4d")
