"""Exercise 9 (core): LoRA, its initialisation, forward and merge.

Read: Hu et al. 2021, "LoRA", Sec. 4.1; lora.py (the docstring's W + BA picture, `LoRALinear`,
`merge`); tests/test_lora.py for the invariants (B = 0 equals the base; merged equals unmerged).
Write: the three functions below.
Check: python exercises/check.py lora path/to/your/lora.py
"""

import math

import torch


def lora_init(r, in_features, out_features):
    """
    A (r, in_features) kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in));
    B (out_features, r) zeros. Returns (A, B). Why B = 0: the adapted model starts exactly as the base.
    """
    raise NotImplementedError("write lora_init")


def lora_forward(x, weight, bias, lora_A, lora_B, alpha):
    """
    y = x W^T + b + (alpha / r) * x A^T B^T, r = lora_A.shape[0]; bias may be None.
    x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r). Do not change weight.
    """
    raise NotImplementedError("write lora_forward")


def lora_merge(weight, lora_A, lora_B, alpha):
    """The merged weight W + (alpha / r) B A (out, in), as a new tensor (do not change weight)."""
    raise NotImplementedError("write lora_merge")
