"""The exercise checker (exercises/check.py) is fair: for every exercise in EXERCISES.md,
the project's own code passes, an independent from-scratch solution passes, the provided template
and an empty body fail, plausible wrong solutions fail for the reason they are wrong, and a solution
file that imports or calls the project's code for its exercise is refused before it runs."""

import inspect
import math
import os
import re
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from exercises import check
from exercises.check import EXERCISES, TEMPLATES, ExerciseFailed
from fairness import dac_loss, dim_penalty
from metrics import tokenize_13a
from model import apply_rope

ROOT = TEMPLATES.parent.parent


# -----------------------------------------------------------------------------
# from-scratch solutions, written from the templates' docstrings (not calling the project's code,
# except the helpers a template allows: apply_rope, tokenize_13a, fairness.dac_loss / dim_penalty)


def rmsnorm(x, weight, eps=1e-5):
    xf = x.float()
    return weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def patch_embed(pixels, weight, bias, order=(0, 2, 4, 1, 3, 5)):
    B, c_in, S, _ = pixels.shape
    C, _, p, _ = weight.shape
    g = S // p
    patches = pixels.reshape(B, c_in, g, p, g, p).permute(*order).reshape(B, g * g, c_in * p * p)
    return patches @ weight.reshape(C, -1).T + bias


def inverse_frequency_weights(groups):
    counts = Counter(groups)
    return torch.tensor([len(groups) / (len(counts) * counts[k]) for k in groups])


def balanced_probabilities(groups):
    counts = Counter(groups)
    p = torch.tensor([1.0 / counts[k] for k in groups], dtype=torch.float64)
    return p / p.sum()


def es_metric(m_all, group_scores):
    scores = list(group_scores.values()) if isinstance(group_scores, dict) else list(group_scores)
    if len(scores) < 2:
        raise ValueError("need two groups")
    gap = max(scores) - min(scores)
    return {"gap": gap, "es": m_all / (1 + gap)}


def rope(x, position_ids, theta=10000.0):
    d = x.shape[-1]
    inv_freq = theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    angle = position_ids.double()[..., None] * inv_freq  # (B, T, d/2)
    cos, sin = angle.cos()[:, None].to(x.dtype), angle.sin()[:, None].to(x.dtype)  # (B, 1, T, d/2)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention_mask_4d(attention_mask, past, T):
    q = torch.arange(past, past + T)[:, None]
    k = torch.arange(attention_mask.shape[1])[None]
    mask = (k <= q)[None] & attention_mask.bool()[:, None, :]
    return (mask | (k == q)[None])[:, None]


def attention(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask=None):
    B, T, _ = x.shape
    d = wq.shape[0] // n_head
    q = (x @ wq.T).view(B, T, n_head, d).transpose(1, 2)
    k = (x @ wk.T).view(B, T, n_kv, d).transpose(1, 2)
    v = (x @ wv.T).view(B, T, n_kv, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool).tril()
    y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, -1) @ wo.T


class KVCache:
    def __init__(self, cfg, batch_size, max_length, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_length, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length, self.max_length = 0, max_length

    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"cache full: {end} > {self.max_length}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def lora_init(r, in_features, out_features):
    A = torch.empty(r, in_features)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, torch.zeros(out_features, r)


def lora_forward(x, weight, bias, lora_A, lora_B, alpha):
    return F.linear(x, weight, bias) + (alpha / lora_A.shape[0]) * (x @ lora_A.T @ lora_B.T)


def lora_merge(weight, lora_A, lora_B, alpha):
    return weight + (alpha / lora_A.shape[0]) * (lora_B @ lora_A)


def _bleu_counts(hyp, ref, max_order, clip=True):
    h, r = tokenize_13a(hyp), tokenize_13a(ref)
    matches, totals = [], []
    for n in range(1, max_order + 1):
        hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        matches.append(sum(min(c, rc[g]) if clip else (c if g in rc else 0) for g, c in hc.items()))
        totals.append(max(len(h) - n + 1, 0))
    return len(h), len(r), matches, totals


def _bleu_score(c, r, matches, totals, max_order, brevity=True):
    if c == 0 or matches[0] == 0:
        return 0.0
    logs, k = [], 0
    for m, t in zip(matches, totals):
        if t == 0:
            return 0.0
        if m == 0:
            k += 1
            logs.append(math.log(1 / (2 ** k * t)))
        else:
            logs.append(math.log(m / t))
    bp = 1.0 if (c >= r or not brevity) else math.exp(1 - r / c)
    return 100 * bp * math.exp(sum(logs) / max_order)


def corpus_bleu(hyps, refs, max_order=4, clip=True, brevity=True):
    c = r = 0
    matches, totals = [0] * max_order, [0] * max_order
    for hyp, ref in zip(hyps, refs):
        hl, rl, m, t = _bleu_counts(hyp, ref, max_order, clip)
        c, r = c + hl, r + rl
        matches = [a + b for a, b in zip(matches, m)]
        totals = [a + b for a, b in zip(totals, t)]
    return _bleu_score(c, r, matches, totals, max_order, brevity)


def count_targets(labels):
    return (labels[:, 1:] != -100).sum()


def micro_batch_loss(logits, labels, step_targets, world_size):
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=-100, reduction="sum")
    return summed / step_targets * world_size


def pool_hidden(hidden, mask, layer="mid"):
    n = len(hidden)
    if isinstance(layer, int):
        chosen = [hidden[layer]]
    else:
        chosen = [hidden[i] for i in {"first": [1], "mid": [int(0.5 * n)], "last": [n - 1],
                                      "mean": [1, int(0.5 * n), n - 1]}[layer]]
    m = mask.float()[..., None]  # (B, T, 1)
    return torch.stack([(x.float() * m).sum(1) / m.sum(1).clamp_min(1) for x in chosen]).mean(0)


def club(logits, labels, negatives="off_diagonal"):
    keep = labels >= 0
    n = int(keep.sum())
    if n < 2:
        return logits.sum() * 0.0
    log_q, y = F.log_softmax(logits[keep].float(), dim=-1), labels[keep]
    mat = log_q[:, y]  # mat[i, j] = log q(a_j | h_i)
    positive = mat.diagonal().mean()
    if negatives == "all":
        return positive - mat.mean()
    return positive - (mat.sum() - mat.diagonal().sum()) / (n * (n - 1))


def alternating_step(reg, h, attrs, dac_optimizer, detach=True, freeze=True, dim_first=False, lambda1=True,
                     zero_grad=True):
    cfg = reg.cfg

    def dim():
        for p in reg.parameters():  # phi frozen while the DIM graph is built
            p.requires_grad_(not freeze)
        logits = reg.dac(h)
        for p in reg.parameters():
            p.requires_grad_(True)
        return sum(cfg.lambdas[a] * dim_penalty(club(logits[a], attrs[a], cfg.negatives), cfg.smooth_abs,
                                                cfg.smooth_eps) for a in cfg.attributes)

    early = dim() if dim_first else None
    if zero_grad:
        dac_optimizer.zero_grad(set_to_none=True)
    logits = reg.dac(h.detach() if detach else h)
    l_dac = sum(dac_loss(logits[a], attrs[a]) for a in cfg.attributes)
    ((cfg.dac_weight if lambda1 else 1.0) * l_dac).backward(retain_graph=not detach)
    dac_optimizer.step()
    return early if dim_first else dim()


SOLUTIONS = {
    "rmsnorm": dict(rmsnorm=rmsnorm),
    "patch_embed": dict(patch_embed=patch_embed),
    "reweighting": dict(inverse_frequency_weights=inverse_frequency_weights,
                        balanced_probabilities=balanced_probabilities),
    "es_metric": dict(es_metric=es_metric),
    "rope": dict(rope=rope),
    "causal_mask": dict(attention_mask_4d=attention_mask_4d),
    "gqa_attention": dict(attention=attention),
    "kv_cache": dict(KVCache=KVCache),
    "lora": dict(lora_init=lora_init, lora_forward=lora_forward, lora_merge=lora_merge),
    "bleu": dict(corpus_bleu=corpus_bleu),
    "grad_accumulation": dict(count_targets=count_targets, micro_batch_loss=micro_batch_loss),
    "pooling": dict(pool_hidden=pool_hidden),
    "club": dict(club=club),
    "alternating_step": dict(alternating_step=alternating_step),
}


def solution(name, **overrides):
    return SimpleNamespace(**{**SOLUTIONS[name], **overrides})


# -----------------------------------------------------------------------------
# plausible wrong solutions: (exercise, what is wrong, the solution, a regex the failure must match)


def _rms_no_eps(x, weight, eps=1e-5):
    xf = x.float()
    return weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True))).to(x.dtype)


def _rms_eps_outside(x, weight, eps=1e-5):
    xf = x.float()
    return weight * (xf / (torch.sqrt(xf.pow(2).mean(-1, keepdim=True)) + eps)).to(x.dtype)


def _rms_input_dtype(x, weight, eps=1e-5):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_wrong_axis(x, weight, eps=1e-5):
    xf = x.float()
    return weight * (xf / torch.sqrt(xf.pow(2).mean(0, keepdim=True) + eps)).to(x.dtype)


def _rope_interleaved(x, position_ids, theta=10000.0):
    d = x.shape[-1]
    inv_freq = theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    angle = position_ids.double()[..., None] * inv_freq
    cos, sin = angle.cos()[:, None].to(x.dtype), angle.sin()[:, None].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i+1): the original RoFormer layout, not HF's
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def _rope_wrong_frequencies(x, position_ids, theta=10000.0):
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(d // 2, dtype=torch.float64) / d)  # forgot the 2 in 2i/d
    angle = position_ids.double()[..., None] * inv_freq
    cos, sin = angle.cos()[:, None].to(x.dtype), angle.sin()[:, None].to(x.dtype)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rope_ignores_positions(x, position_ids, theta=10000.0):
    return rope(x, torch.arange(x.shape[2]).expand(x.shape[0], -1), theta)


def _mask_sees_next(attention_mask, past, T):
    q, k = torch.arange(past, past + T)[:, None], torch.arange(attention_mask.shape[1])[None]
    causal = k <= q + 1  # off by one: each query also sees the next token
    return ((causal[None] & attention_mask.bool()[:, None, :]) | (k == q)[None])[:, None]


def _mask_ignores_past(attention_mask, past, T):
    q, k = torch.arange(T)[:, None], torch.arange(attention_mask.shape[1])[None]
    return (((k <= q)[None] & attention_mask.bool()[:, None, :]) | (k == q)[None])[:, None]


def _mask_no_self(attention_mask, past, T):
    q, k = torch.arange(past, past + T)[:, None], torch.arange(attention_mask.shape[1])[None]
    return ((k <= q)[None] & attention_mask.bool()[:, None, :])[:, None]


def _attention_tiled(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask=None):
    B, T, _ = x.shape
    d = wq.shape[0] // n_head
    q = apply_rope((x @ wq.T).view(B, T, n_head, d).transpose(1, 2), cos, sin)
    k = apply_rope((x @ wk.T).view(B, T, n_kv, d).transpose(1, 2), cos, sin)
    v = (x @ wv.T).view(B, T, n_kv, d).transpose(1, 2)
    k, v = k.repeat(1, n_head // n_kv, 1, 1), v.repeat(1, n_head // n_kv, 1, 1)  # head h -> kv h % n_kv
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    mask = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask
    y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, -1) @ wo.T


def _attention_no_repeat(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask=None):
    B, T, _ = x.shape
    d = wq.shape[0] // n_head
    q = apply_rope((x @ wq.T).view(B, T, n_head, d).transpose(1, 2), cos, sin)
    k = apply_rope((x @ wk.T).view(B, T, n_kv, d).transpose(1, 2), cos, sin)
    v = (x @ wv.T).view(B, T, n_kv, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # kv heads never repeated
    mask = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask
    y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, -1) @ wo.T


def _attention_unscaled(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask=None):
    d = wq.shape[0] // n_head
    return attention(x, wq * math.sqrt(d), wk, wv, wo, n_head, n_kv, cos, sin, mask)  # no 1/sqrt(d)


def _attention_not_causal(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask=None):
    full = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool)
    return attention(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, full if mask is None else mask)


class _CacheAdvances(KVCache):
    def update(self, layer, k, v):
        out = super().update(layer, k, v)
        self.length += k.shape[2]  # every layer advances it: the model's own += comes on top
        return out


class _CacheOffByOne(KVCache):
    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError("full")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :self.length], self.v[layer][:, :, :self.length]  # forgot the new tokens


class _CacheNoOverflowCheck(KVCache):
    def update(self, layer, k, v):
        end = min(self.length + k.shape[2], self.max_length)
        self.k[layer][:, :, self.length:end] = k[:, :, :end - self.length]  # silently drops tokens
        self.v[layer][:, :, self.length:end] = v[:, :, :end - self.length]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _lora_init_both_random(r, in_features, out_features):
    A, _ = lora_init(r, in_features, out_features)
    B = torch.empty(out_features, r)
    torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    return A, B


def _merge_in_place(weight, lora_A, lora_B, alpha):
    weight += (alpha / lora_A.shape[0]) * (lora_B @ lora_A)
    return weight


def _mean_of_sentence_bleu(hyps, refs, max_order=4):
    return sum(corpus_bleu([h], [r], max_order) for h, r in zip(hyps, refs)) / len(hyps)


def _bleu_sentence_brevity(hyps, refs, max_order=4):
    # corpus counts, but the brevity penalty averaged over sentences
    stats = [_bleu_counts(h, r, max_order) for h, r in zip(hyps, refs)]
    matches = [sum(s[2][n] for s in stats) for n in range(max_order)]
    totals = [sum(s[3][n] for s in stats) for n in range(max_order)]
    c = sum(s[0] for s in stats)
    score = _bleu_score(c, c, matches, totals, max_order)  # r = c: no corpus-level penalty
    bps = [1.0 if h >= r else (math.exp(1 - r / h) if h else 0.0) for h, r, *_ in stats]
    return score * sum(bps) / len(bps)


def _count_with_first(labels):
    return (labels != -100).sum()


def _micro_mean(logits, labels, step_targets, world_size):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)  # this micro-batch's mean: the mean of means is not the mean


def _micro_no_world(logits, labels, step_targets, world_size):
    return micro_batch_loss(logits, labels, step_targets, 1)


def _pool_first_is_embeddings(hidden, mask, layer="mid"):
    return pool_hidden(hidden, mask, 0 if layer == "first" else layer)


def _pool_mid_by_layer_count(hidden, mask, layer="mid"):
    return pool_hidden(hidden, mask, (len(hidden) - 1) // 2 if layer == "mid" else layer)


def _pool_unmasked(hidden, mask, layer="mid"):
    return pool_hidden(hidden, torch.ones_like(mask), layer)


def _pool_in_input_dtype(hidden, mask, layer="mid"):
    h = pool_hidden(hidden, mask, layer)
    return h.to(hidden[0].dtype)


def _club_with_diagonal(logits, labels, negatives="off_diagonal"):
    return club(logits, labels, "all")


def _club_keeps_unknown(logits, labels, negatives="off_diagonal"):
    return club(logits, labels.clamp(min=0), negatives)  # -1 silently read as class 0


def _club_over_n_squared(logits, labels, negatives="off_diagonal"):
    keep = labels >= 0
    n = int(keep.sum())
    if n < 2:
        return logits.sum() * 0.0
    mat = F.log_softmax(logits[keep], -1)[:, labels[keep]]
    off = mat.sum() - (mat.diagonal().sum() if negatives == "off_diagonal" else 0.0)
    return mat.diagonal().mean() - off / (n * n)  # the N(N-1) pairs i != j divided by N^2


def _club_negative_index(logits, labels, negatives="off_diagonal"):
    n = len(labels)
    mat = F.log_softmax(logits, -1)[:, labels]  # label -1 indexes the last column: unknown read as class K-1
    off = mat.sum() - (mat.diagonal().sum() if negatives == "off_diagonal" else 0.0)
    return mat.diagonal().mean() - off / (n * (n - 1) if negatives == "off_diagonal" else n * n)


# the check's message for each CLUB mistake (a regex)
CLUB_MESSAGES = {
    "diagonal": r"mean over the pairs i != j, their sum divided by N\(N-1\); yours divides the sum over all pairs "
                r"i, j \(the diagonal i = j included\) by N\^2",
    "N^2": r"mean over the pairs i != j, their sum divided by N\(N-1\); yours divides the sum over the pairs "
           r"i != j by N\^2",
    "-1 as 0": r"label -1 means unknown: leave those samples out of every pair; yours reads -1 as class 0",
    "-1 as K-1": r"yours reads -1 as class K-1 = 2",
    "q": r"log_mat\[i, j\] is the log-probability log q\(a_j \| h_i\) \(log_softmax\), not the probability q",
}


def _club_probabilities(logits, labels, negatives="off_diagonal"):
    keep = labels >= 0
    n = int(keep.sum())
    if n < 2:
        return logits.sum() * 0.0
    mat = logits[keep].softmax(-1)[:, labels[keep]]  # q(a_j | h_i) where log q(a_j | h_i) is meant
    return mat.diagonal().mean() - (mat.sum() - mat.diagonal().sum()) / (n * (n - 1))


def _es_mad(m_all, group_scores):
    scores = list(group_scores.values()) if isinstance(group_scores, dict) else list(group_scores)
    if len(scores) < 2:
        raise ValueError("need two groups")
    mean = sum(scores) / len(scores)
    gap = sum(abs(s - mean) for s in scores) / len(scores)  # mean absolute deviation, not max - min
    return {"gap": gap, "es": m_all / (1 + gap)}


def _es_no_one(m_all, group_scores):
    out = es_metric(m_all, group_scores)
    return {"gap": out["gap"], "es": m_all / out["gap"] if out["gap"] else m_all}


def _es_no_error(m_all, group_scores):
    scores = list(group_scores.values()) if isinstance(group_scores, dict) else list(group_scores)
    gap = max(scores) - min(scores)
    return {"gap": gap, "es": m_all / (1 + gap)}


WRONG = [
    ("rmsnorm", "no eps", dict(rmsnorm=_rms_no_eps), "eps"),
    ("rmsnorm", "eps outside the square root", dict(rmsnorm=_rms_eps_outside), "inside the square root"),
    ("rmsnorm", "computed in the input dtype", dict(rmsnorm=_rms_input_dtype), "float16|float32"),
    ("rmsnorm", "normalised over the wrong axis", dict(rmsnorm=_rms_wrong_axis), "last dimension"),
    ("patch_embed", "column-major token order",
     dict(patch_embed=lambda p, w, b: patch_embed(p, w, b, (0, 4, 2, 1, 3, 5))), "row-major"),
    ("patch_embed", "patch flattened as (row, column, channel)",
     dict(patch_embed=lambda p, w, b: patch_embed(p, w, b, (0, 2, 4, 3, 5, 1))), "channel, row, column"),
    ("reweighting", "weights 1/n_g, not normalised", dict(inverse_frequency_weights=lambda g: 1.0 / torch.tensor(
        [Counter(g)[k] for k in g], dtype=torch.float32)), "N / \\(G \\* n_g"),
    ("reweighting", "resampling with the data's own frequencies", dict(balanced_probabilities=lambda g: torch.full(
        (len(g),), 1.0 / len(g), dtype=torch.float64)), "1 / n_g"),
    ("es_metric", "mean absolute deviation instead of max - min", dict(es_metric=_es_mad), "max_g M_g - min_g M_g"),
    ("es_metric", "M_all / gap, without the 1 +", dict(es_metric=_es_no_one), "1 \\+ gap"),
    ("es_metric", "no error for a single group", dict(es_metric=_es_no_error), "two groups"),
    ("rope", "interleaved pairs (2i, 2i+1)", dict(rope=_rope_interleaved), "neighbour"),
    ("rope", "theta^(-i/d) frequencies", dict(rope=_rope_wrong_frequencies), "inv_freq"),
    ("rope", "positions 0..T-1 instead of position_ids", dict(rope=_rope_ignores_positions), "position_ids"),
    ("causal_mask", "a query also sees the next token (off by one)", dict(attention_mask_4d=_mask_sees_next), "past \\+ t"),
    ("causal_mask", "ignores the cached tokens", dict(attention_mask_4d=_mask_ignores_past), "cached"),
    ("causal_mask", "padding queries see nothing (NaN rows)", dict(attention_mask_4d=_mask_no_self), "NaN"),
    ("gqa_attention", "kv heads tiled (repeat) instead of repeat_interleave", dict(attention=_attention_tiled),
     "repeat_interleave"),
    ("gqa_attention", "kv heads not repeated at all", dict(attention=_attention_no_repeat), "raised RuntimeError"),
    ("gqa_attention", "scores not scaled by 1/sqrt(d)", dict(attention=_attention_unscaled), "explicit causal mask"),
    ("gqa_attention", "mask=None attends to the future", dict(attention=_attention_not_causal), "mask=None: plain causal"),
    ("kv_cache", "update() advances length", dict(KVCache=_CacheAdvances), "must not advance"),
    ("kv_cache", "update() returns the keys without the new ones", dict(KVCache=_CacheOffByOne), "return"),
    ("kv_cache", "no overflow check", dict(KVCache=_CacheNoOverflowCheck), "ValueError"),
    ("lora", "scaled by alpha instead of alpha / r",
     dict(lora_forward=lambda x, w, b, A, B, alpha: lora_forward(x, w, b, A, B, alpha * A.shape[0])), "alpha / r"),
    ("lora", "B initialised at random", dict(lora_init=_lora_init_both_random), "B must start at zero"),
    ("lora", "merge changes W in place", dict(lora_merge=_merge_in_place), "in place"),
    ("lora", "merge without the scaling", dict(lora_merge=lambda w, A, B, alpha: w + B @ A), "alpha / r"),
    ("bleu", "no brevity penalty", dict(corpus_bleu=lambda h, r, n=4: corpus_bleu(h, r, n, brevity=False)),
     "brevity"),
    ("bleu", "unclipped n-gram counts", dict(corpus_bleu=lambda h, r, n=4: corpus_bleu(h, r, n, clip=False)),
     "clipped"),
    ("bleu", "brevity penalty per sentence", dict(corpus_bleu=_bleu_sentence_brevity), "corpus lengths"),
    ("bleu", "the mean of sentence BLEU", dict(corpus_bleu=_mean_of_sentence_bleu), "BLEU-"),
    ("grad_accumulation", "counts position 0 as a target", dict(count_targets=_count_with_first), "position 0"),
    ("grad_accumulation", "each micro-batch's own mean", dict(micro_batch_loss=_micro_mean), "step_targets"),
    ("grad_accumulation", "forgets that DDP averages over ranks", dict(micro_batch_loss=_micro_no_world),
     "world_size"),
    ("pooling", "first = the embedding output", dict(pool_hidden=_pool_first_is_embeddings), "hidden\\[1\\]"),
    ("pooling", "mid = n_layers // 2", dict(pool_hidden=_pool_mid_by_layer_count), "int\\(0.5"),
    ("pooling", "mean over every token, padding included", dict(pool_hidden=_pool_unmasked), "masked mean"),
    ("pooling", "returned in bfloat16", dict(pool_hidden=_pool_in_input_dtype), "float32"),
    ("club", "negatives include the diagonal", dict(club=_club_with_diagonal), CLUB_MESSAGES["diagonal"]),
    ("club", "negatives over N^2 instead of N(N-1)", dict(club=_club_over_n_squared), CLUB_MESSAGES["N^2"]),
    ("club", "unknown labels (-1) read as class 0", dict(club=_club_keeps_unknown), CLUB_MESSAGES["-1 as 0"]),
    ("club", "unknown labels (-1) read as the last class", dict(club=_club_negative_index),
     CLUB_MESSAGES["-1 as K-1"]),
    ("club", "probabilities q instead of log q", dict(club=_club_probabilities), CLUB_MESSAGES["q"]),
    ("alternating_step", "L_DAC reaches the backbone (no stop-gradient)",
     dict(alternating_step=lambda *a: alternating_step(*a, detach=False)), "sg\\(h\\)"),
    ("alternating_step", "phi not frozen in L_DIM",
     dict(alternating_step=lambda *a: alternating_step(*a, freeze=False)), "frozen"),
    ("alternating_step", "L_DIM with phi before its update",
     dict(alternating_step=lambda *a: alternating_step(*a, dim_first=True)), "just updated"),
    ("alternating_step", "lambda1 left out", dict(alternating_step=lambda *a: alternating_step(*a, lambda1=False)),
     "lambda1"),
    ("alternating_step", "phi's gradients never zeroed",
     dict(alternating_step=lambda *a: alternating_step(*a, zero_grad=False)), "step 2"),
]


# -----------------------------------------------------------------------------
# the tests


def test_every_exercise_has_a_template_and_a_solution_here():
    assert len(EXERCISES) >= 10
    assert {p.stem for p in TEMPLATES.glob("*.py")} == set(EXERCISES) == set(SOLUTIONS)
    assert {name for name, *_ in WRONG} == set(EXERCISES)
    assert {e.level for e in EXERCISES.values()} == {"warm-up", "core", "paper"}


@pytest.mark.parametrize("name", list(EXERCISES))
def test_project_code_passes(name):
    check.run(name, check.reference())


@pytest.mark.parametrize("name", list(EXERCISES))
def test_from_scratch_solution_passes(name):
    check.run(name, solution(name))


@pytest.mark.parametrize("name", list(EXERCISES))
def test_template_fails(name):
    with pytest.raises(ExerciseFailed, match="not written yet"):
        check.run(name, check.load_solution(TEMPLATES / f"{name}.py", name))


class _EmptyCache:
    def __init__(self, *args, **kwargs):
        self.length = 0

    def update(self, layer, k, v):
        pass


@pytest.mark.parametrize("name", list(EXERCISES))
def test_empty_body_fails(name):
    empty = {n: (_EmptyCache if n == "KVCache" else (lambda *a, **k: None)) for n in EXERCISES[name].names}
    with pytest.raises(ExerciseFailed):
        check.run(name, SimpleNamespace(**empty))


@pytest.mark.parametrize("name, label, overrides, reason", WRONG, ids=[f"{n}: {w}" for n, w, *_ in WRONG])
def test_wrong_solution_fails_for_its_reason(name, label, overrides, reason):
    with pytest.raises(ExerciseFailed, match=reason):
        check.run(name, solution(name, **overrides))


def test_missing_function_is_named():
    with pytest.raises(ExerciseFailed, match="defines no lora_merge"):
        check.run("lora", SimpleNamespace(lora_init=lora_init, lora_forward=lora_forward))


def test_command_line(tmp_path, capsys):
    # the documented command: a student's file passes, a wrong one fails with exit code 1
    good = tmp_path / "my_es_metric.py"
    good.write_text("def es_metric(m_all, group_scores):\n"
                    "    s = list(group_scores.values()) if isinstance(group_scores, dict) else list(group_scores)\n"
                    "    if len(s) < 2:\n        raise ValueError('two groups')\n"
                    "    return {'gap': max(s) - min(s), 'es': m_all / (1 + max(s) - min(s))}\n")
    bad = tmp_path / "bad_es_metric.py"
    bad.write_text(good.read_text().replace("1 + max(s) - min(s)", "max(s) - min(s) + 1e-9"))
    assert check.main(["es_metric", str(good)]) == 0
    assert check.main(["es_metric", str(bad)]) == 1
    assert check.main(["--reference", "all"]) == 0
    out = capsys.readouterr().out
    assert "PASS  es_metric" in out and "FAIL  es_metric" in out and out.count("PASS") == 1 + len(EXERCISES)
    # and as a script, on an untouched template (what a student sees first)
    r = subprocess.run([sys.executable, str(ROOT / "exercises" / "check.py"), "rope", str(TEMPLATES / "rope.py")],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "FAIL  rope: not written yet" in r.stdout, r.stdout + r.stderr


def test_exercises_md_gives_each_check_command():
    text = (ROOT / "EXERCISES.md").read_text()
    for name in EXERCISES:
        assert f"python exercises/check.py {name} " in text, name


@pytest.mark.parametrize("mistake, wrong", [("diagonal", _club_with_diagonal), ("N^2", _club_over_n_squared),
                                            ("-1 as 0", _club_keeps_unknown), ("-1 as K-1", _club_negative_index),
                                            ("q", _club_probabilities)])
def test_club_names_one_mistake_in_one_message(mistake, wrong):
    with pytest.raises(ExerciseFailed) as e:
        check.run("club", solution("club", club=wrong))
    bullets = [line for line in str(e.value).splitlines() if line.startswith("  - ")]
    assert len(bullets) == 1 and re.search(CLUB_MESSAGES[mistake], bullets[0]), str(e.value)


def test_club_names_two_mistakes_in_two_messages():
    with pytest.raises(ExerciseFailed) as e:
        check.run("club", solution("club", club=lambda x, y, n="off_diagonal":
                                   _club_probabilities(x, y.clamp(min=0), n)))  # -1 read as 0, and q for log q
    bullets = [line for line in str(e.value).splitlines() if line.startswith("  - ")]
    assert len(bullets) == 2, str(e.value)
    assert re.search(CLUB_MESSAGES["-1 as 0"], bullets[0]) and re.search(CLUB_MESSAGES["q"], bullets[1]), str(e.value)


# -----------------------------------------------------------------------------
# a solution file that uses the code it is checked against is refused, naming the line


CHEATS = [  # (exercise, the file's body, what the refusal must name)
    ("alternating_step", "def alternating_step(reg, h, attrs, dac_optimizer):\n"
                         "    return reg.alternating_step(h, attrs, dac_optimizer)[0]\n",
     "line 2: uses reg.alternating_step"),
    ("alternating_step", "def alternating_step(reg, h, attrs, dac_optimizer):\n"
                         "    return reg(h, attrs, dac_optimizer)[0]\n", "line 2: calls reg(...)"),
    ("alternating_step", "from fairness import club, FairnessRegularizer\n",
     "line 1: imports fairness.FairnessRegularizer"),
    ("alternating_step", "def alternating_step(reg, h, attrs, dac_optimizer):\n"
                         "    logits = reg.frozen_logits(h)\n", "line 2: uses reg.frozen_logits"),
    ("club", "from exercises.reference import club\n", "line 1: imports exercises.reference.club"),
    ("club", "from exercises import reference\nclub = reference.club\n", "line 1: imports exercises.reference"),
    ("club", "import fairness\n\n\ndef club(logits, labels, negatives='off_diagonal'):\n"
             "    return fairness.club(logits, labels, negatives)\n", "line 1: imports fairness"),
    ("club", "import importlib\nclub = importlib.import_module('fairness').club\n",
     "line 2: imports fairness (through importlib.import_module)"),
    ("es_metric", "from metrics import es_metric as mine\n", "line 1: imports metrics.es_metric"),
    ("rope", "import reference\n", "line 1: imports reference"),
    ("gqa_attention", "import model as m\nattention = m.Attention\n", "line 2: uses m.Attention (model.Attention)"),
    ("gqa_attention", "import torch.nn.functional as F\ny = F.scaled_dot_product_attention\n",
     "line 2: uses F.scaled_dot_product_attention"),
    ("patch_embed", "from torch.nn.functional import conv2d\n", "line 1: imports torch.nn.functional.conv2d"),
    ("lora", "from lora import LoRALinear\n", "line 1: imports lora.LoRALinear"),
    ("kv_cache", "import generate\nKVCache = generate.KVCache\n", "line 1: imports generate"),
    ("bleu", "import sacrebleu\n", "line 1: imports sacrebleu"),
]


@pytest.mark.parametrize("name, body, named", CHEATS, ids=[c[2] for c in CHEATS])
def test_a_solution_using_the_projects_code_is_refused(tmp_path, capsys, name, body, named):
    path = tmp_path / f"{name}.py"
    path.write_text(body + "raise SystemExit('the file ran: it must be refused before it runs')\n")
    assert check.main([name, str(path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {name}: {path} uses code that does this exercise for you:\n" in out, out
    assert f"\n  {named}\n" in out, out
    assert "Write it yourself. From the project, this exercise allows" in out, out


# the from-scratch solutions above as a student's file: the allowed imports, then their source
FILE_HEADER = "import math\nfrom collections import Counter\n\nimport torch\nimport torch.nn.functional as F\n"
FILE_IMPORTS = {"gqa_attention": "from model import apply_rope\n", "bleu": "from metrics import tokenize_13a\n",
                "alternating_step": "from fairness import dac_loss, dim_penalty\n"}
FILE_HELPERS = {"bleu": (_bleu_counts, _bleu_score), "alternating_step": (club,)}


@pytest.mark.parametrize("name", list(EXERCISES))
def test_a_correct_solution_file_passes_the_screen_and_the_check(tmp_path, capsys, name):
    parts = [*FILE_HELPERS.get(name, ()), *SOLUTIONS[name].values()]
    source = FILE_HEADER + FILE_IMPORTS.get(name, "") + "\n\n" + "\n\n".join(inspect.getsource(p) for p in parts)
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    assert check.main([name, str(path)]) == 0, capsys.readouterr().out
    assert check.forbidden_uses(name, (TEMPLATES / f"{name}.py").read_text()) == []  # the template's imports
