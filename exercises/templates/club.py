"""Exercise 13 (paper): the CLUB estimator, DIM's positive and negative pairs.

Read: the paper's "Demographic Information Minimization" (positive pairs: a sample's hidden state
with its own attribute; negative pairs: hidden states with other samples' attributes); Cheng et al.
2020, "CLUB: A Contrastive Log-ratio Upper Bound of Mutual Information", Sec. 3; fairness.py `club`,
`dim_penalty`, `FairnessRegularizer.dim_loss`.
Write: `club` below. Keep it differentiable (DIM backpropagates through it into h).
Check: python exercises/check.py club path/to/your/club.py
"""

import torch
import torch.nn.functional as F


def club(logits, labels, negatives="off_diagonal"):
    """
    logits (B, K) = phi(h), so q(a | h_i) = softmax(logits_i); labels (B,) with -1 = unknown.
    Over the N samples with a known label, with log_mat[i, j] = log q(a_j | h_i):
        positive = the mean of log_mat[i, i] over the positive pairs, i = 1..N
        negative = the mean of log_mat[i, j] over the negative pairs:
                   every pair with i != j             negatives="off_diagonal" (official code)
                   every pair i, j, i = j included    negatives="all" (original CLUB)
        CLUB = positive - negative
    A sample with label -1 is in no pair. Fewer than 2 known samples: return 0 (as a tensor).
    """
    raise NotImplementedError("write club")
