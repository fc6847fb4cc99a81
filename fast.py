"""The speed paths, in one place, each beside the plain version it replaces.

Every function here computes what a one-line PyTorch expression computes, only faster or in less
memory; the plain version is named first in each docstring, and tests/test_fast.py checks the two
agree (the model's tests against HF transformers and PEFT also run through these paths). The
model code reads as if it used the plain versions:

- `linear` / `Linear`: plain F.linear / nn.Linear. A few-row product on CPU (decoding) in the
  orientation MKL runs fastest. model.py builds its Llama layers with this `Linear`.
- `linear_cross_entropy`: plain `(F.cross_entropy(F.linear(rows, weight).float(), targets,
  reduction="none") * w).sum()`, chunk by chunk, each chunk's gradient formed while its logits
  exist, so the (N, vocab) logits are never held. model.causal_lm_loss calls it.
- `Dropout`: plain nn.Dropout. The mask from 32 random bits per element, at half the CPU time.
- `lora_linear`: plain `F.linear(x, W, b) + scaling * lora_B(lora_A(dropout(x)))`, with B z
  accumulated into W x in the same GEMM. lora.LoRALinear.forward calls it.

This module imports no other module of the project (model.py and lora.py import it).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Linear layers. Plain version: F.linear / nn.Linear.


def linear(x, weight, bias=None):
    """F.linear, except for a few rows on CPU (decoding: one token per sample), computed as
    (W x^T)^T. The same products and sums; on CPU (MKL) F.linear's kernel for 2-16 rows is up to 3x
    slower than this orientation for the same product (lm_head, 4 rows: 10.4 vs 3.4 ms), and
    decoding a batch is almost nothing but such products (bench/bench_speed.py). That kernel's
    rounding depends on where W starts in memory, so it is used only for 64-byte-aligned weights
    (every tensor torch allocates; assign_checkpoint re-allocates loaded ones that are not): the same
    weights then give the same bits wherever they live."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type != "cpu" or rows > 16 or x.dim() < 2 or \
            (not torch.compiler.is_compiling() and weight.data_ptr() % 64):  # (no addresses while tracing)
        return F.linear(x, weight, bias)
    y = (weight @ x.reshape(rows, x.shape[-1]).T).T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) through `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------------------------
# The LM loss without the logits. Plain version:
#     (F.cross_entropy(F.linear(rows, weight).float(), targets, reduction="none") * w).sum()

LOSS_CHUNK_ELEMENTS = 2 ** 24  # logits per chunk of causal_lm_loss: 64 MiB in fp32 (512 rows at vocabulary 32000)


def linear_cross_entropy(rows, weight, targets, w, chunk_elements=LOSS_CHUNK_ELEMENTS):
    """sum_i w_i CE(rows_i @ weight^T, targets_i) for rows (N, H), weight (V, H), targets (N,),
    w (N,): the plain version above, computed a chunk of rows at a time (chunk_elements logits per
    chunk). With autograd, each chunk's gradient is formed while its logits exist:

        d loss / d logits_i = w_i (softmax(logits_i) - onehot(y_i))

    so what outlives a chunk is the gradient for its rows (and for weight, when it is trained),
    not the logits. The logits are computed in the dtype autocast gives F.linear and the
    cross-entropy in fp32. Differentiable once (no double backward)."""
    chunk = max(1, chunk_elements // weight.shape[0])
    if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(rows, weight, targets, w, chunk)
    return sum((_chunk_loss(rows[s:s + chunk], weight, targets[s:s + chunk], w[s:s + chunk])[0]
                for s in range(0, len(rows), chunk)), torch.zeros((), device=rows.device))


def _chunk_loss(h, weight, targets, w):
    """-> (sum_i w_i CE_i, d that / d logits), for one chunk of rows. One exp per logit: the
    probabilities are exp(z - max) / s, the log-sum-exp is max + log s."""
    z = F.linear(h, weight).float()  # (C, V)
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    top = z.amax(1, keepdim=True)
    z.sub_(top).exp_()  # unnormalised probabilities, in the logits' memory
    s = z.sum(1, keepdim=True)
    loss = ((top + s.log()).squeeze(1) - z_target).mul(w).sum()
    z.mul_(w[:, None] / s)  # w_i softmax_i ...
    z[torch.arange(len(targets), device=z.device), targets] -= w  # ... minus w_i onehot(y_i)
    return loss, z


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, targets, w, chunk):
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), device=rows.device)
        for s in range(0, len(rows), chunk):
            h = rows[s:s + chunk]
            loss, g = _chunk_loss(h, weight, targets[s:s + chunk], w[s:s + chunk])
            total += loss
            if grad_rows is not None:
                grad_rows[s:s + chunk] = g.to(h.dtype) @ weight
            if grad_weight is not None:
                grad_weight += g.t() @ h.float()
            del g  # one chunk's logits alive at a time
        ctx.save_for_backward(grad_rows, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_rows, grad_weight = ctx.saved_tensors
        return (None if grad_rows is None else grad_rows * grad_loss.to(grad_rows.dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype),
                None, None, None)


# ----------------------------------------------------------------------------------------------
# LoRA (lora.py). Plain versions: nn.Dropout, and F.linear(x, W, b) + scaling * B(A(dropout(x))).


class Dropout(nn.Dropout):
    """nn.Dropout whose mask comes from 32 random bits per element compared with p * 2^32 (two
    elements per int64 draw), in place of bernoulli_: the same distribution (keep probability 1 - p
    to within 2^-32; torch.rand's fp32 draws resolve 2^-24) at half the CPU time, which matters
    because each of the seven adapters of a layer draws a mask of its whole input. Masks differ from
    torch's for the same seed: only the distribution is the same."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 1) // 2,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int32)[:n].view(x.shape) >= round(self.p * 2 ** 32) - 2 ** 31
        return x * keep * (1.0 / (1.0 - self.p))


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout):
    """F.linear(x, weight, bias) + scaling * lora_B(lora_A(dropout(x))): the forward pass of
    lora.LoRALinear (lora_A, lora_B: bias-free nn.Linear; dropout: a module), with `linear` for
    the frozen path and, when the dtypes allow, B z accumulated into W x in the same GEMM."""
    shape = (*x.shape[:-1], lora_B.out_features)
    x = x.reshape(-1, lora_A.in_features)
    y = linear(x, weight, bias)  # (N, out)
    # dropout only on the adapter's input: the frozen path sees x untouched. The scaling is
    # applied to the (N, r) product, not to the (N, out) one: r multiplications per row, not out
    z = lora_A(dropout(x).to(lora_A.weight.dtype)) * scaling  # (N, r)
    if z.dtype == y.dtype:  # fp32, or bf16 under autocast: accumulate B z into y in the same GEMM
        return y.addmm_(z, lora_B.weight.t().to(y.dtype)).reshape(shape)
    return (y + lora_B(z).to(y.dtype)).reshape(shape)  # bf16 base without autocast: B z in fp32
