"""Throughput of our `model.Llama` against Hugging Face's `LlamaForCausalLM`, same weights.

What is measured, in one run:
- forward: eval-mode, no_grad logits for a (batch, seq) block of token ids (the training/prefill
  shape; no padding, so both sides take the fused causal attention path). Tokens per second =
  batch * seq / time.
- generate: greedy decoding with a KV cache of `new_tokens` tokens from a (batch, prompt_len)
  prompt: `model.generate` for ours, HF `generate(do_sample=False, use_cache=True)` for HF, both
  forced to produce exactly `new_tokens` tokens (our eos is -1, HF's eos is unset). Tokens per
  second = batch * new_tokens / time, prefill included.

Our model is saved with `model.save_llama` and HF loads that folder with `from_pretrained`
(attn_implementation="sdpa"), so both hold the same tensors. Before timing, the script checks the
comparison is apples to apples: the max |logit difference| of one forward pass and whether the
greedy tokens are identical. Each measurement is warmed up, then repeated with ours and HF
interleaved (alternating which goes first, so neither always runs on a warmer or cooler machine);
the median is reported (and the ratio of the best runs, the figure least disturbed by other load
on a shared machine). A ratio ours/HF > 1 means ours is faster. On a machine shared with other
jobs use --threads 1: OpenMP threads that wait on each other for a busy core make small decode
steps several times slower, and that noise swamps the comparison.

The default model has ~100M parameters (hidden 640, 12 layers of 10 heads, SwiGLU 1728 — the
Llama 8/3 ratio rounded to 64 — and the 32k Llama-2 vocabulary), fp32 on CPU:

    python bench/bench_llama.py                    # a few minutes on CPU
    python bench/bench_llama.py --threads 1 --repeats 7   # on a busy shared machine
    python bench/bench_llama.py --quick            # tiny model, a few seconds
    python bench/bench_llama.py --threads 8 --batch 1 --new-tokens 128
    python bench/bench_llama.py --device cuda --dtype bfloat16
    python bench/bench_llama.py --profile          # also print our top ops (torch.profiler)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as fl  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and activations dtype")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch.set_num_threads value for CPU runs (default: torch's own choice)")
    p.add_argument("--hidden", type=int, default=640, help="hidden_size")
    p.add_argument("--layers", type=int, default=12, help="num_hidden_layers")
    p.add_argument("--heads", type=int, default=10, help="num_attention_heads")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="num_key_value_heads (default: = heads; fewer gives grouped-query attention)")
    p.add_argument("--intermediate", type=int, default=1728, help="intermediate_size of the SwiGLU MLP")
    p.add_argument("--vocab", type=int, default=32000, help="vocab_size")
    p.add_argument("--batch", type=int, default=4, help="batch size of both measurements")
    p.add_argument("--seq", type=int, default=256, help="tokens per sample in the forward measurement")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sample for generation")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each side before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side; the median is reported")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights and inputs")
    p.add_argument("--quick", action="store_true",
                   help="tiny model and inputs (hidden 128, 2 layers, vocab 1000), for a seconds-long check")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one forward and one generate of ours and print the top ops")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 128, 2, 4, 352, 1000
        args.batch, args.seq, args.prompt_len, args.new_tokens, args.repeats = 2, 64, 8, 16, 3
    args.kv_heads = args.kv_heads or args.heads
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved(ours, hf, device, warmup, repeats):
    """Seconds of each timed run of each callable; runs alternate and swap order every repeat."""
    for _ in range(warmup):
        ours(), hf()
    t_ours, t_hf = [], []
    for r in range(repeats):
        pair = [(ours, t_ours), (hf, t_hf)]
        for fn, times in (pair if r % 2 == 0 else pair[::-1]):
            times.append(timed(fn, device)[0])
    return t_ours, t_hf


def main():
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cfg = fl.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.seq, args.prompt_len + args.new_tokens))
    torch.manual_seed(args.seed)
    ours = fl.Llama(cfg)
    with torch.no_grad():  # GPT-2/HF-style N(0, 0.02) init; PyTorch's default N(0, 1) embedding is unrealistic
        for name, p in ours.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02)
    n_params = sum(p.numel() for p in ours.parameters())
    ours = ours.to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        fl.save_llama(ours, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    # Unset HF's eos so it never stops early (ours gets eos -1); no other logits processors apply.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = cfg.pad_token_id

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(device)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g).to(device)
    prompt_lists = prompt.tolist()
    prompt_mask = torch.ones_like(prompt)

    @torch.no_grad()
    def fwd_ours():
        return ours(ids)

    @torch.no_grad()
    def fwd_hf():
        return hf(input_ids=ids, use_cache=False).logits

    def gen_ours():
        return fl.generate(ours, prompt_lists, max_new_tokens=args.new_tokens, eos_token_id=-1,
                           pad_token_id=cfg.pad_token_id)

    @torch.no_grad()
    def gen_hf():
        out = hf.generate(input_ids=prompt, attention_mask=prompt_mask, do_sample=False, use_cache=True,
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        return out[:, args.prompt_len:]

    print(f"Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
          f"intermediate {args.intermediate}, vocab {args.vocab}: {n_params / 1e6:.1f}M parameters")
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device {device}, dtype {args.dtype}{threads}, torch {torch.__version__}, "
          f"warmup {args.warmup}, median of {args.repeats}")

    # Parity first: a speed comparison is only meaningful if both compute the same thing.
    diff = (fwd_ours().float() - fwd_hf().float()).abs().max().item()
    tok_ours = torch.tensor(gen_ours(), device=device)
    tok_hf = gen_hf()
    same = tok_ours.shape == tok_hf.shape and bool((tok_ours == tok_hf).all())
    print(f"parity: forward logits max |ours - HF| = {diff:.2e}; greedy tokens identical: {same} "
          f"({tuple(tok_ours.shape)} vs {tuple(tok_hf.shape)})")
    if not same and tok_ours.shape == tok_hf.shape:
        first = (tok_ours != tok_hf).any(0).nonzero()[0].item()
        print(f"  first differing step: {first} (near-tied logits can flip an argmax; check the diff above)")

    f_ours, f_hf = interleaved(fwd_ours, fwd_hf, device, args.warmup, args.repeats)
    g_ours, g_hf = interleaved(gen_ours, gen_hf, device, args.warmup, args.repeats)
    n_fwd, n_gen = args.batch * args.seq, args.batch * args.new_tokens
    rows = [(f"forward {args.batch}x{args.seq}", n_fwd, f_ours, f_hf),
            (f"generate {args.batch}x({args.prompt_len}+{args.new_tokens})", n_gen, g_ours, g_hf)]
    # The median is the headline; the best run is printed too because on a shared machine the
    # slow tail is other processes' load, not either implementation.
    print(f"\n{'':24s} {'ours ms':>9s} {'HF ms':>9s} {'ours tok/s':>11s} {'HF tok/s':>10s} {'ours/HF':>8s}"
          f" {'best ours/HF':>13s}")
    for name, n, ts_o, ts_h in rows:
        t_o, t_h = statistics.median(ts_o), statistics.median(ts_h)
        print(f"{name:24s} {t_o * 1e3:9.1f} {t_h * 1e3:9.1f} {n / t_o:11.1f} {n / t_h:10.1f} {t_h / t_o:8.3f}"
              f" {min(ts_h) / min(ts_o):13.3f}")
    print("(ms and tok/s are medians; ours/HF > 1 means ours is faster)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name, fn in (("forward", fwd_ours), ("generate", gen_ours)):
            with profile(activities=acts) as prof:
                fn()
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\nours, {name}: top ops by self time")
            print(prof.key_averages().table(sort_by=sort, row_limit=15))


if __name__ == "__main__":
    main()
