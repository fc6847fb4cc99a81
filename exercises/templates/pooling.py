"""Exercise 12 (paper): h(x), hidden-layer selection and pooling.

Read: the paper's "Hidden Layer Selection" (first / mid / last / mean; mid is layer 16 of Vicuna-7B's
32) and its ablation table; fairness.py `select_layers`, `token_mask`, `pool_hidden`.
Write: `pool_hidden` below (the masked-mean variant).
Check: python exercises/check.py pooling path/to/your/pooling.py
"""

import torch


def pool_hidden(hidden, mask, layer="mid"):
    """
    hidden: list of n_layers + 1 tensors (B, T, H) in HF order: hidden[0] is the embedding output,
    hidden[i] the output of decoder layer i. mask (B, T) bool: the tokens to pool (e.g. the image
    tokens). Returns h (B, H) float32:
        first = hidden[1], mid = hidden[int(0.5 * len(hidden))], last = hidden[-1],
        mean  = the average of the first, mid and last pooled vectors, an int i = hidden[i];
        pooled vector = sum_t mask_bt x_bt / sum_t mask_bt, summed in float32;
        a sample with no token in its mask gets h = 0.
    """
    raise NotImplementedError("write pool_hidden")
