"""Time overhead of FairLLaVA's regulariser: one stage-2 training step (LoRA + projector) with and
without DAC + DIM, on the demo-sized LLaVA, CPU. The paper calls the overhead minimal (~57K DAC
parameters at 7B); this measures it.

    python bench/bench_fairness.py                 # demo-sized model, batch 16
    python bench/bench_fairness.py --repeats 30 --threads 2

Both variants run on the same model and batch, interleaved (plain, FairLLaVA, plain, ...), and the
median time of each is compared. The FairLLaVA step includes everything the method adds: keeping the
hidden states, pooling h, phi's own update (alternating protocol) and the CLUB penalty.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo import LLM, VIT  # noqa: E402
from fairness import FairnessConfig, FairnessRegularizer  # noqa: E402
from lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable  # noqa: E402
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlamaConfig, LlavaModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="samples per step")
    ap.add_argument("--text-len", type=int, default=72, help="text tokens per sample (demo average)")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--variant", default="paper", choices=["paper", "batch"],
                    help="paper: one phi step on raw h; batch: the demo's variant (batch-standardised h, "
                         "5 phi steps on the batch + a memory of 512)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = LlavaModel(LlamaConfig(vocab_size=627, **LLM), VIT)
    apply_lora(model.llm, LoRAConfig(r=8, alpha=16.0, dropout=0.05))
    mark_only_lora_as_trainable(model, extra=("mm_projector",))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fcfg = FairnessConfig() if a.variant == "paper" else FairnessConfig(h_norm="batch", dac_steps=5, dac_memory=512)
    fair = FairnessRegularizer(fcfg, model.llm.config.hidden_size)
    dac_opt = torch.optim.AdamW(fair.parameters(), lr=1e-3)

    B, T = a.batch, a.text_len
    ids = torch.randint(3, 627, (B, T))
    ids[:, 20] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :T // 2] = IGNORE_INDEX  # the answer is the second half
    mask = torch.ones_like(ids)
    px = torch.randn(B, 3, VIT.image_size, VIT.image_size)
    attrs = {"race": torch.randint(0, 4, (B,)), "age": torch.randint(0, 3, (B,)), "gender": torch.randint(0, 2, (B,))}

    def step(with_fair):
        t = time.perf_counter()
        out = model(ids, px, mask, labels, return_hidden=with_fair)
        loss = out.loss
        if with_fair:
            h, valid = fair.pool(out.hidden, image_mask=out.image_mask, attention_mask=out.attention_mask,
                                 labels=out.labels)
            reg, _ = fair(h, attrs, dac_opt, valid=valid)
            loss = loss + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    for _ in range(3):  # warm-up
        step(False), step(True)
    plain, fair_t = [], []
    for _ in range(a.repeats):
        plain.append(step(False))
        fair_t.append(step(True))
    p, f = statistics.median(plain), statistics.median(fair_t)
    n_dac = sum(q.numel() for q in fair.parameters())
    n_tok = B * (T - 1 + (VIT.image_size // VIT.patch_size) ** 2)
    print(f"demo-sized LLaVA (hidden {LLM['hidden_size']}, {LLM['num_hidden_layers']} layers), batch {B} x {n_tok // B} tokens, "
          f"{a.threads} thread(s), FairLLaVA {a.variant}, DAC {n_dac:,} parameters")
    print(f"  plain LoRA step   median {p * 1e3:8.1f} ms")
    print(f"  FairLLaVA step    median {f * 1e3:8.1f} ms")
    print(f"  overhead          {100 * (f / p - 1):+.1f}%  (target < 5%)")


if __name__ == "__main__":
    main()
