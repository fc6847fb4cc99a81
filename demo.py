"""The built-in demo: the whole FairLLaVA story on the synthetic chest X-ray benchmark, on a CPU.

    python train.py --demo                    # one seed, ~10 minutes on 2 CPU cores
    python train.py --demo --seeds 0 1 2      # the README's result, with confidence intervals

Steps (everything goes through the same code and file formats as a real run):
1. data.make_synthetic writes train/val/test JSON + PNGs + a BPE tokenizer.json (data.py says what
   demographic shortcut is planted and how the test split breaks it).
2. Stand-ins for the public base models, made once and reused by every seed:
   - "Vicuna": a tiny Llama pre-trained on the training conversations (text only), saved in the
     HF layout (config.json + model.safetensors) and loaded back by model.load_llama;
   - "BiomedCLIP": a tiny ViT pre-trained to recognise the findings in the training images, saved
     as an open_clip checkpoint (visual.trunk.*) and loaded back by model.load_vision_tower.
   Real base models are pre-trained on far more data; these only have to be good enough that the
   two methods can be compared from the same starting point.
3. Per seed: stage 1 (projector), then stage 2 from that projector twice — plain LoRA (the
   LLaVA-Rad baseline) and FairLLaVA (DAC + DIM, paper defaults) — then evaluate.py on the test
   split: BLEU-1/4, clinical F1, per-attribute gaps and ES-M, and a fresh probe's accuracy at
   predicting each attribute from the pooled hidden state h (how much the representation leaks).
4. The table of both methods side by side; with several seeds, means and 95% intervals over seeds.

The demo's hyper-parameters differ from the 7B recipe where a 1M-parameter model needs it (higher
learning rates, smaller LoRA rank); they are fixed here, chosen before looking at the test split.
"""

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import evaluate
from data import conversation_prompt, load_tokenizer
from model import Llama, LlamaConfig, VisionConfig, VisionTransformer, save_llama
from train import cosine_lr, train

# The stand-in base models (fixed: they play the role of downloaded weights).
LLM = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=512)
VIT = VisionConfig(image_size=64, patch_size=16, width=64, depth=4, num_heads=2, mlp_dim=128)
DEMO_TRAIN = dict(stage1=dict(epochs=2, lr=2e-3), stage2=dict(epochs=3, lr=1e-3, dac_lr=1e-3),
                  lora=dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.05),
                  batch_size=16, grad_accum=1, num_workers=0, max_length=256, dtype="fp32",
                  grad_checkpointing=False, save_every=10 ** 9, log_every=10)


def pretrain_llm(data_dir, out_dir, steps=300, batch=32, seed=1234, split="train"):
    """Next-token pre-training of the tiny Llama on the training conversations, without images."""
    tok = load_tokenizer(data_dir / "tokenizer.json")
    recs = data.read_llava_json(data_dir / f"{split}.json", check_images=False)
    texts = [conversation_prompt(r["question"].replace("<image>\n", ""), r["answer"]) for r in recs]
    seqs = [tok.encode(t).ids for t in texts]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), **LLM)
    model = Llama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(seqs), (batch,), generator=g).tolist()
        T = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(batch, T, dtype=torch.long)
        mask = torch.zeros(batch, T, dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, :len(seqs[i])], mask[b, :len(seqs[i])] = torch.tensor(seqs[i]), 1
        for grp in opt.param_groups:
            grp["lr"] = 3e-3 * cosine_lr(step, steps, 0)
        logits = model(ids, attention_mask=mask)
        labels = ids.masked_fill(mask == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_llama(model, out_dir)
    shutil.copy(data_dir / "tokenizer.json", out_dir / "tokenizer.json")
    return loss.item()


def pretrain_vit(data_dir, out_dir, steps=400, batch=64, seed=1234, split="train", demographics=True):
    """Multi-label finding recognition: the tiny ViT learns to see what the reports talk about.
    With `demographics`, it also learns to tell race, age group and sex, as real towers do without
    being asked (Gichoya et al.); the split is decorrelated, so no finding-race link is learnt."""
    items = json.loads((data_dir / f"{split}.json").read_text())
    names = sorted(items[0]["findings_labels"])
    proc = data.ImageProcessor(VIT.image_size, VIT.mean, VIT.std)
    x = torch.stack([proc(data.load_image(data_dir / it["image"], it["id"])) for it in items])
    y = torch.tensor([[float(it["findings_labels"][k]) for k in names] for it in items])
    recs = data.read_llava_json(data_dir / f"{split}.json", check_images=False)
    demo_y = {a: torch.tensor([r["attrs"][a] for r in recs]) for a in ("race", "age", "gender")}
    torch.manual_seed(seed)
    vit = VisionTransformer(VIT)
    head = torch.nn.Linear(VIT.width, len(names))
    dheads = torch.nn.ModuleDict({a: torch.nn.Linear(VIT.width, data.ATTRIBUTES[a].num_classes) for a in demo_y})
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()) + list(dheads.parameters()),
                            lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        feats = vit.norm(vit(x[idx], select_layer=-1).mean(1))  # (B, width)
        loss = F.binary_cross_entropy_with_logits(head(feats), y[idx])
        if demographics:
            loss = loss + sum(F.cross_entropy(dheads[a](feats), demo_y[a][idx]) for a in demo_y) / 3
        for grp in opt.param_groups:
            grp["lr"] = 2e-3 * cosine_lr(step, steps, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {f"visual.trunk.{k}": v.detach().clone() for k, v in vit.state_dict().items()}
    torch.save(sd, out_dir / "open_clip_pytorch_model.bin")  # the open_clip layout
    return loss.item()


def prepare(root):
    data_dir, base = root / "data", root / "base"
    if not (data_dir / "tokenizer.json").is_file():
        t = time.time()
        data.make_synthetic(data_dir)
        print(f"[demo] synthetic benchmark written to {data_dir} ({time.time() - t:.0f}s)")
    if not (base / "llm" / "model.safetensors").is_file():
        t = time.time()
        loss = pretrain_llm(data_dir, base / "llm")
        print(f"[demo] tiny Llama pre-trained on the report text: final LM loss {loss:.3f} ({time.time() - t:.0f}s)")
    if not (base / "vision" / "open_clip_pytorch_model.bin").is_file():
        t = time.time()
        loss = pretrain_vit(data_dir, base / "vision")
        print(f"[demo] tiny ViT pre-trained on finding labels: final BCE {loss:.3f} ({time.time() - t:.0f}s)")
    return data_dir, base


# Demo method names -> train.py settings. "fairllava" is the paper's Algorithm 1 (one AdamW step
# on phi per batch); "fairllava_lbfgs" refits phi to each batch (phi at its best response).
VARIANTS = {"lora": dict(method="lora"), "resample": dict(method="resample"), "reweight": dict(method="reweight"),
            "fairllava": dict(method="fairllava"), "fairllava_lbfgs": dict(method="fairllava", dac_optimizer="lbfgs")}
LABELS = {"lora": "LoRA (LLaVA-Rad baseline)", "resample": "Resampling", "reweight": "Reweighting",
          "fairllava": "FairLLaVA", "fairllava_lbfgs": "FairLLaVA, phi refit (LBFGS)"}


def run_seed(cfg, data_dir, base, root, seed, methods):
    common = dict(llm=str(base / "llm"), vision=str(base / "vision"), vision_heads=VIT.num_heads,
                  tokenizer=str(base / "llm"), train_json=str(data_dir / "train.json"), dataset="mimic",
                  seed=seed, **{k: v for k, v in DEMO_TRAIN.items() if k not in ("stage1", "stage2", "lora")},
                  **DEMO_TRAIN["lora"])
    s1 = root / f"seed{seed}" / "stage1"
    if not (s1 / "mm_projector.bin").is_file():
        train(replace(cfg, stage=1, method="lora", out=str(s1), **common, **DEMO_TRAIN["stage1"]), quiet=True)
    results = {}
    for method in methods:
        out = root / f"seed{seed}" / method
        if not (out / "adapter" / "adapter_config.json").is_file():
            t = time.time()
            train(replace(cfg, stage=2, out=str(out), projector=str(s1 / "mm_projector.bin"),
                          **VARIANTS[method], **common, **DEMO_TRAIN["stage2"]), quiet=True)
            print(f"[demo] seed {seed}: stage 2 {method} trained ({time.time() - t:.0f}s)")
        results[method] = evaluate_run(base, data_dir, out, seed)
    return results


def evaluate_run(base, data_dir, out, seed):
    if (out / "eval" / "results.json").is_file():
        return json.loads((out / "eval" / "results.json").read_text())
    t = time.time()
    model = evaluate.load_model(str(base / "llm"), str(base / "vision"), str(out / "mm_projector.bin"),
                                str(out / "adapter"), vision_heads=VIT.num_heads)
    tok = load_tokenizer(base / "llm")
    proc = data.ImageProcessor(VIT.image_size, VIT.mean, VIT.std)
    test = data.read_llava_json(data_dir / "test.json")
    train_recs = data.read_llava_json(data_dir / "train.json")
    preds = evaluate.generate_predictions(model, tok, test, proc, out / "eval" / "predictions.jsonl",
                                          batch_size=64, max_new_tokens=128)
    res = evaluate.score(preds, test, seed=seed)
    res["probe"] = evaluate.attribute_probe(model, tok, proc, train_recs, test)
    evaluate.write_outputs(res, out / "eval", title=out.name)
    print(f"[demo] seed {seed}: {out.name} evaluated ({time.time() - t:.0f}s)")
    return res


def run(args, cfg):
    t0 = time.time()
    # The demo's tensors are tiny: one thread beat two here (a training step 4-7x faster on a busy
    # 2-core machine), since two threads mostly wait on each other.
    torch.set_num_threads(1)
    root = Path(args.demo_dir)
    data_dir, base = prepare(root)
    methods = tuple(args.demo_methods)
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        raise SystemExit(f"--demo-methods: unknown {unknown}; choose from {sorted(VARIANTS)}")
    per_seed = {s: run_seed(cfg, data_dir, base, root, s, methods) for s in args.seeds}
    for s, res in per_seed.items():
        print(f"\n## seed {s}\n")
        print(evaluate.compare_markdown({LABELS[m]: r for m, r in res.items()}))
    if len(per_seed) > 1:
        summary = aggregate(per_seed, methods)
        (root / "summary.md").write_text(summary)
        print("\n## mean over seeds (95% t-interval)\n")
        print(summary)
    print(f"\n[demo] done in {(time.time() - t0) / 60:.1f} min; outputs under {root}")


def aggregate(per_seed, methods):
    """Mean and 95% t-interval over seeds of each headline number (flattened from score())."""
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    rows = {}
    for s, res in per_seed.items():
        for m in methods:
            for k, v in evaluate.headline(res[m]).items():
                rows.setdefault(k, {}).setdefault(m, []).append(v)
    lines = ["| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k, by in rows.items():
        cells = []
        for m in methods:
            v = np.array(by[m])
            half = t95.get(len(v), 1.96) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            cells.append(f"{v.mean():.2f} ± {half:.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
