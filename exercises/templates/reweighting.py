"""Exercise 3 (warm-up): the resampling and reweighting baselines.

Read: the paper's baselines ("Resampling", "Reweighting" rows of the main table, and its argument
that they assume disparities come from group sizes); data.py `group_labels`,
`inverse_frequency_weights`, `GroupBalancedSampler`; model.py `lm_loss` (how sample weights enter
the loss).
Write: both functions below. `groups` is a list of hashable group keys, one per training sample,
e.g. race codes (0,), (0,), (1,) or joint keys (race, gender).
Check: python exercises/check.py reweighting path/to/your/reweighting.py
"""

import torch


def inverse_frequency_weights(groups):
    """
    Reweighting: w_i = N / (G * n_g(i)), N samples, G groups, n_g(i) the size of sample i's group.
    Every group then carries the same total weight N / G, and the weights average to exactly 1.
    Returns a float tensor (N,).
    """
    raise NotImplementedError("write inverse_frequency_weights")


def balanced_probabilities(groups):
    """
    Resampling: the probability of drawing sample i, p_i proportional to 1 / n_g(i), normalised to
    sum to 1, so that every group is drawn with probability 1 / G. Returns a float tensor (N,).
    """
    raise NotImplementedError("write balanced_probabilities")
