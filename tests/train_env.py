"""What the training tests share: a tiny synthetic data set with tiny base models written in the
official layouts, and a TrainConfig for them built from flat names."""

from dataclasses import fields

import torch

import synthetic
import train
from checkpoint import save_llama
from data import load_tokenizer
from fairness import FairnessConfig
from lora import LoRAConfig
from model import Llama, LlamaConfig, VisionConfig, VisionTransformer


def make_env(root):
    cfg = synthetic.SyntheticConfig(n_pretrain=24, n_train=24, n_val=8, n_test=4, n_swap=2, size=32, vocab_size=300)
    synthetic.make_synthetic(root / "data", cfg)
    tok = load_tokenizer(root / "data" / "tokenizer.json")
    torch.manual_seed(0)
    save_llama(Llama(LlamaConfig.tiny(vocab_size=tok.get_vocab_size())), root / "llm")
    vit = VisionTransformer(VisionConfig.tiny())
    (root / "vision").mkdir()
    torch.save({f"visual.trunk.{k}": v for k, v in vit.state_dict().items()}, root / "vision" / "open_clip_pytorch_model.bin")
    return root


def train_config(env, out, **kw):
    base = dict(llm=str(env / "llm"), vision=str(env / "vision"), vision_heads=2,
                tokenizer=str(env / "data" / "tokenizer.json"), train_json=str(env / "data" / "train.json"),
                out=str(out), method="lora", lora_r=4, lora_alpha=8.0, lora_dropout=0.0, batch_size=4, grad_accum=1,
                num_workers=0, max_length=256, grad_checkpointing=False, lr=1e-3, dac_lr=1e-3, seed=3,
                warmup_ratio=0.0, log_every=1, save_every=1000)
    base.update(kw)
    # the flat names the tests use for the nested LoRA and fairness configs
    lora = {k[5:]: base.pop(k) for k in [k for k in base if k.startswith("lora_")]}
    fair = {k: base.pop(k) for k in [k for k in base if k in {f.name for f in fields(FairnessConfig)}]}
    return train.TrainConfig(**base, lora=LoRAConfig(**lora), fair=FairnessConfig(**fair))
