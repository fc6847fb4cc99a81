"""The project's own code, behind each exercise's interface.

Every exercise asks for a small pure function (or, for the KV cache, a small class). Where the
project has exactly that function, it is used as is (`club`, `es_metric`, ...). Where the project's
code is a method of a module (RMSNorm, the attention layer, LoRALinear), the adapter below builds
that module with the given weights and calls it, so the checker compares a student's function with
the very code the model runs.

`python exercises/check.py --reference all` runs every check on this file; it must pass.
"""

import torch
import torch.nn as nn

import data
import fairness
import generate
import metrics
import model
from lora import LoRALinear

# -----------------------------------------------------------------------------
# warm-up


def rmsnorm(x, weight, eps=1e-5):
    norm = model.RMSNorm(weight.shape[0], eps)
    norm.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return norm(x)


def patch_embed(pixels, weight, bias):
    C, _, p, _ = weight.shape
    embed = model.PatchEmbed(model.VisionConfig(image_size=pixels.shape[-1], patch_size=p, width=C))
    with torch.no_grad():
        embed.proj.weight.copy_(weight)
        embed.proj.bias.copy_(bias)
        return embed(pixels)


inverse_frequency_weights = data.inverse_frequency_weights


def balanced_probabilities(groups):
    p = data.GroupBalancedSampler(groups).p  # unnormalised 1 / n_g(i); torch.multinomial normalises
    return p / p.sum()


es_metric = metrics.es_metric

# -----------------------------------------------------------------------------
# core


def rope(x, position_ids, theta=10000.0):
    cos, sin = model.rope_cos_sin(position_ids, x.shape[-1], theta, x.dtype)
    return model.apply_rope(x, cos, sin)


attention_mask_4d = model.attention_mask_4d


def attention(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask=None):
    cfg = model.LlamaConfig.tiny(hidden_size=x.shape[-1], num_attention_heads=n_head, num_key_value_heads=n_kv)
    attn = model.Attention(cfg)
    with torch.no_grad():
        for lin, w in ((attn.q_proj, wq), (attn.k_proj, wk), (attn.v_proj, wv), (attn.o_proj, wo)):
            lin.weight.copy_(w)
        return attn(x, cos, sin, mask)


KVCache = generate.KVCache


def _lora_layer(weight, bias, lora_A, lora_B, alpha):
    out_f, in_f = weight.shape
    base = nn.Linear(in_f, out_f, bias=bias is not None)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
    layer = LoRALinear(base, r=lora_A.shape[0], alpha=alpha)
    with torch.no_grad():
        layer.lora_A.weight.copy_(lora_A)
        layer.lora_B.weight.copy_(lora_B)
    return layer


def lora_init(r, in_features, out_features):
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=False), r=r, alpha=float(r))
    return layer.lora_A.weight.detach(), layer.lora_B.weight.detach()


def lora_forward(x, weight, bias, lora_A, lora_B, alpha):
    with torch.no_grad():
        return _lora_layer(weight, bias, lora_A, lora_B, alpha)(x)


def lora_merge(weight, lora_A, lora_B, alpha):
    layer = _lora_layer(weight, None, lora_A, lora_B, alpha)
    layer.merge()
    return layer.weight.detach().clone()


corpus_bleu = metrics.corpus_bleu


def count_targets(labels):
    return model.supervised_weight(labels)


def micro_batch_loss(logits, labels, step_targets, world_size):
    # as train.micro_step: the step's token-sum divided by the step's token count, times the world
    # size because DDP averages gradients over ranks
    return model.lm_loss(logits, labels, normalizer=step_targets) * world_size


# -----------------------------------------------------------------------------
# the paper


def pool_hidden(hidden, mask, layer="mid"):
    return fairness.pool_hidden(hidden, mask, layer)[0]


club = fairness.club


def alternating_step(reg, h, attrs, dac_optimizer):
    return reg.alternating_step(h, attrs, dac_optimizer)[0]
