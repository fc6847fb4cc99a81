"""Generation with a KV cache, gpt-fast style, and a command line to try it on any Llama.

- `KVCache`: pre-allocated keys/values for every layer. model.Attention / model.Llama.forward take
  it as their `cache` argument (duck-typed: model.py does not import this module).
- `generate`: greedy or sampled (temperature, top-p), batched (left-padded prompts), for a
  model.Llama or a model.LlavaModel (-200 in a prompt marks the image). After the prompt, every
  token goes through one fixed-shape `decode_step`, which torch.compile captures once
  (`compile=True`).

Command line (like nanoGPT's sample.py): a greedy continuation from any Llama-architecture model,
an HF folder or hub id (loaded by checkpoint.load_llama; the tokenizer by data.load_tokenizer):

    python generate.py --llm lmsys/vicuna-7b-v1.5 --prompt "The chest X-ray shows" --max-new-tokens 32
"""

import torch

from checkpoint import load_llama, resolve_path
from data import HelpFormatter, OneLineParser, command_line, load_tokenizer
from model import LlavaModel, rope_cos_sin


class KVCache:
    """Pre-allocated keys/values for every layer; `length` tokens are filled so far.

    With `slot` set (a (1,) long tensor), update writes the one new token at that slot and returns
    the whole buffers: every decode step then has the same shapes whatever its position, which is
    what lets torch.compile capture one step for all of them (`decode_step`)."""

    def __init__(self, cfg, batch_size, max_length, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_length, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.max_length = max_length
        self.slot = None

    def update(self, layer, k, v):
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        T = k.shape[2]
        if self.length + T > self.max_length:
            raise ValueError(f"KV cache overflow: {self.length}+{T} > max_length {self.max_length}")
        self.k[layer][:, :, self.length:self.length + T] = k
        self.v[layer][:, :, self.length:self.length + T] = v
        end = self.length + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _sample(logits, temperature, top_p, generator):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sp, idx = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp = sp.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_step(llm, tokens, positions, key_mask, cache):
    """One new token per sample at fixed shapes -> its logits (B, vocab). tokens, positions (B, 1);
    key_mask (B, S) bool, the cache slots each sample attends to (its real tokens so far and this
    one); the token is written at cache.slot. The attention runs over all S slots with the unused
    ones masked out, so no shape depends on the step: torch.compile captures this once."""
    x = llm.model.embed_tokens(tokens)
    cos, sin = rope_cos_sin(positions, llm.config.head_dim, llm.config.rope_theta, x.dtype)
    mask = key_mask[:, None, None, :]
    for i, layer in enumerate(llm.model.layers):
        x = layer(x, cos, sin, mask, cache, i)
    return llm.lm_head(llm.model.norm(x))[:, -1]


_compiled_decode_step = None


@torch.no_grad()
def generate(model, prompts, pixel_values=None, max_new_tokens=256, temperature=0.0, top_p=1.0,
             eos_token_id=2, pad_token_id=0, generator=None, compile=False):
    """Decode a batch of prompts (lists of ids; -200 marks the image for a LlavaModel) with a KV
    cache. Prompts are left-padded so every sample's next token sits in the last column. Returns
    the new tokens of each sample, cut before its first EOS. Greedy when temperature is 0.
    compile=True runs the decode steps through torch.compile(decode_step): the first call per batch
    size and length compiles (tens of seconds on CPU), later ones reuse it."""
    global _compiled_decode_step
    llm = model.llm if isinstance(model, LlavaModel) else model
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p):] = 1
    if isinstance(model, LlavaModel):
        embeds, mask, _, _ = model.prepare_inputs(ids, pixel_values, mask)
    else:
        embeds = llm.model.embed_tokens(ids)
    dtype = llm.model.embed_tokens.weight.dtype
    P = embeds.shape[1]  # prompt length after the image is spliced in
    cache = KVCache(llm.config, B, P + max_new_tokens, device, dtype)
    logits = llm(inputs_embeds=embeds.to(dtype), attention_mask=mask, cache=cache, last_only=True)[:, -1]
    # decode: the cache slot, each sample's position and the slots it may see, all as tensors
    cache.slot = torch.tensor([P], device=device)
    positions = mask.sum(1, keepdim=True)  # (B, 1): real tokens so far = the next token's position
    key_mask = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    key_mask[:, :P] = mask.bool()
    if compile and _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step)
    step = _compiled_decode_step if compile else decode_step
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    i = -1
    for i in range(max_new_tokens):
        nxt = _sample(logits, temperature, top_p, generator).masked_fill(done, pad_token_id)
        out[:, i] = nxt
        done |= nxt == eos_token_id
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        key_mask[:, P + i] = True
        logits = step(llm, nxt[:, None], positions, key_mask, cache)
        positions += 1
        cache.slot += 1
    results = []
    for row in out[:, :i + 1].tolist():
        results.append(row[:row.index(eos_token_id)] if eos_token_id in row else row)
    return results


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = OneLineParser(prog="generate.py", formatter_class=HelpFormatter,
                      description="Print a greedy continuation of --prompt from a Llama-architecture model.")
    p.add_argument("--llm", required=True, help="an HF Llama folder (config.json + weights) or hub id")
    p.add_argument("--prompt", required=True, help="the text to continue (the tokenizer adds its BOS)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (stops at EOS)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json / tokenizer.model, or a folder holding one "
                                                    "(default: the --llm folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights and activations")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"argument --max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: not a torch device: {args.device!r}")
    return args


def run(args):
    """Load, encode, generate greedily, print the new text. Returns the new token ids."""
    folder = resolve_path(args.llm, ["*.json", "*.safetensors", "*.bin", "tokenizer*"])
    tokenizer = load_tokenizer(args.tokenizer or folder)
    llm = load_llama(folder, dtype=getattr(torch, args.dtype), device=args.device).eval()
    ids = tokenizer.encode(args.prompt).ids  # with the BOS, when the tokenizer adds one (as data.py encodes)
    cfg = llm.config
    if not ids:
        raise ValueError("--prompt: encodes to no tokens")
    if max(ids) >= cfg.vocab_size:
        raise ValueError(f"--tokenizer gives id {max(ids)}, outside the model's vocabulary of {cfg.vocab_size}")
    if len(ids) + args.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"--prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceed the "
                         f"model's {cfg.max_position_embeddings} positions")
    new = generate(llm, [ids], max_new_tokens=args.max_new_tokens, eos_token_id=cfg.eos_token_id,
                   pad_token_id=cfg.pad_token_id)[0]
    print(tokenizer.decode(new))
    return new


def main(argv=None):
    """run(), with bad input (flags, paths, files) ending as one line on stderr and exit status 2."""
    return command_line("generate.py", lambda a: run(parse_args(a)), argv)


if __name__ == "__main__":
    main()
