"""Speed of our Llama + LoRA against HF transformers (+ PEFT) on the same weights, in one run.

Rows, each timed as paired repeats in one process (ours and theirs alternate, the order swapping
every repeat, so neither always runs on a warmer or cooler machine); the median of each side and
the ratio of the medians are printed:

  step A   one LoRA training step (forward + backward + AdamW) of a Llama (default: 8 layers,
           hidden 512, SwiGLU 1408, vocabulary 32000) with LoRA r 16 / alpha 32 / dropout 0.05 on
           q,k,v,o,gate,up,down, batch 4 x 256, every position supervised (HF's labels=input_ids).
           Ours: the path train.py takes (model.causal_lm_loss on the final hidden states);
           theirs: PeftModel(LlamaForCausalLM)(input_ids, labels).loss.
  step B   the same step on a LLaVA-shaped batch: the first 192 of the 256 positions (image patches
           and prompt) are not supervised, as in LLaVA's instruction tuning, and both sides use
           gradient checkpointing (the official setting).
  forward  eval-mode no_grad logits of the base model for the 4 x 256 block.
  generate batched greedy decoding with a KV cache, 4 prompts x (32 + 64 new tokens), exactly 64
           tokens each (no EOS): `generate.generate` vs HF `generate(do_sample=False)`.
  generate compiled   the same with torch.compile: ours `generate(..., compile=True)` (one
           static-shape decode step, captured once), HF `generate(cache_implementation="static")`
           with its own compile config forced on for the CPU, in the same mode as ours ("default";
           HF's own default, CUDA graphs, does nothing on a CPU). The first call, which compiles,
           is timed apart and printed.
  loss     peak memory of the LM loss alone (forward + backward from the final hidden states) at
           step A's shape: ours (model.causal_lm_loss) against the full logits + cross-entropy
           (model.lm_loss, which is what HF's loss does), counted by a TorchDispatchMode that adds
           up the bytes of the live tensors the ops create; loss and gradient compared to 1e-6.

ours/theirs < 1 for a step or forward means ours takes less time; for generation the ratio is
speed-up = their time / our time (> 1: ours is faster). Before timing, each pair is checked to
compute the same thing: loss and every LoRA gradient (dropout off for the check), forward logits,
greedy tokens. A failed check exits 1.

    python bench/bench_speed.py                  # ~15 min on 2 CPU threads
    python bench/bench_speed.py --quick          # tiny model, under a minute
    python bench/bench_speed.py --only step      # one group: step | forward | generate | compile | loss
    python bench/bench_speed.py --profile        # also the top-5 ops of both sides' step A (torch.profiler)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import generate  # noqa: E402
import model as fl  # noqa: E402
from lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable, trainable_parameters  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408, help="SwiGLU width (8/3 x hidden, rounded up to 64)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--unsupervised", type=int, default=192, help="step B: leading positions without labels")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="paired timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["step", "forward", "generate", "compile", "loss"], action="append",
                   help="run only these row groups (repeatable; default: all)")
    p.add_argument("--profile", action="store_true", help="print the top-5 ops by self time of our step A and HF's")
    p.add_argument("--quick", action="store_true", help="tiny model (hidden 128, 2 layers, vocab 1000), 3 repeats")
    a = p.parse_args()
    if a.quick:
        a.hidden, a.layers, a.heads, a.intermediate, a.vocab = 128, 2, 4, 384, 1000
        a.seq, a.unsupervised, a.prompt_len, a.new_tokens, a.repeats = 64, 48, 8, 16, 3
    return a


def paired(ours, theirs, warmup, repeats):
    """Seconds of each timed run; the two alternate and swap order every repeat."""
    for _ in range(warmup):
        ours(), theirs()
    t_o, t_t = [], []
    for r in range(repeats):
        pair = [(ours, t_o), (theirs, t_t)]
        for fn, times in (pair if r % 2 == 0 else pair[::-1]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return t_o, t_t


def build(a):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = fl.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                         max_position_embeddings=max(a.seq, a.prompt_len + a.new_tokens))
    torch.manual_seed(a.seed)
    ours = fl.Llama(cfg)
    with torch.no_grad():  # HF-style N(0, 0.02): PyTorch's default N(0, 1) embedding is unrealistic
        for p in ours.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_llama(ours, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # never stop early; ours gets eos -1
    hf.generation_config.pad_token_id = cfg.pad_token_id
    return cfg, ours.eval(), hf.eval()


def lora_pair(a, cfg, checkpointing):
    """Fresh copies of the base weights with the same LoRA weights on both sides (B random, not
    zero, so that A gets a gradient too) and one AdamW each."""
    import copy

    from peft import LoraConfig, get_peft_model
    ours, hf = copy.deepcopy(a.base_ours), copy.deepcopy(a.base_hf)
    apply_lora(ours, LoRAConfig(r=a.r, alpha=a.alpha, dropout=a.dropout, targets=TARGETS))
    mark_only_lora_as_trainable(ours)
    pm = get_peft_model(hf, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(TARGETS)))
    g = torch.Generator().manual_seed(a.seed + 2)
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for n, p in trainable_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            theirs["base_model.model." + n.replace(".weight", ".default.weight")].copy_(p)
    ours.train(), pm.train()
    if checkpointing:
        ours.gradient_checkpointing = True
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt_o = torch.optim.AdamW([p for _, p in trainable_parameters(ours)], lr=1e-4)
    opt_t = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    return ours, pm, opt_o, opt_t


def set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def step_fns(ours, pm, opt_o, opt_t, ids, labels):
    def ours_step():
        hidden = ours(ids, head=False)
        loss = fl.causal_lm_loss(hidden, ours.lm_head.weight, labels)
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)
        return loss

    def theirs_step():
        loss = pm(input_ids=ids, labels=labels).loss
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)
        return loss
    return ours_step, theirs_step


def check_step(ours, pm, ids, labels, dropout):
    """Loss and every LoRA gradient equal, dropout off; -> (|d loss|, max |d grad|)."""
    set_dropout(ours, 0.0), set_dropout(pm, 0.0)
    lo = fl.causal_lm_loss(ours(ids, head=False), ours.lm_head.weight, labels)
    lo.backward()
    lt = pm(input_ids=ids, labels=labels).loss
    lt.backward()
    theirs = dict(pm.named_parameters())
    gdiff = 0.0
    for n, p in trainable_parameters(ours):
        q = theirs["base_model.model." + n.replace(".weight", ".default.weight")]
        gdiff = max(gdiff, (p.grad - q.grad).abs().max().item())
        p.grad = q.grad = None
    set_dropout(ours, dropout), set_dropout(pm, dropout)
    return abs(lo.item() - lt.item()), gdiff


def top_ops(fn, n=5):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [(e.key, e.self_cpu_time_total / 1e3, 100 * e.self_cpu_time_total / total, e.count) for e in rows[:n]], total / 1e3


class LiveBytes(TorchDispatchMode):
    """Bytes held by the storages that the ops run inside this mode create, and their peak;
    tensors that existed before (inputs, weights) are not counted. Exact for what autograd and
    the ops keep alive; scratch memory inside one kernel is not seen."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                self.live.setdefault(ref.cdata, (ref, 0))  # seen first as an input: not ours to count
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, st.nbytes())
                    self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def peak_tensor_memory(fn):
    """-> (peak bytes of the tensors fn creates, fn's result)."""
    with LiveBytes() as m:
        out = fn()
    return m.peak, out


def loss_memory(a):
    """Peak bytes held by tensors while the loss runs forward and backward from the final hidden
    states: ours (fused, chunked, supervised rows only) vs the full logits + cross-entropy (what
    lm_loss, and HF's loss, do). Also checks that loss and gradient agree."""
    g = torch.Generator().manual_seed(a.seed + 3)
    B, T, H, V = a.batch, a.seq, a.hidden, a.vocab
    W = torch.randn(V, H, generator=g) * 0.02
    labels = torch.randint(0, V, (B, T), generator=g)
    h0 = torch.randn(B, T, H, generator=g)
    results = {}
    for name in ("full logits", "fused"):
        h = h0.clone().requires_grad_(True)

        def run():
            if name == "fused":
                loss = fl.causal_lm_loss(h, W, labels)
            else:
                loss = fl.lm_loss(torch.nn.functional.linear(h, W), labels)
            loss.backward()
            return loss
        peak, loss = peak_tensor_memory(run)
        results[name] = (peak, loss.item(), h.grad.clone())
    (p_full, l_full, g_full), (p_fused, l_fused, g_fused) = results["full logits"], results["fused"]
    print(f"\nLM loss alone at {B} x {T}, vocabulary {V}, fp32 (peak bytes of live tensors, inputs excluded):")
    print(f"  full logits + cross-entropy {p_full / 2**20:8.1f} MiB")
    print(f"  fused, chunked              {p_fused / 2**20:8.1f} MiB   ({p_full / max(p_fused, 1):.1f}x less)")
    print(f"  |loss difference| {abs(l_full - l_fused):.2e}, max |gradient difference| {(g_full - g_fused).abs().max().item():.2e}")
    ok = abs(l_full - l_fused) <= 1e-6 and (g_full - g_fused).abs().max().item() <= 1e-6
    return ok


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    want = set(a.only or ["step", "forward", "generate", "compile", "loss"])
    cfg, a.base_ours, a.base_hf = build(a)
    n = sum(p.numel() for p in a.base_ours.parameters())
    print(f"Llama {a.layers} layers x hidden {a.hidden} ({a.heads} heads), SwiGLU {a.intermediate}, vocabulary "
          f"{a.vocab}: {n / 1e6:.1f}M parameters; fp32, CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; warmup {a.warmup}, median of {a.repeats} paired repeats")
    import peft
    import transformers
    print(f"theirs: transformers {transformers.__version__}, peft {peft.__version__}")
    g = torch.Generator().manual_seed(a.seed + 1)
    ids = torch.randint(3, a.vocab, (a.batch, a.seq), generator=g)
    rows, ok = [], True

    if "step" in want:
        labels_b = ids.clone()
        labels_b[:, :a.unsupervised] = fl.IGNORE_INDEX
        for name, labels, ckpt in ((f"LoRA step A {a.batch}x{a.seq}, all supervised", ids, False),
                                   (f"LoRA step B {a.batch}x{a.seq}, {a.seq - a.unsupervised} supervised, ckpt", labels_b, True)):
            ours, pm, opt_o, opt_t = lora_pair(a, cfg, ckpt)
            dl, dg = check_step(ours, pm, ids, labels, a.dropout)
            good = dl <= 1e-5 and dg <= 1e-6
            ok &= good
            print(f"parity {name}: |loss diff| {dl:.1e}, max |LoRA grad diff| {dg:.1e} {'ok' if good else 'FAILED'}")
            fo, ft = step_fns(ours, pm, opt_o, opt_t, ids, labels)
            rows.append((name, "time", *paired(fo, ft, a.warmup, a.repeats)))
            if a.profile and ckpt is False:
                for who, fn in (("ours", fo), ("HF + PEFT", ft)):
                    top, total = top_ops(fn)
                    print(f"\n{who}, step A: top 5 ops by self CPU time (profiled step {total:.0f} ms)")
                    for key, ms, pct, count in top:
                        print(f"  {key:<40s} {ms:9.1f} ms {pct:5.1f}%  x{count}")
            del ours, pm, opt_o, opt_t

    if "forward" in want:
        @torch.no_grad()
        def fwd_o():
            return a.base_ours(ids)

        @torch.no_grad()
        def fwd_t():
            return a.base_hf(input_ids=ids, use_cache=False).logits
        d = (fwd_o() - fwd_t()).abs().max().item()
        ok &= d <= 1e-4
        print(f"parity forward: max |logit diff| {d:.1e} {'ok' if d <= 1e-4 else 'FAILED'}")
        rows.append((f"forward {a.batch}x{a.seq}", "time", *paired(fwd_o, fwd_t, a.warmup, a.repeats)))

    prompt = torch.randint(3, a.vocab, (a.batch, a.prompt_len), generator=g)
    for compiled in (False, True):
        if ("compile" if compiled else "generate") not in want:
            continue
        from transformers import CompileConfig

        def gen_o():
            return generate.generate(a.base_ours, prompt.tolist(), max_new_tokens=a.new_tokens, eos_token_id=-1,
                               pad_token_id=cfg.pad_token_id, compile=compiled)

        extra = {}
        if compiled:  # HF compiles its forward itself with a static cache; on CPU only when told to
            cc = CompileConfig(mode="default")  # the same torch.compile mode as ours (theirs: CUDA graphs)
            cc._compile_all_devices = True
            extra = dict(cache_implementation="static", compile_config=cc)

        @torch.no_grad()
        def gen_t():
            out = a.base_hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **extra)
            return out[:, a.prompt_len:]
        t0 = time.perf_counter()
        to = torch.tensor(gen_o())
        t1 = time.perf_counter()
        tt = gen_t()
        t2 = time.perf_counter()
        same = tuple(to.shape) == tuple(tt.shape) and bool((to == tt).all())
        ok &= same
        label = "generate" + (" compiled" if compiled else "")
        first = f" (first call incl. compile: ours {t1 - t0:.1f} s, HF {t2 - t1:.1f} s)" if compiled else ""
        print(f"parity {label}: greedy tokens identical {same}{first}")
        rows.append((f"{label} {a.batch}x({a.prompt_len}+{a.new_tokens})", "speed", *paired(gen_o, gen_t, a.warmup, a.repeats)))

    print(f"\n{'':46s} {'ours ms':>9s} {'theirs ms':>10s}  result")
    for name, kind, t_o, t_t in rows:
        mo, mt = statistics.median(t_o), statistics.median(t_t)
        res = f"ours/theirs time {mo / mt:.3f}" if kind == "time" else f"speed-up {mt / mo:.2f}x"
        spread = f"  (ours {min(t_o) * 1e3:.0f}-{max(t_o) * 1e3:.0f}, theirs {min(t_t) * 1e3:.0f}-{max(t_t) * 1e3:.0f})"
        print(f"{name:46s} {mo * 1e3:9.1f} {mt * 1e3:10.1f}  {res}{spread}")
    if "loss" in want:
        ok &= loss_memory(a)
    if not ok:
        print("a parity check FAILED: the timings above do not compare like with like", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
