"""Exercise 14 (paper): the alternating DAC / DIM step (Algorithm 1).

Read: the paper's "Loss & Training" (alternating protocol) and "Demographic Attribute Classifier";
fairness.py's docstring, `dac_loss`, `FairnessRegularizer.dac_loss`, `frozen_logits`, `dim_loss`,
`alternating_step`; train.py `micro_step` (what the caller does with the result);
tests/test_fairness.py (the stop-gradient tests).
Write: `alternating_step` below. You may use reg.dac (phi: a dict of heads, one per attribute),
reg.cfg (attributes, lambdas, dac_weight, negatives, smooth_abs, smooth_eps) and the pure functions
fairness.dac_loss / club / dim_penalty (or your own club from exercise 13). Not reg's own methods
(reg.dac_loss, reg.frozen_logits, reg.dim_loss, reg.alternating_step, reg(...), ...): they do the
step, stop-gradients included, and the check refuses them. Read frozen_logits for one way to freeze
phi, then write the freeze yourself.
Check: python exercises/check.py alternating_step path/to/your/alternating_step.py
"""

import torch

from fairness import club, dac_loss, dim_penalty  # noqa: F401


def alternating_step(reg, h, attrs, dac_optimizer):
    """
    h (B, H): the pooled hidden state, still attached to the backbone's graph; attrs {name: (B,) long,
    -1 = unknown}; dac_optimizer: an optimizer over reg.parameters() (phi only).
      (1) one step of dac_optimizer on  lambda1 * sum_a L_DAC^a(phi(sg(h)), a)   (sg = stop-gradient):
          zero phi's gradients, backward, step. Nothing may reach the backbone.
      (2) return L_DIM = sum_a lambda_a * sqrt(CLUB_a^2 + eps), computed with the phi just updated and
          held frozen: its gradient must reach h (and so LoRA + projector) but not phi.
    """
    raise NotImplementedError("write alternating_step")
