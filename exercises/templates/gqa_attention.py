"""Exercise 7 (core): grouped-query attention.

Read: model.py `Attention.forward`; Ainslie et al. 2023, "GQA: Training Generalized Multi-Query
Transformer Models from Multi-Head Checkpoints", Sec. 2; Vaswani et al. 2017, Sec. 3.2.1.
Write: `attention` below. Write softmax(q k^T / sqrt(d) + mask) v yourself (no
F.scaled_dot_product_attention); for RoPE you may use model.apply_rope or your exercise-5 `rope`.
Check: python exercises/check.py gqa_attention path/to/your/gqa_attention.py
"""

import torch

from model import apply_rope  # noqa: F401  (x (B, nh, T, d), cos/sin (B, T, d))


def attention(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask=None):
    """
    One Llama self-attention layer (no bias anywhere).

    x (B, T, D); wq (n_head * d, D), wk and wv (n_kv * d, D), wo (D, n_head * d), nn.Linear layout
    (y = x W^T); cos, sin (B, T, d) from model.rope_cos_sin; mask None (plain causal) or bool
    (B, 1, T, T) with True = may attend (exercise 6). Returns (B, T, D).

    q, k, v -> (B, heads, T, d); RoPE on q and k; each of the n_kv key/value heads serves
    n_head / n_kv consecutive query heads: query head h reads kv head h // (n_head / n_kv).
    """
    raise NotImplementedError("write attention")
