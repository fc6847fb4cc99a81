"""Exercise 11 (core): the token-normalised loss under DDP and gradient accumulation.

Read: README, "Loss scaling under DDP"; train.py `train` (the n_tok lines) and `micro_step`;
model.py `lm_loss` and `supervised_weight`; tests/test_train.py (accumulation and 2-process DDP give
the gradient of one process on the combined batch).
The setting: W ranks, each runs several micro-batches and calls loss.backward() on each (the
gradients add up); DDP then AVERAGES the gradients over the ranks. Wanted: exactly the gradient of
one process computing lm_loss (the mean over every target token) on all the step's sequences at
once, however many tokens each micro-batch holds.
Write: both functions below. The check adds count_targets over every micro-batch of every rank
(what an all-reduce would do) and passes that sum as step_targets.
Check: python exercises/check.py grad_accumulation path/to/your/grad_accumulation.py
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_targets(labels):
    """
    labels (B, T) with IGNORE_INDEX where no loss is taken -> the number of next-token targets.
    Position t predicts token t + 1, so labels[:, 0] is never a target.
    """
    raise NotImplementedError("write count_targets")


def micro_batch_loss(logits, labels, step_targets, world_size):
    """
    logits (B, T, V), labels (B, T): this micro-batch's share of the step's loss, to be
    backpropagated on this rank. Shift (logits[:, t] predicts labels[:, t + 1]), take the summed
    cross-entropy over the targets, divide by step_targets (the targets of the whole step, all
    ranks), and undo DDP's average over ranks.
    """
    raise NotImplementedError("write micro_batch_loss")
