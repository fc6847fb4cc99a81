"""Checkpoints in the official layouts, read and written: the weights model.py's modules take.

- Llama / Vicuna: an HF folder or hub id (config.json + safetensors or pickled .bin, sharded with
  an index json or not) -> model.Llama (`load_llama`); `save_llama` writes that layout back.
- the vision tower: an open_clip checkpoint (BiomedCLIP, LLaVA-Rad's BiomedCLIP-CXR), its
  `visual.trunk.*` tensors -> model.VisionTransformer, the architecture read off the shapes
  (`load_vision_tower`).
- the projector: LLaVA's mm_projector.bin or LLaVA-Rad's non_lora_trainables.bin -> the
  `mm_projector` (`load_projector`); `load_llava` puts the three together into a model.LlavaModel.

Module names in model.py mirror the checkpoint keys, so every load is a strict load_state_dict with
no key map, and every mismatch goes through the one reporter, `check_state_dict`, which names the
file and the missing, unexpected and mis-shaped keys (a CheckpointError).
"""

import json
import re
from dataclasses import fields
from pathlib import Path

import torch

from model import CheckpointError, Llama, LlamaConfig, LlavaModel, VisionConfig, VisionTransformer, build_projector


def resolve_path(path_or_repo, allow_patterns=None, cache_only=False):
    """A local file/folder, or a hub repo id fetched (or found in the local cache) through
    huggingface_hub. Nothing here is needed by the tests or the demo, which use local folders.
    cache_only: never download (the preflight checks what is already here, in seconds)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_repo)):
        raise FileNotFoundError(f"{path_or_repo}: no such file or folder (and not a hub repo id 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(path_or_repo), allow_patterns=allow_patterns, local_files_only=cache_only))
    except FileNotFoundError as e:
        if cache_only:  # not cached, or cached in part. The hub's own advice names its arguments
            # (local_files_only=False), which are no flags of ours: say what to run instead
            raise FileNotFoundError(
                f"{path_or_repo}: not a local path, and not (completely) in the local hub cache; the preflight never "
                f"downloads. Download it first: {download_command(path_or_repo, allow_patterns)}; or pass a local "
                "folder instead of the id") from e
        raise FileNotFoundError(f"{path_or_repo}: not a local path, and the hub download failed: {e}") from e
    except Exception as e:  # offline, unknown repo, gated, no huggingface_hub...: say which and why
        how = "the local hub cache could not be read" if cache_only else "the hub download failed"
        raise FileNotFoundError(f"{path_or_repo}: not a local path, and {how}: {e}") from e


def download_command(repo, allow_patterns=None):
    """The shell command that fetches `repo` into the local hub cache as resolve_path would."""
    patterns = f", allow_patterns={list(allow_patterns)!r}" if allow_patterns else ""
    return f"python3 -c \"from huggingface_hub import snapshot_download; snapshot_download('{repo}'{patterns})\""


def load_tensors(path):
    """One weights file -> {key: tensor}. Pickled .bin files load with weights_only=True (no code
    runs from the file) and mmap=True (tensors stay on disk until used)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: could not read weights ({type(e).__name__}: {e})") from e


def weight_files(folder):
    """The weight files of an HF model folder: sharded (index json) or single, safetensors first."""
    folder = Path(folder)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / f for f in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no weights found (looked for model.safetensors[.index.json] "
                          f"and pytorch_model.bin[.index.json])")


def _listed(items, n=8, sep=", "):
    """The first n of the sorted items, then how many there are in all."""
    items = sorted(items)
    return sep.join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def check_state_dict(expected, got, source):
    """The project's one strict-load check: raise CheckpointError naming the source and every
    missing, unexpected and mis-shaped key of `got` ({key: tensor}) against `expected`."""
    missing = expected.keys() - got.keys()
    unexpected = got.keys() - expected.keys()
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected.keys() & got.keys() if got[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        msg = [f"{source}: checkpoint does not match the model"]
        if missing:
            msg.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_listed(unexpected)}")
        if shapes:
            msg.append(f"shape mismatches: {_listed(shapes, sep='; ')}")
        raise CheckpointError("\n  ".join(msg))


def assign_checkpoint(module, sd, source):
    """Strict load with a readable error (check_state_dict). `assign=True` makes a model built on
    the meta device take the loaded tensors themselves, so a 7B load holds one copy of the
    weights, not two."""
    check_state_dict(module.state_dict(keep_vars=True), sd, source)
    # a NaN or inf weight makes every output NaN: say which tensor, rather than score empty reports
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: non-finite values (NaN or inf) in {_listed(bad)}")
    for k, v in sd.items():  # tensors read from a file can start anywhere: align them (see fast.linear)
        if v.device.type == "cpu" and v.data_ptr() % 64:
            sd[k] = v.clone()  # one tensor at a time: its unaligned copy is freed as the next is made
    module.load_state_dict(sd, strict=True, assign=True)


def _cast(sd, dtype, device="cpu"):
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def llama_config_from_hf(cfg, source="config.json"):
    """Read an HF config.json dict. Fields that would change the math and that this
    implementation does not do (rope scaling, biases, other activations) are refused rather
    than ignored, so a model never runs with silently wrong numbers."""
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type {cfg['model_type']!r} is not supported (expected 'llama')")
    unsupported = {
        "rope_scaling": lambda v: v not in (None, {}),
        "attention_bias": bool, "mlp_bias": bool,
        "hidden_act": lambda v: v != "silu",
        "head_dim": lambda v: v is not None and v * cfg.get("num_attention_heads", 0) != cfg.get("hidden_size"),
    }
    for key, bad in unsupported.items():
        if key in cfg and bad(cfg[key]):
            raise CheckpointError(f"{source}: field {key}={cfg[key]!r} is not supported by this implementation")
    # rope_theta has three spellings: absent (Llama-2, default 10000), top-level, or nested.
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(cfg.get("rope_parameters"), dict):
        rp = cfg["rope_parameters"]
        if rp.get("rope_type", "default") != "default":
            raise CheckpointError(f"{source}: rope_parameters.rope_type={rp['rope_type']!r} is not supported")
        theta = rp.get("rope_theta")
    kw = {f.name: cfg[f.name] for f in fields(LlamaConfig) if f.name in cfg and cfg[f.name] is not None}
    kw.pop("rope_theta", None)
    kw.setdefault("num_key_value_heads", kw.get("num_attention_heads", LlamaConfig.num_attention_heads))
    for key in ("bos_token_id", "eos_token_id"):  # Llama-3 writes lists of ids
        if isinstance(kw.get(key), list):
            kw[key] = kw[key][0]
    try:
        return LlamaConfig(rope_theta=10000.0 if theta is None else theta, **kw)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_config(cfg):
    """LlamaConfig -> the config.json dict HF writes for it."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
    return d


def read_llama_config(folder):
    """folder/config.json -> LlamaConfig; a missing or malformed file is a CheckpointError naming it."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: config.json not found")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object of model settings, got {type(raw).__name__}")
    return llama_config_from_hf(raw, source=str(cfg_path))


def _llama_keys(sd, cfg):
    """The checkpoint's tensors as the model names them: old HF checkpoints saved the rotary
    inv_freq buffer (we recompute it), and a tied checkpoint may omit lm_head."""
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def load_llama(path_or_repo, dtype=torch.float32, device="cpu"):
    """An HF Llama/Vicuna folder or hub id -> Llama. Built on the meta device, then the checkpoint's
    tensors are assigned shard by shard (cast to dtype), so memory peaks at one copy."""
    folder = resolve_path(path_or_repo, ["*.json", "*.safetensors", "*.bin", "tokenizer*"])
    cfg = read_llama_config(folder)
    with torch.device("meta"):
        model = Llama(cfg)
    sd = {}
    for f in weight_files(folder):  # cast shard by shard: the uncast copy of one shard at most
        shard = {k: v for k, v in load_tensors(f).items() if not k.endswith("rotary_emb.inv_freq")}
        sd.update(_cast(shard, dtype, device))
    assign_checkpoint(model, _llama_keys(sd, cfg), str(folder))
    if cfg.tie_word_embeddings:  # assign replaced the Parameter objects; tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_llama(model, folder):
    """Write an HF-layout folder: config.json + model.safetensors."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(model.config), indent=2))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _vision_file(path):
    path = Path(path)
    if path.is_file():
        return path
    for name in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: no vision checkpoint (looked for open_clip_pytorch_model.bin, "
                          f"open_clip_model.safetensors, pytorch_model.bin)")


def _vision_heads(f, num_heads):
    """num_heads if given, else the `heads` of open_clip_config.json's vision_cfg beside the weights."""
    config_file = Path(f).parent / "open_clip_config.json"
    if num_heads is None and config_file.is_file():
        try:
            num_heads = json.loads(config_file.read_text())["model_cfg"]["vision_cfg"].get("heads")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{config_file}: expected model_cfg.vision_cfg in open_clip's layout ({e!r})") from None
    return num_heads


def _vision_trunk(sd, f):
    """The `visual.trunk.*` tensors of an open_clip state dict (a `state_dict` wrapper and a DDP
    `module.` prefix allowed), with that prefix removed."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    prefix = "visual.trunk."
    trunk = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith(prefix):
            trunk[k[len(prefix):]] = v
    if not trunk:
        raise CheckpointError(f"{f}: no '{prefix}*' tensors (is this an open_clip ViT checkpoint?)")
    return trunk


def _vision_config(trunk, num_heads, f):
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise CheckpointError(f"{f}: the vision head count (--vision-heads, or heads in open_clip_config.json) "
                              f"must be an integer >= 1, got {num_heads!r}")
    if "cls_token" in trunk and num_heads is not None:
        return VisionConfig.from_state_dict(trunk, head_dim=trunk["cls_token"].shape[-1] // num_heads, source=str(f))
    return VisionConfig.from_state_dict(trunk, source=str(f))


def load_vision_tower(path_or_repo, dtype=torch.float32, num_heads=None):
    """An open_clip checkpoint (BiomedCLIP, or LLaVA-Rad's BiomedCLIP-CXR) -> VisionTransformer.
    Accepts a `state_dict` wrapper and a DDP `module.` prefix; keeps the `visual.trunk.` tensors.
    The head count is the one thing the shapes do not show: num_heads if given, else the `heads` of
    the vision_cfg in open_clip_config.json beside the weights when it names one, else width / 64
    (every ViT-B, BiomedCLIP's included: its config names a timm model, not a head count)."""
    f = _vision_file(resolve_path(path_or_repo, ["*.json", "*.bin", "*.safetensors"]))
    num_heads = _vision_heads(f, num_heads)
    trunk = _vision_trunk(load_tensors(f), f)
    cfg = _vision_config(trunk, num_heads, f)
    with torch.device("meta"):
        vit = VisionTransformer(cfg)
    assign_checkpoint(vit, _cast(trunk, dtype), str(f))
    return vit.requires_grad_(False)


def _projector_keys(sd, path):
    """Any key ending in `mm_projector.{0,2}.{weight,bias}`, whatever its prefix, without the prefix."""
    found = {k.split("mm_projector.", 1)[1]: v for k, v in sd.items() if "mm_projector." in k}
    if not found:
        raise CheckpointError(f"{path}: no 'mm_projector.*' keys (found: {_listed(sd)})")
    return found


def load_projector(projector, path):
    """Fill an mm_projector from `mm_projector.bin` or LLaVA-Rad's `non_lora_trainables.bin`:
    any key ending in `mm_projector.{0,2}.{weight,bias}`, whatever its prefix."""
    found = _projector_keys(load_tensors(path), path)
    dtype = projector[0].weight.dtype
    assign_checkpoint(projector, _cast(found, dtype), str(path))
    return projector


def load_llava(llm_path, vision_path, projector_path=None, dtype=torch.float32, device="cpu",
               vision_heads=None):
    """Vicuna + BiomedCLIP tower (+ a trained projector) -> LlavaModel, one copy of each weight."""
    llm = load_llama(llm_path, dtype=dtype, device=device)
    vit = load_vision_tower(vision_path, dtype=dtype, num_heads=vision_heads).to(device)
    with torch.device("meta"):
        model = LlavaModel(llm.config, vit.config)
    model.llm, model.vision_tower = llm, vit
    model.mm_projector = build_projector(vit.config.width, llm.config.hidden_size).to(device=device, dtype=dtype)
    if projector_path is not None:
        load_projector(model.mm_projector, projector_path)
    return model
