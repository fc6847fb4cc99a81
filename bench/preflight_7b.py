"""How long `train.py --preflight` takes on a run of the official size: Vicuna-7B + BiomedCLIP
ViT-B/16 + a stage-1 projector + an r-64 PEFT adapter, every file in its released layout.

The checkpoints are written as safetensors files whose headers are real (every key, dtype and
shape of the 7B model) and whose data regions are sparse: the file is extended with seek +
truncate, so a "13 GB" shard takes no disk. The preflight reads headers only, so it sees exactly
what it would see in the real files. The training data is the small synthetic benchmark (its
tokenizer fits in the 32k embedding); its images are decoded as in a real preflight.

    python bench/preflight_7b.py             # prints the preflight table and its wall time
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import synthetic  # noqa: E402
from lora import LoRAConfig, apply_lora, lora_state_dict, PEFT_PREFIX  # noqa: E402
from model import Llama, LlamaConfig, VisionConfig, VisionTransformer, build_projector  # noqa: E402

DTYPE_NAMES = {torch.float16: ("F16", 2), torch.float32: ("F32", 4)}


def write_sparse_safetensors(path, shapes, dtype=torch.float16):
    """A safetensors file with a real header for {key: shape} and a sparse, all-zero data region."""
    name, size = DTYPE_NAMES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        n = size * int(torch.Size(shape).numel())
        header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)  # the hole: no blocks are allocated
    return offset


def meta_shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write_vicuna(folder, n_shards=2):
    """config.json + model-0000k-of-0000n.safetensors + model.safetensors.index.json, as released."""
    folder.mkdir(parents=True)
    cfg = LlamaConfig()  # lmsys/vicuna-7b-v1.5
    (folder / "config.json").write_text(json.dumps({**checkpoint.hf_config(cfg), "torch_dtype": "float16"}, indent=2))
    with torch.device("meta"):
        shapes = meta_shapes(Llama(cfg))
    keys = list(shapes)
    weight_map, total = {}, 0
    for i in range(n_shards):
        part = keys[i * len(keys) // n_shards:(i + 1) * len(keys) // n_shards]
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        total += write_sparse_safetensors(folder / name, {k: shapes[k] for k in part})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return cfg, total


def write_biomedclip(folder):
    """open_clip_model.safetensors with BiomedCLIP's visual.trunk.* (ViT-B/16, 224 px) and its config."""
    folder.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {f"visual.trunk.{k}": v for k, v in meta_shapes(VisionTransformer(VisionConfig())).items()}
    shapes["visual.head.proj.weight"] = (512, 768)  # open_clip's projection to the joint space (unused)
    write_sparse_safetensors(folder / "open_clip_model.safetensors", shapes, torch.float32)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 512, "vision_cfg": {
        "timm_model_name": "vit_base_patch16_224", "timm_pool": "", "timm_proj": "linear", "image_size": 224}}}))


def write_stage2_inputs(root, cfg):
    """A stage-1 projector and LLaVA-Rad's r-64 adapter, as sparse safetensors."""
    with torch.device("meta"):
        proj = build_projector(768, cfg.hidden_size)
        llm = Llama(cfg)
        apply_lora(llm, LoRAConfig())
    write_sparse_safetensors(root / "mm_projector.safetensors",
                             {f"model.mm_projector.{k}": v for k, v in meta_shapes(proj).items()}, torch.float32)
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 64, "lora_alpha": 128, "lora_dropout": 0.05,
        "target_modules": list(LoRAConfig().targets), "bias": "none"}))
    write_sparse_safetensors(root / "adapter" / "adapter_model.safetensors",
                             {PEFT_PREFIX + k: tuple(v.shape) for k, v in lora_state_dict(llm).items()})


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help; no options
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.time()
        cfg, total = write_vicuna(root / "vicuna-7b-v1.5")
        write_biomedclip(root / "biomedclip")
        write_stage2_inputs(root, cfg)
        synthetic.make_synthetic(root / "data", synthetic.SyntheticConfig(
            n_pretrain=24, n_train=240, n_val=8, n_test=8, n_swap=2, size=64, vocab_size=1000))
        used = sum(f.stat().st_blocks * 512 for f in root.rglob("*.safetensors"))
        print(f"wrote the 7B layout in {time.time() - t0:.1f}s: {total / 1e9:.1f} GB of LLM tensors, "
              f"{used / 1e6:.1f} MB on disk (sparse)")
        argv = [sys.executable, str(ROOT / "train.py"), "--preflight", "--llm", str(root / "vicuna-7b-v1.5"),
                "--vision", str(root / "biomedclip"), "--tokenizer", str(root / "data" / "tokenizer.json"),
                "--train-json", str(root / "data" / "train.json"), "--projector", str(root / "mm_projector.safetensors"),
                "--adapter", str(root / "adapter"), "--out", str(root / "run"), "--world-size", "8"]
        t0 = time.time()
        r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.time() - t0
        print(r.stdout + r.stderr, end="")
        print(f"train.py --preflight on the 7B layout: exit {r.returncode}, wall time {wall:.2f}s "
              f"(python + torch start-up included)")
        return r.returncode


if __name__ == "__main__":
    sys.exit(main())
