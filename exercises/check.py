"""Check an exercise solution against the project's own code (see EXERCISES.md).

    python exercises/check.py --list                        # the exercises, in order
    python exercises/check.py rmsnorm my/rmsnorm.py         # check your file: exit 0 = pass, 1 = fail
    python exercises/check.py --reference all               # the project's own code passes every check

A solution file is a copy of exercises/templates/<exercise>.py with the function bodies written.
Before it runs, its source is read (screen): a file that imports or calls the code it would be
checked against (Exercise.forbidden) is refused, naming each such line. Each check then feeds random
and edge-case inputs to your function and to the project's code (exercises/reference.py: model.py,
generate.py, lora.py, fairness.py, metrics.py, data.py behind the exercise's interface), adds an
independent oracle where there is one (sacreBLEU, a full forward pass without a cache, the gradient
of one process on the whole batch), and stops at the first difference with a message saying which
case failed and what it tests. A check takes 2-4 s on a 2-core CPU, about 2 s of it importing torch.
"""

import argparse
import ast
import copy
import importlib.util
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the flat modules live in the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TEMPLATES = ROOT / "exercises" / "templates"


class ExerciseFailed(AssertionError):
    """The solution differs from the project's code; the message says where."""


# -----------------------------------------------------------------------------
# comparison helpers


def expect(condition, message):
    if not condition:
        raise ExerciseFailed(message)


def as_tensor(value, what):
    if not isinstance(value, torch.Tensor):
        raise ExerciseFailed(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def close(actual, expected, what, atol=1e-6, rtol=1e-5):
    """Same shape and values within tolerance (compared in float64); the message shows the worst entry."""
    actual = as_tensor(actual, what)
    if tuple(actual.shape) != tuple(expected.shape):
        raise ExerciseFailed(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    if torch.allclose(a, e, atol=atol, rtol=rtol):
        return
    err = (a - e).abs().nan_to_num(nan=math.inf)  # a NaN is the worst possible entry
    i = int(err.flatten().argmax())
    index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
    raise ExerciseFailed(f"{what}: values differ; worst at index {index}: got {a.flatten()[i].item():.6g}, "
                         f"expected {e.flatten()[i].item():.6g} (tolerance atol={atol:g}, rtol={rtol:g})")


def close_number(actual, expected, what, tol=1e-9):
    try:
        a = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{what}: expected a number, got {type(actual).__name__}") from None
    if not (abs(a - expected) <= tol * max(1.0, abs(expected))):
        raise ExerciseFailed(f"{what}: got {a:.10g}, expected {expected:.10g}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def build(seed, fn):
    """Build a module with torch's global RNG seeded, without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


# -----------------------------------------------------------------------------
# warm-up


def check_rmsnorm(m, ref):
    g = gen(0)
    for shape, eps in (((2, 3, 16), 1e-5), ((5, 7), 1e-6)):
        x, w = randn(*shape, g=g), randn(shape[-1], g=g)
        close(m.rmsnorm(x, w, eps), ref.rmsnorm(x, w, eps), f"float32 input of shape {shape}: normalise over "
              "the last dimension, x * rsqrt(mean(x^2) + eps) * weight")
    x, w = randn(3, 8, g=g, scale=1e-3), torch.ones(8)
    x[1] = 0.0
    close(m.rmsnorm(x, w, 1e-2), ref.rmsnorm(x, w, 1e-2), "eps=1e-2 on a small input with an all-zero row: "
          "eps goes inside the square root, and keeps a zero row finite (0, not NaN)")
    # x ~ 1000 in float16: x^2 ~ 1e6 overflows float16 (max 65504), so the mean of squares must be
    # taken in float32, as HF/Meta Llama do
    x, w = randn(4, 32, g=g, scale=1000.0).half(), torch.rand(32, generator=g) + 0.5
    out, exp = m.rmsnorm(x, w, 1e-5), ref.rmsnorm(x, w, 1e-5)
    as_tensor(out, "rmsnorm output")
    expect(out.dtype == exp.dtype, f"float16 input, float32 weight: output dtype {out.dtype}, expected {exp.dtype} "
           "(normalise in float32, cast back to x.dtype, then multiply by the weight, as HF Llama does)")
    close(out, exp, "float16 input of magnitude ~1000: compute the mean of squares in float32 "
          "(x^2 overflows float16)", atol=2e-3, rtol=2e-3)


def check_patch_embed(m, ref):
    g = gen(1)
    # token order first, with a readable message: only the patch at grid (row 0, column 1) is lit
    S, p, C = 12, 4, 5
    px = torch.zeros(1, 3, S, S)
    px[:, :, 0:p, p:2 * p] = 1.0
    w, b = randn(C, 3, p, p, g=g), torch.zeros(C)
    out = as_tensor(m.patch_embed(px, w, b), "patch_embed output")
    expect(tuple(out.shape) == (1, (S // p) ** 2, C), f"output shape {tuple(out.shape)}, expected "
           f"(B, (S/p)^2, C) = {(1, (S // p) ** 2, C)}")
    lit = [i for i in range(out.shape[1]) if out[0, i].abs().max() > 1e-6]
    expect(lit == [1], f"only the patch at grid row 0, column 1 is non-zero, so only token 1 should be; got "
           f"tokens {lit}. Tokens go row by row, left to right (row-major), as conv -> flatten(2) gives")
    for B, S, p, C in ((2, 16, 4, 8), (1, 12, 4, 5), (3, 8, 8, 6)):
        px, w, b = randn(B, 3, S, S, g=g), randn(C, 3, p, p, g=g, scale=0.1), randn(C, g=g)
        close(m.patch_embed(px, w, b), ref.patch_embed(px, w, b), f"images {B}x3x{S}x{S}, patch {p}, width {C} "
              "(flatten each patch in the weight's (channel, row, column) order)", atol=1e-5)


def check_reweighting(m, ref):
    cases = {"one majority group": [(0,), (0,), (0,), (1,)],
             "three groups of 1, 2, 3": ["a", "b", "b", "c", "c", "c"],
             "joint (race, gender) groups with an unknown": [(0, 1), (0, 1), (1, 0), (-1, 0), (0, 1), (1, 0)],
             "a single group": [(2,), (2,), (2,)]}
    for name, groups in cases.items():
        w = as_tensor(m.inverse_frequency_weights(groups), f"inverse_frequency_weights, {name}")
        close(w, ref.inverse_frequency_weights(groups), f"inverse_frequency_weights, {name}: "
              "w_i = N / (G * n_g(i))", atol=1e-6)
        close_number(w.double().mean(), 1.0, f"inverse_frequency_weights, {name}: the weights must average to 1 "
                     "(the loss keeps its scale)", tol=1e-6)
        p = as_tensor(m.balanced_probabilities(groups), f"balanced_probabilities, {name}")
        close(p, ref.balanced_probabilities(groups), f"balanced_probabilities, {name}: p_i proportional to "
              "1 / n_g(i), summing to 1", atol=1e-7)
        G = len(set(groups))
        for k in set(groups):
            mass = sum(float(p[i]) for i, gk in enumerate(groups) if gk == k)
            close_number(mass, 1.0 / G, f"balanced_probabilities, {name}: group {k} must be drawn with "
                         f"probability 1/G = 1/{G}", tol=1e-6)


def check_es_metric(m, ref):
    cases = [(2.0, [2.0, 2.0], "uniformly poor, no gap"),
             (42.0, {"F": 40.0, "M": 44.0}, "the docstring's example"),
             (30.0, [10.0, 35.0, 31.0], "three groups"),
             (50.0, {"a": 50.0, "b": 48.5, "c": 52.25, "d": 49.0}, "four groups, dict")]
    for m_all, scores, name in cases:
        got, exp = m.es_metric(m_all, scores), ref.es_metric(m_all, scores)
        expect(isinstance(got, dict) and {"gap", "es"} <= set(got), f"{name}: return a dict with keys 'gap' and "
               f"'es', got {got!r}")
        close_number(got["gap"], exp["gap"], f"{name}: gap = max_g M_g - min_g M_g")
        close_number(got["es"], exp["es"], f"{name}: ES-M = M_all / (1 + gap)")
    try:
        m.es_metric(5.0, [5.0])
    except ValueError:
        pass
    else:
        raise ExerciseFailed("one group: a gap needs at least two groups; raise ValueError")


# -----------------------------------------------------------------------------
# core


def check_rope(m, ref):
    g = gen(2)
    x = randn(2, 3, 5, 8, g=g)
    plain = torch.arange(5).expand(2, 5)
    out = as_tensor(m.rope(x, plain, 10000.0), "rope output")
    expect(tuple(out.shape) == tuple(x.shape), f"output shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    close(out[:, :, 0], x[:, :, 0], "position 0 must be left unchanged (cos 0 = 1, sin 0 = 0)", atol=1e-6)
    close(out.norm(dim=-1), x.norm(dim=-1), "a rotation keeps the length of every head vector", atol=1e-5)
    close(out, ref.rope(x, plain, 10000.0), "positions 0..4: inv_freq_i = theta^(-2i/d) for i < d/2, and dimension "
          "i is rotated with dimension i + d/2 (rotate_half), not with its neighbour 2i+1", atol=1e-4, rtol=1e-4)
    padded = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])  # the first sample is left-padded
    for p in (padded, padded + 100):
        close(m.rope(x, p, 10000.0), ref.rope(x, p, 10000.0), f"positions {p.tolist()}: rotate by position_ids, "
              "not by the index 0..T-1 (a left-padded sample starts later)", atol=1e-4, rtol=1e-4)
    close(m.rope(x, padded, 500000.0), ref.rope(x, padded, 500000.0), "theta=500000 (Llama-3's base): use the "
          "theta argument", atol=1e-4, rtol=1e-4)
    # the point of RoPE: q.k depends on the positions only through their difference
    q, k = randn(1, 1, 1, 8, g=g), randn(1, 1, 1, 8, g=g)
    dots = [(m.rope(q, torch.tensor([[a]]), 10000.0) * m.rope(k, torch.tensor([[b]]), 10000.0)).sum()
            for a, b in ((3, 1), (10, 8), (52, 50))]
    close(torch.stack(dots), dots[0].expand(3), "rope(q, m) . rope(k, n) must depend on m - n only", atol=1e-4)


def check_causal_mask(m, ref):
    cases = [("no padding", torch.ones(2, 5, dtype=torch.long), 0, 5),
             ("right padding", torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), 0, 5),
             ("left padding", torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), 0, 5),
             ("decoding one token after 5 cached", torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]), 5, 1),
             ("a chunk of 2 after 3 cached", torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), 3, 2)]
    for name, am, past, T in cases:
        got, exp = as_tensor(m.attention_mask_4d(am, past, T), name), ref.attention_mask_4d(am, past, T)
        expect(tuple(got.shape) == tuple(exp.shape), f"{name}: shape {tuple(got.shape)}, expected (B, 1, T, S) = "
               f"{tuple(exp.shape)}")
        expect(got.dtype == torch.bool, f"{name}: return a bool mask (True = may attend), got {got.dtype}")
        expect(bool(got.any(-1).all()), f"{name}: some query row sees no key at all, which makes softmax NaN; "
               "let every query (even a padding one) see itself")
        if not torch.equal(got, exp):
            b, _, t, s = (int(i) for i in (got != exp).nonzero()[0])
            rule = ("every query sees itself, even a padding one (or a left-padded row would be all False: "
                    "NaN in softmax)" if s == past + t else "a query at position past + t sees the real keys at "
                    "positions <= past + t")
            raise ExerciseFailed(f"{name} (past={past}, T={T}): sample {b}, query {t} (position {past + t}), key {s}: "
                                 f"got {bool(got[b, 0, t, s])}, expected {bool(exp[b, 0, t, s])}; {rule}")


def check_gqa_attention(m, ref):
    import model
    g = gen(3)
    B, T, hd = 2, 5, 8

    def weights(n_head, n_kv):
        D = n_head * hd
        return (randn(B, T, D, g=g), randn(n_head * hd, D, g=g, scale=0.2), randn(n_kv * hd, D, g=g, scale=0.2),
                randn(n_kv * hd, D, g=g, scale=0.2), randn(D, n_head * hd, g=g, scale=0.2))

    def compare(n_head, n_kv, mask, am, what):
        x, wq, wk, wv, wo = weights(n_head, n_kv)
        cos, sin = model.rope_cos_sin((am.cumsum(-1) - 1).clamp(min=0), hd, 10000.0, x.dtype)
        close(m.attention(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask),
              ref.attention(x, wq, wk, wv, wo, n_head, n_kv, cos, sin, mask),
              f"{n_head} query heads, {n_kv} kv heads, {what}", atol=1e-5)

    full = torch.ones(B, T, dtype=torch.long)
    causal = model.attention_mask_4d(full, 0, T)  # (B, 1, T, T) lower triangle
    compare(4, 4, causal, full, "an explicit causal mask: softmax(q k^T / sqrt(head_dim)) v per head, with RoPE "
            "on q and k, then o_proj")
    compare(4, 4, None, full, "mask=None: plain causal attention (query t sees keys 0..t)")
    for n_head, n_kv in ((4, 2), (6, 3), (4, 1)):
        compare(n_head, n_kv, None, full, "mask=None: query head h reads kv head h // (n_head / n_kv) "
                "(repeat_interleave, not repeat)")
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    compare(4, 2, model.attention_mask_4d(left, 0, T), left, "a left-padded batch with a boolean mask "
            "(True = may attend)")


def check_kv_cache(m, ref):
    import model
    cfg = model.LlamaConfig.tiny()
    g = gen(4)
    # update() on its own: the keys of this layer so far, the new ones last
    cache = m.KVCache(cfg, 2, 6, "cpu", torch.float32)
    expect(getattr(cache, "length", None) == 0, "a new cache must have length == 0")
    kv_shape = lambda T: (2, cfg.num_key_value_heads, T, cfg.head_dim)  # noqa: E731
    k1, v1 = randn(*kv_shape(4), g=g), randn(*kv_shape(4), g=g)
    k, v = cache.update(0, k1, v1)
    close(k, k1, "first update(0, k, v) of 4 tokens must return those keys", atol=0)
    close(v, v1, "first update(0, k, v) of 4 tokens must return those values", atol=0)
    expect(cache.length == 0, "update() must not advance `length`: every layer writes at the same offset, and "
           "Llama.forward adds T to cache.length once, after the last layer")
    cache.length = 4  # what Llama.forward does after the last layer
    k2, v2 = randn(*kv_shape(2), g=g), randn(*kv_shape(2), g=g)
    k, v = cache.update(0, k2, v2)
    close(k, torch.cat([k1, k2], 2), "after 4 cached tokens, update(0, k, v) of 2 more must return all 6 keys, "
          "the cached ones first", atol=0)
    close(v, torch.cat([v1, v2], 2), "after 4 cached tokens, update(0, k, v) must return all 6 values", atol=0)
    try:
        cache.update(0, k2[:, :, :1], v2[:, :, :1])  # 4 + 1 fits in 6; then 6 + 1 does not
        cache.length = 6
        cache.update(0, k2[:, :, :1], v2[:, :, :1])
    except ValueError:
        pass
    else:
        raise ExerciseFailed("writing past max_length must raise ValueError (say how many tokens were asked for)")

    # inside the real model: prefill, a chunk, one token; each must equal a full forward without cache
    llm = build(0, lambda: model.Llama(cfg)).eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 7), generator=g)
    am = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # the first prompt is left-padded
    with torch.no_grad():
        full = llm(ids, attention_mask=am)
        cache = m.KVCache(cfg, 2, 7, "cpu", torch.float32)
        for a, b in ((0, 4), (4, 6), (6, 7)):
            got = llm(ids[:, a:b], attention_mask=am[:, :b], cache=cache)
            expect(cache.length == b, f"after feeding tokens 0..{b - 1} the cache length is {cache.length}, "
                   f"expected {b}")
            real = am[:, a:b].bool()
            close(got[real], full[:, a:b][real], f"logits of tokens {a}..{b - 1} decoded with your cache vs a full "
                  "forward pass without cache", atol=1e-5, rtol=1e-4)


def check_lora(m, ref):
    g = gen(5)
    A, B = m.lora_init(8, 256, 32)
    A, B = as_tensor(A, "lora_init A"), as_tensor(B, "lora_init B")
    expect(tuple(A.shape) == (8, 256) and tuple(B.shape) == (32, 8), f"lora_init(r=8, in=256, out=32): A must be "
           f"(r, in) = (8, 256) and B (out, r) = (32, 8); got {tuple(A.shape)} and {tuple(B.shape)}")
    expect(bool((B == 0).all()), "B must start at zero, so that the adapted model starts exactly as the base model")
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    expect(bool((A.abs() <= bound + 1e-7).all()) and A.std() > 0.8 * bound / math.sqrt(3),
           f"A must be kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)) = U(-{bound:.4f}, {bound:.4f}); "
           f"got values in [{A.min():.4f}, {A.max():.4f}] with std {A.std():.4f}")
    for with_bias in (True, False):
        x = randn(2, 3, 16, g=g)
        W, b = randn(12, 16, g=g), (randn(12, g=g) if with_bias else None)
        A, B = randn(4, 16, g=g), randn(12, 4, g=g)
        alpha = 8.0  # alpha / r = 2: a solution that scales by alpha (or by nothing) shows
        W0 = W.clone()
        out = m.lora_forward(x, W, b, A, B, alpha)
        close(out, ref.lora_forward(x, W, b, A, B, alpha), f"lora_forward (bias={with_bias}, r=4, alpha=8): "
              "y = x W^T + b + (alpha / r) x A^T B^T", atol=1e-5)
        close(m.lora_forward(x, W, b, A, torch.zeros_like(B), alpha), F.linear(x, W, b),
              "with B = 0 the output must equal the base layer's", atol=1e-6)
        merged = m.lora_merge(W, A, B, alpha)
        close(W, W0, "lora_forward / lora_merge must not change the base weight in place", atol=0)
        close(merged, ref.lora_merge(W, A, B, alpha), "lora_merge: W + (alpha / r) B A", atol=1e-5)
        close(F.linear(x, merged, b), out, "the merged layer must give the same output as the unmerged one",
              atol=1e-4)


def check_bleu(m, ref):
    try:
        import sacrebleu
    except ImportError:  # test-only dependency; the project's BLEU equals it (tests/test_metrics.py)
        sacrebleu = None
    corpora = {
        "the worked example in metrics.bleu": (["The heart is normal in size."], ["The heart size is normal."]),
        "a repeated word (clipped counts)": (["the the the the the the the"], ["the cat is on the mat"]),
        "hypotheses shorter than the references (brevity penalty)": (
            ["No acute process.", "Heart size normal."],
            ["No acute cardiopulmonary process is seen today.", "The heart size is normal without effusion."]),
        "one long and one short hypothesis (the brevity penalty is computed on corpus lengths)": (
            ["The lungs are clear. There is no pleural effusion or pneumothorax. The heart is normal.", "Clear."],
            ["The lungs are clear without effusion.", "Lungs are clear, no pneumothorax."]),
        "no matching 3- and 4-grams (exp smoothing)": (["heart normal lungs clear pleura fine"],
                                                       ["heart size normal and lungs clear today"]),
        "no matching word at all": (["Pacemaker in place."], ["The lungs are clear."]),
        "a corpus shorter than 4 words": (["Clear."], ["Lungs are clear."]),
        "a small radiology corpus": (
            ["Heart size is normal. The lungs are clear.", "Small left pleural effusion.",
             "There is a focal opacity in the right lower lobe, concerning for pneumonia.",
             "No pneumothorax.", "Moderate cardiomegaly. No effusion."],
            ["The cardiac silhouette is normal in size. The lungs are clear.",
             "There is a small left pleural effusion.", "Right lower lobe consolidation is seen.",
             "No pleural effusion or pneumothorax.", "The heart is moderately enlarged. No pleural effusion."]),
    }
    for name, (hyps, refs) in corpora.items():
        for n in (4, 2, 1):
            exp = ref.corpus_bleu(hyps, refs, n)
            got = m.corpus_bleu(hyps, refs, n)
            close_number(got, exp, f"BLEU-{n}, {name}", tol=1e-6)
            if sacrebleu is not None:
                sb = sacrebleu.metrics.BLEU(max_ngram_order=n).corpus_score(hyps, [refs]).score
                close_number(got, sb, f"BLEU-{n}, {name}: sacreBLEU", tol=1e-6)


def check_grad_accumulation(m, ref):
    import model
    g = gen(6)
    V, D, world = 11, 8, 2
    net = build(1, lambda: nn.Sequential(nn.Embedding(V, D), nn.Linear(D, V)))
    # 2 ranks x 2 micro-batches of 2 sequences; lengths and supervised-token counts all differ, and
    # some sequences supervise position 0 (which is never a target: nothing predicts it)
    shards = []
    for r in range(world):
        micro = []
        for k, L in enumerate((5, 7) if r == 0 else (4, 6)):
            ids = torch.randint(0, V, (2, L), generator=g)
            labels = ids.masked_fill(torch.rand(2, L, generator=g) < 0.4, model.IGNORE_INDEX)
            labels[1, 0] = ids[1, 0]
            micro.append((ids, labels))
        shards.append(micro)
    for r, micro in enumerate(shards):
        for k, (ids, labels) in enumerate(micro):
            close_number(m.count_targets(labels), float(ref.count_targets(labels)), f"count_targets on rank {r}, "
                         f"micro-batch {k}: count labels != -100 at positions 1.. (position 0 is never a target)")
    step_targets = torch.tensor(float(sum(float(m.count_targets(lb)) for mic in shards for _, lb in mic)))
    # the candidate's step, simulated: each rank accumulates over its micro-batches, then DDP averages
    grads = []
    for r, micro in enumerate(shards):
        replica = copy.deepcopy(net)
        for ids, labels in micro:
            loss = m.micro_batch_loss(replica(ids), labels, step_targets, world)
            with torch.no_grad():
                expected = float(ref.micro_batch_loss(net(ids), labels, step_targets, world))
            close_number(loss, expected,
                         f"micro_batch_loss on rank {r}: sum of this micro-batch's token losses / step_targets "
                         f"* world_size", tol=1e-5)
            loss.backward()
        grads.append([p.grad.clone() for p in replica.parameters()])
    ddp = [torch.stack(gs).mean(0) for gs in zip(*grads)]  # DDP's all-reduce averages over ranks
    # the oracle: one process, the whole step's 8 sequences in one batch, lm_loss = mean over its targets
    L = max(ids.shape[1] for mic in shards for ids, _ in mic)
    all_ids = torch.cat([F.pad(ids, (0, L - ids.shape[1])) for mic in shards for ids, _ in mic])
    all_labels = torch.cat([F.pad(lb, (0, L - lb.shape[1]), value=model.IGNORE_INDEX)
                            for mic in shards for _, lb in mic])
    one = copy.deepcopy(net)
    model.lm_loss(one(all_ids), all_labels).backward()
    for (name, _), got, exp in zip(net.named_parameters(), ddp, [p.grad for p in one.parameters()]):
        close(got, exp, f"gradient of {name} after 2 ranks x 2 micro-batches (averaged over ranks, as DDP does) "
              "vs one process on the whole batch", atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# the paper


def check_pooling(m, ref):
    g = gen(7)
    for n_hidden in (33, 6):  # 32 layers (Vicuna-7B) + embeddings; and 5 layers + embeddings
        hidden = [randn(3, 4, 5, g=g) for _ in range(n_hidden)]
        mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)  # last: no token
        hints = {"first": "hidden[1], the first decoder layer's output (hidden[0] is the embedding output)",
                 "mid": f"hidden[int(0.5 * len(hidden))] = hidden[{int(0.5 * n_hidden)}] here",
                 "last": "hidden[-1]", "mean": "the average of the first, mid and last pooled vectors",
                 2: "an int indexes the list", -2: "an int indexes the list (negative from the end)"}
        for layer, hint in hints.items():
            got = as_tensor(m.pool_hidden(hidden, mask, layer), f"pool_hidden(layer={layer!r})")
            close(got, ref.pool_hidden(hidden, mask, layer), f"{n_hidden} hidden states, layer={layer!r}: {hint}; "
                  "masked mean over the tokens where mask is True; a sample with no token gets h = 0", atol=1e-6)
    hidden = [randn(2, 6, 4, g=g).bfloat16() for _ in range(5)]
    mask = torch.ones(2, 6, dtype=torch.bool)
    got = m.pool_hidden(hidden, mask, "mid")
    expect(as_tensor(got, "pool_hidden").dtype == torch.float32, f"bfloat16 hidden states: return float32 "
           f"(sum in float32: bfloat16 loses precision over hundreds of image tokens), got {got.dtype}")
    close(got, ref.pool_hidden(hidden, mask, "mid"), "bfloat16 hidden states, pooled in float32", atol=1e-6)


# the negative term: which pairs are summed, and what the sum is divided by
PAIRS_OFF, PAIRS_ALL = "the pairs i != j", "all pairs i, j (the diagonal i = j included)"
NEGATIVE_TERMS = [(PAIRS_OFF, "N(N-1)"), (PAIRS_ALL, "N^2"), (PAIRS_OFF, "N^2"), (PAIRS_ALL, "N(N-1)")]


def _club_variant(logits, labels, unknown="left out", log=True, negative=(PAIRS_OFF, "N(N-1)")):
    """CLUB written out as the N x N matrix, in float64, with each choice a solution can get wrong:
    unknown: "left out" (right), or the class a label -1 is read as; log: log q (right) or q;
    negative: (the pairs summed, the divisor), one of NEGATIVE_TERMS."""
    if unknown == "left out":
        keep = labels >= 0
        logits, labels = logits[keep], labels[keep]
    else:
        labels = torch.where(labels >= 0, labels, torch.full_like(labels, unknown))
    n = len(labels)
    if n < 2:
        return torch.zeros((), dtype=torch.float64)
    log_q = F.log_softmax(logits.detach().double(), -1)
    mat = (log_q if log else log_q.exp())[:, labels]  # mat[i, j] = log q(a_j | h_i)
    pairs, divisor = negative
    total = mat.sum() - (mat.diagonal().sum() if pairs == PAIRS_OFF else 0.0)
    return mat.diagonal().mean() - total / (n * n if divisor == "N^2" else n * (n - 1))


def _club_right(negatives):
    """The _club_variant settings that define CLUB for `negatives`: the official negatives are the
    N(N-1) pairs i != j, the original CLUB's all N^2 pairs."""
    return dict(unknown="left out", log=True, negative=NEGATIVE_TERMS[0 if negatives == "off_diagonal" else 1])


def _club_mistakes(got, logits, labels, negatives):
    """The fewest mistakes whose combination gives the value `got` (a float) -> one message per
    mistake, or [] when no combination of the known mistakes explains it."""
    right = _club_right(negatives)
    K = logits.shape[1]
    choices = {"unknown": ["left out", 0, K - 1], "log": [True, False], "negative": NEGATIVE_TERMS}
    best = None
    for combo in itertools.product(*choices.values()):
        variant = dict(zip(choices, combo))
        wrong = [k for k in choices if variant[k] != right[k]]
        if not wrong or (best is not None and len(wrong) >= len(best[0])):
            continue
        if abs(got - float(_club_variant(logits, labels, **variant))) <= 1e-5:
            best = wrong, variant
    if best is None:
        return []
    wrong, variant = best
    how = {0: "as class 0", K - 1: f"as class K-1 = {K - 1} (Python's negative indexing)"}
    (pairs, divisor), (their_pairs, their_divisor) = right["negative"], variant["negative"]
    messages = {
        "unknown": f"label -1 means unknown: leave those samples out of every pair; yours reads -1 "
                   f"{how.get(variant['unknown'])}",
        "log": "log_mat[i, j] is the log-probability log q(a_j | h_i) (log_softmax), not the probability q",
        "negative": f"negatives={negatives!r}: the negative term is the mean over {pairs}, their sum divided by "
                    f"{divisor}; yours divides the sum over {their_pairs} by {their_divisor}",
    }
    return [messages[k] for k in wrong]


def check_club(m, ref):
    g = gen(8)
    labels = torch.tensor([0, 2, 1, -1, 0, 1, 2, 2])
    for negatives in ("off_diagonal", "all"):
        for scale in (1.0, 4.0):
            logits = randn(8, 3, g=g, scale=scale)
            a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
            got, exp = m.club(a, labels, negatives), ref.club(b, labels, negatives)
            got = as_tensor(got, "club").reshape(())
            oracle = _club_variant(logits, labels, **_club_right(negatives))
            case = f"negatives={negatives!r}, 8 samples (one with label -1), 3 classes"
            value = float(got.detach())
            if abs(value - float(oracle)) > 1e-5:  # name the mistakes when known ones explain the value
                mistakes = _club_mistakes(value, logits, labels, negatives)
                if mistakes:
                    raise ExerciseFailed(f"{case}: got {value:.6g}, expected {float(oracle):.6g}\n  - "
                                         + "\n  - ".join(mistakes))
            what = (f"{case}: positive = mean_i log q(a_i | h_i); negative = mean of log q(a_j | h_i) over "
                    f"{'the pairs i != j' if negatives == 'off_diagonal' else 'all pairs i, j'}; samples with "
                    "label -1 are left out")
            close(got, exp, what, atol=1e-5)
            close(got, oracle, what + " (the N x N matrix)", atol=1e-5)
            expect(got.requires_grad, f"negatives={negatives!r}: CLUB must stay differentiable (no .item(), no "
                   "numpy): DIM backpropagates through it")
            got.backward()
            exp.backward()
            close(a.grad, b.grad, f"negatives={negatives!r}: gradient of CLUB with respect to the logits", atol=1e-5)
    edge = {"one known label": (randn(4, 3, g=g), torch.tensor([1, -1, -1, -1])),
            "no known label": (randn(3, 3, g=g), torch.tensor([-1, -1, -1])),
            "a batch from a single group": (randn(5, 3, g=g), torch.tensor([2, 2, 2, 2, 2])),
            "a one-class attribute": (randn(4, 1, g=g), torch.tensor([0, 0, 0, 0]))}
    for name, (logits, lab) in edge.items():
        for negatives in ("off_diagonal", "all"):
            got = m.club(logits, lab, negatives)
            close(as_tensor(got, f"club, {name}").reshape(()), torch.zeros(()), f"{name} (negatives={negatives!r}): "
                  "CLUB must be 0 (fewer than 2 known samples, or nothing to contrast)", atol=1e-6)


def check_alternating_step(m, ref):
    from fairness import FairnessConfig, FairnessRegularizer
    cfg = FairnessConfig(attributes=("race", "gender"), num_classes={"race": 3, "gender": 2},
                         lambdas={"race": 0.5, "gender": 0.25}, dac_weight=0.7)

    def setup():
        backbone = build(2, lambda: nn.Linear(6, 5))
        reg = build(3, lambda: FairnessRegularizer(cfg, hidden_size=5))
        return backbone, reg, torch.optim.SGD(reg.parameters(), lr=0.5)

    (bb_c, reg_c, opt_c), (bb_r, reg_r, opt_r) = setup(), setup()
    g = gen(9)
    for step in range(2):  # two steps: phi's gradients must not pile up across steps
        x = randn(8, 6, g=g)
        attrs = {"race": torch.randint(0, 3, (8,), generator=g), "gender": torch.randint(0, 2, (8,), generator=g)}
        attrs["race"][3] = -1  # unknown: left out
        l_c = m.alternating_step(reg_c, bb_c(x), attrs, opt_c)
        l_r = ref.alternating_step(reg_r, bb_r(x), attrs, opt_r)
        where = f"step {step + 1}"
        expect(all(p.grad is None or not p.grad.any() for p in bb_c.parameters()),
               f"{where}: L_DAC reached the backbone; phi must be trained on sg(h) = h.detach() only")
        for (name, p_c), p_r in zip(reg_c.named_parameters(), reg_r.parameters()):
            close(p_c, p_r, f"{where}: phi ({name}) after the step: one optimizer step on lambda1 * sum_a L_DAC^a "
                  "(zero phi's gradients first)", atol=1e-6)
        close(as_tensor(l_c, "the returned L_DIM").reshape(()), l_r, f"{where}: L_DIM = sum_a lambda_a * "
              "sqrt(CLUB_a^2 + eps), computed with the phi just updated", atol=1e-6)
        phi_grads = [None if p.grad is None else p.grad.clone() for p in reg_c.parameters()]
        expect(l_c.requires_grad, f"{where}: the returned L_DIM must be differentiable with respect to h")
        l_c.backward()
        l_r.backward()
        for (name, p), before in zip(reg_c.named_parameters(), phi_grads):
            unchanged = (p.grad is None and before is None) or (
                p.grad is not None and before is not None and torch.equal(p.grad, before)) or (
                before is None and p.grad is not None and not p.grad.any())
            expect(unchanged, f"{where}: L_DIM.backward() changed phi's gradient ({name}); phi is frozen in the "
                   "DIM term. Write the freeze yourself (reg's methods are not allowed here): phi's logits from its "
                   "parameters detached, as FairnessRegularizer.frozen_logits does, or with requires_grad switched "
                   "off while the DIM graph is built")
        for (name, p_c), p_r in zip(bb_c.named_parameters(), bb_r.parameters()):
            close(p_c.grad if p_c.grad is not None else torch.zeros_like(p_c), p_r.grad,
                  f"{where}: gradient of L_DIM in the backbone ({name})", atol=1e-6)
        bb_c.zero_grad(set_to_none=True)
        bb_r.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# the registry, in the order of EXERCISES.md


@dataclass(frozen=True)
class Forbidden:
    """What a solution may not import or call, because it does what the exercise asks for (and with
    the project's own code, the check would compare that code with itself).
    modules: {module: the names from it the template allows}; any other name from it is refused
    (a module with none allowed: its import is refused).
    methods: attributes refused on any object, e.g. the project's own method (reg.alternating_step).
    functions: refused as a call f(...), an attribute x.f or an import, e.g. torch's own version."""
    modules: dict = field(default_factory=dict)
    methods: tuple = ()
    functions: tuple = ()


# never allowed: the project's code behind the exercises' interfaces, and the checker that loads it
# (run as a script, exercises/ is on sys.path, so `reference` and `check` import as they are)
ALWAYS_FORBIDDEN = ("exercises", "reference", "check")


@dataclass(frozen=True)
class Exercise:
    name: str
    level: str  # warm-up | core | paper
    title: str
    names: tuple  # what the solution file must define
    check: Callable
    forbidden: Forbidden  # on top of ALWAYS_FORBIDDEN and x.<one of names> on any object


EXERCISES = {e.name: e for e in [
    Exercise("rmsnorm", "warm-up", "RMSNorm in float32", ("rmsnorm",), check_rmsnorm,
             Forbidden({"model": ()}, functions=("rms_norm", "RMSNorm"))),
    Exercise("patch_embed", "warm-up", "the ViT patch embedding", ("patch_embed",), check_patch_embed,
             Forbidden({"model": ()}, functions=("conv2d", "Conv2d"))),  # the template: no convolution
    Exercise("reweighting", "warm-up", "the resampling and reweighting baselines",
             ("inverse_frequency_weights", "balanced_probabilities"), check_reweighting, Forbidden({"data": ()})),
    Exercise("es_metric", "warm-up", "the equity-scaled metric ES-M", ("es_metric",), check_es_metric,
             Forbidden({"metrics": ()})),
    Exercise("rope", "core", "rotary position embeddings", ("rope",), check_rope, Forbidden({"model": ()})),
    Exercise("causal_mask", "core", "the causal + padding attention mask", ("attention_mask_4d",), check_causal_mask,
             Forbidden({"model": ()})),
    Exercise("gqa_attention", "core", "grouped-query attention", ("attention",), check_gqa_attention,
             Forbidden({"model": ("apply_rope", "rotate_half", "rope_cos_sin")},  # RoPE is exercise 5
                       functions=("scaled_dot_product_attention", "MultiheadAttention"))),
    Exercise("kv_cache", "core", "the KV cache", ("KVCache",), check_kv_cache, Forbidden({"generate": ()})),
    Exercise("lora", "core", "LoRA: init, forward, merge", ("lora_init", "lora_forward", "lora_merge"), check_lora,
             Forbidden({"lora": (), "fast": ()})),
    Exercise("bleu", "core", "corpus BLEU with the brevity penalty", ("corpus_bleu",), check_bleu,
             Forbidden({"metrics": ("tokenize_13a",), "sacrebleu": ()})),
    Exercise("grad_accumulation", "core", "token-normalised loss under DDP and gradient accumulation",
             ("count_targets", "micro_batch_loss"), check_grad_accumulation,
             Forbidden({"model": ("IGNORE_INDEX",), "train": (), "fast": ()})),
    Exercise("pooling", "paper", "h(x): hidden-layer selection and pooling", ("pool_hidden",), check_pooling,
             Forbidden({"fairness": ()})),
    Exercise("club", "paper", "the CLUB estimator: DIM's positive and negative pairs", ("club",), check_club,
             Forbidden({"fairness": ()})),
    Exercise("alternating_step", "paper", "the alternating DAC / DIM step (Algorithm 1)", ("alternating_step",),
             check_alternating_step,
             Forbidden({"fairness": ("club", "dac_loss", "dim_penalty"), "train": ()},
                       # reg's methods that do the step or one of its stop-gradients; reg(...) is its forward
                       methods=("alternating_step", "dac_loss", "frozen_logits", "dim_terms", "dim_loss", "phi_step",
                                "_fit_phi", "single_step_loss"),
                       functions=("reg",))),
]}


# -----------------------------------------------------------------------------
# a solution file must not use the code it is checked against


class _Screen(ast.NodeVisitor):
    """Collects (line, what) for every import, attribute or call of a solution's syntax tree that
    Exercise.forbidden (with ALWAYS_FORBIDDEN) refuses."""

    def __init__(self, ex):
        self.modules = {**{m: () for m in ALWAYS_FORBIDDEN}, **ex.forbidden.modules}
        self.methods = set(ex.forbidden.methods) | set(ex.names)
        self.functions = set(ex.forbidden.functions)
        self.aliases = {}  # local name -> a module imported whole, whose allowed names are checked where used
        self.found = set()

    def refuse(self, node, what):
        self.found.add((node.lineno, what))

    def visit_Import(self, node):
        for a in node.names:
            top = a.name.split(".")[0]
            if top in self.modules and self.modules[top] and "." not in a.name:
                self.aliases[a.asname or top] = top
            elif top in self.modules:
                self.refuse(node, f"imports {a.name}")

    def visit_ImportFrom(self, node):
        names = [a.name for a in node.names]
        top = (node.module or "").split(".")[0]
        if top in self.modules:
            for n in names:
                if n == "*" or n not in self.modules[top]:
                    self.refuse(node, f"imports {node.module}.{n}")
            return
        for n in names:  # `from . import reference`, or torch's own version of the exercise
            if (not node.module and n in self.modules) or n in self.functions:
                self.refuse(node, f"imports {node.module + '.' if node.module else ''}{n}")

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases:
            module = self.aliases[node.value.id]
            if node.attr not in self.modules[module]:
                full = "" if node.value.id == module else f" ({module}.{node.attr})"
                self.refuse(node, f"uses {ast.unparse(node)}{full}")
        elif node.attr in self.methods or node.attr in self.functions:
            self.refuse(node, f"uses {ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id in self.functions:
            self.refuse(node, f"calls {node.func.id}(...)")
        how = ast.unparse(node.func)
        if how in ("__import__", "importlib.import_module", "import_module") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in self.modules:
                self.refuse(node, f"imports {arg.value} (through {how})")
        self.generic_visit(node)


def forbidden_uses(name, source, filename="<solution>"):
    """The places where a solution's source imports or calls what exercise `name` asks the student
    to write -> ["line N: imports fairness.club", ...] in line order; [] when there are none.
    Read from the syntax tree, before the file runs. A SyntaxError propagates."""
    screen = _Screen(EXERCISES[name])
    screen.visit(ast.parse(source, filename))
    return [f"line {line}: {what}" for line, what in sorted(screen.found)]


def screen(name, path):
    """Refuse (ExerciseFailed) a solution file that imports or calls the code exercise `name` is
    checked against: it would pass without the student writing anything."""
    uses = forbidden_uses(name, Path(path).read_text(), str(path))
    if uses:
        allowed = sorted(f"{m}.{n}" for m, names in EXERCISES[name].forbidden.modules.items() for n in names)
        raise ExerciseFailed(f"{name}: {path} uses code that does this exercise for you:\n  " + "\n  ".join(uses)
                             + "\nWrite it yourself. From the project, this exercise allows "
                             + (", ".join(allowed) if allowed else "nothing") + " (see its template).")


def reference():
    from exercises import reference as ref  # noqa: PLC0415 (imports the project's modules)
    return ref


def run(name, solution):
    """Check `solution` (a module or any object with the exercise's names) for exercise `name`.
    Returns None on success; raises ExerciseFailed with a message otherwise."""
    if name not in EXERCISES:
        raise KeyError(f"unknown exercise {name!r}; choose from {', '.join(EXERCISES)}")
    ex = EXERCISES[name]
    missing = [n for n in ex.names if not hasattr(solution, n)]
    if missing:
        raise ExerciseFailed(f"{name}: the solution defines no {', '.join(missing)} "
                             f"(copy exercises/templates/{name}.py)")
    try:
        with torch.random.fork_rng(devices=[]):
            ex.check(solution, reference())
    except ExerciseFailed as e:
        raise ExerciseFailed(f"{name}: {e}") from None
    except NotImplementedError:
        raise ExerciseFailed(f"{name}: not written yet (a function still raises NotImplementedError)") from None
    except Exception as e:  # the solution crashed: show where, in the student's terms
        raise ExerciseFailed(f"{name}: your code raised {type(e).__name__}: {e}") from e


def load_solution(path, name=None):
    """Import a solution file. Given the exercise's name, its source is screened first (screen):
    a file that uses the code it is checked against is refused before it runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if name is not None:
        screen(name, path)
    spec = importlib.util.spec_from_file_location(f"solution_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    ap = argparse.ArgumentParser(description="Check an exercise solution against the project's own code.")
    ap.add_argument("exercise", nargs="?", help="exercise name (see --list); 'all' with --reference")
    ap.add_argument("file", nargs="?", help="your solution: a copy of exercises/templates/<exercise>.py")
    ap.add_argument("--list", action="store_true", help="list the exercises")
    ap.add_argument("--reference", action="store_true", help="check the project's own code instead of a file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and deterministic
    if args.list or not args.exercise:
        for i, ex in enumerate(EXERCISES.values(), 1):
            print(f"{i:2d}. {ex.name:18s} {ex.level:8s} {ex.title}")
        return 0
    names = list(EXERCISES) if args.exercise == "all" else [args.exercise]
    if args.exercise != "all" and args.exercise not in EXERCISES:
        ap.error(f"unknown exercise {args.exercise!r}; choose from {', '.join(EXERCISES)}")
    if args.reference:
        solutions = {n: reference() for n in names}
    elif args.exercise == "all":
        ap.error("'all' needs --reference (check one file at a time)")
    else:
        if not args.file:
            ap.error(f"give your solution file, e.g. python exercises/check.py {args.exercise} my/{args.exercise}.py")
        try:
            solutions = {args.exercise: load_solution(args.file, args.exercise)}
        except ExerciseFailed as e:  # it uses the code it would be checked against
            print(f"FAIL  {e}")
            return 1
        except Exception as e:  # a syntax error or a failing import in the student's file
            print(f"FAIL  {args.exercise}: could not load {args.file}: {type(e).__name__}: {e}")
            return 1
    failed = 0
    for n, sol in solutions.items():
        t0 = time.time()
        try:
            run(n, sol)
            print(f"PASS  {n} ({time.time() - t0:.2f}s)")
        except ExerciseFailed as e:
            failed += 1
            print(f"FAIL  {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
