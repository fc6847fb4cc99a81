"""Exercise 2 (warm-up): the ViT patch embedding.

Read: model.py `PatchEmbed` and `VisionTransformer.forward`; Dosovitskiy et al. 2021, "An Image is
Worth 16x16 Words", Sec. 3.1. BiomedCLIP cuts a 224 px image into 14 x 14 patches of 16 px.
Write: `patch_embed` below, with reshape/permute and one matrix product (no nn.Conv2d): that is
the point of the exercise; a stride-p convolution computes the same thing.
Check: python exercises/check.py patch_embed path/to/your/patch_embed.py
"""

import torch


def patch_embed(pixels, weight, bias):
    """
    pixels (B, 3, S, S), weight (C, 3, p, p), bias (C,) -> tokens (B, (S/p)^2, C).

    Cut the image into non-overlapping p x p patches; token i is the patch at grid row i // (S/p),
    column i % (S/p) (row-major, as conv -> flatten(2) orders them). Each token is
    sum over (channel, row, column) of weight[c_out] * patch, plus bias[c_out]: flatten each patch
    in the same (channel, row, column) order as weight[c_out].
    """
    raise NotImplementedError("write patch_embed")
