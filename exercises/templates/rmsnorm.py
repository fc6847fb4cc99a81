"""Exercise 1 (warm-up): RMSNorm in float32.

Read: model.py `RMSNorm` (and why it upcasts); Zhang & Sennrich 2019, "Root Mean Square Layer
Normalization"; tests/test_model.py, which checks our Llama against HF transformers.
Write: `rmsnorm` below, with tensor operations (not torch's own F.rms_norm or nn.RMSNorm).
Check: python exercises/check.py rmsnorm path/to/your/rmsnorm.py
"""

import torch


def rmsnorm(x, weight, eps=1e-5):
    """
    y = weight * (x / sqrt(mean(x^2) + eps)), the mean over the last dimension.

    x (..., dim) of any float dtype, weight (dim,). As HF/Meta Llama do: compute the normalised x in
    float32 (in float16, x^2 overflows above 256), cast it back to x.dtype, then multiply by the
    weight (so a float32 weight on float16 activations gives a float32 result).
    """
    raise NotImplementedError("write rmsnorm")
