"""Exercise 5 (core): rotary position embeddings.

Read: Su et al. 2021, "RoFormer", Sec. 3.2-3.4; model.py `rope_cos_sin`, `rotate_half`,
`apply_rope` and the note there on why HF checkpoints pair dimension i with i + d/2.
Write: `rope` below.
Check: python exercises/check.py rope path/to/your/rope.py
"""

import torch


def rope(x, position_ids, theta=10000.0):
    """
    x (B, nh, T, d) queries or keys, position_ids (B, T) -> x rotated, same shape and dtype.

    Frequencies inv_freq_i = theta^(-2i / d) for i = 0 .. d/2 - 1; angle_{t,i} = position_t * inv_freq_i.
    HF Llama convention ("rotate half"): dimension i is rotated together with dimension i + d/2,
        out_i       = x_i cos(angle_i) - x_{i+d/2} sin(angle_i)
        out_{i+d/2} = x_{i+d/2} cos(angle_i) + x_i sin(angle_i)
    Use position_ids (a left-padded sample starts later), not 0 .. T-1.
    """
    raise NotImplementedError("write rope")
