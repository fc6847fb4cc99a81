"""The vision tower (model.VisionTransformer) against reference implementations, and its loader.

timm, the tower's own reference, needs torchvision, so HF transformers serves as the test-only
oracle: `ViTModel` for the plain ViT (BiomedCLIP's trunk) and `Dinov2Model` for the LayerScale
variant (LLaVA-Rad's DINOv2-style tower). Both are built from our random weights converted to
their keys; HF's `hidden_states` are [embeddings, block 1, ..., block depth] before the final
norm, which is exactly what our `select_layer` indexes (with the CLS token dropped).
"""

import pytest
import torch

import checkpoint
from model import CheckpointError, VisionConfig, VisionTransformer

# Tiny towers. The plain one has 4 heads of 16; the loader reads the head count as width / 64 unless
# num_heads is given, so most towers written to disk below use width 128 with 2 heads.
VIT_CFG = VisionConfig(image_size=32, patch_size=8, width=64, depth=3, num_heads=4, mlp_dim=128)
LS_CFG = VisionConfig(image_size=42, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128, layer_scale=True)
DISK_CFG = VisionConfig(image_size=32, patch_size=16, width=128, depth=2, num_heads=2, mlp_dim=256)
DISK_LS_CFG = VisionConfig(image_size=42, patch_size=14, width=128, depth=3, num_heads=2, mlp_dim=256,
                           layer_scale=True)


def random_vit(cfg, seed=0):
    """A tower with every parameter random (norm weights, biases and LayerScale gammas included,
    so a mixed-up key or a skipped gamma cannot hide behind a default of 0 or 1)."""
    vit = VisionTransformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            # Linear/conv weights ~ 1/sqrt(fan_in) keep activations O(1) through the blocks.
            scale = p[0].numel() ** -0.5 if name.endswith("weight") and p.ndim > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return vit


def hf_state_dict(vit, flavour):
    """Our timm-layout keys -> HF ViTModel ("vit") or Dinov2Model ("dinov2") keys (transformers 5
    layout). The fused qkv projection is split in timm's order: rows [q; k; v]."""
    sd = vit.state_dict()
    out = {
        "embeddings.cls_token": sd.pop("cls_token"),
        "embeddings.position_embeddings": sd.pop("pos_embed"),
        "embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": sd.pop("patch_embed.proj.bias"),
        "layernorm.weight": sd.pop("norm.weight"),
        "layernorm.bias": sd.pop("norm.bias"),
    }
    block, names = {
        "vit": ("layers.{i}.", {"norm1": "layernorm_before", "norm2": "layernorm_after",
                                "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}),
        "dinov2": ("encoder.layer.{i}.", {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj",
                                          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}),
    }[flavour]
    for i in range(vit.config.depth):
        src, dst = f"blocks.{i}.", block.format(i=i)
        for kind in ("weight", "bias"):
            q, k, v = sd.pop(f"{src}attn.qkv.{kind}").chunk(3, dim=0)
            out.update({f"{dst}attention.q_proj.{kind}": q, f"{dst}attention.k_proj.{kind}": k,
                        f"{dst}attention.v_proj.{kind}": v})
            for ours, theirs in names.items():
                out[f"{dst}{theirs}.{kind}"] = sd.pop(f"{src}{ours}.{kind}")
        if vit.config.layer_scale:
            out[f"{dst}layer_scale1.lambda1"] = sd.pop(f"{src}ls1.gamma")
            out[f"{dst}layer_scale2.lambda1"] = sd.pop(f"{src}ls2.gamma")
    assert not sd, f"keys left unconverted: {sorted(sd)}"
    return out


@pytest.fixture(scope="module")
def vit_pair():
    from transformers import ViTConfig, ViTModel
    ours = random_vit(VIT_CFG)
    c = VIT_CFG
    hf = ViTModel(ViTConfig(hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                            intermediate_size=c.mlp_dim, image_size=c.image_size, patch_size=c.patch_size,
                            layer_norm_eps=c.eps, hidden_act="gelu", qkv_bias=True,
                            attn_implementation="eager"),
                  add_pooling_layer=False).eval()
    hf.load_state_dict(hf_state_dict(ours, "vit"), strict=True)
    return ours, hf


@pytest.fixture(scope="module")
def dinov2_pair():
    from transformers import Dinov2Config, Dinov2Model
    ours = random_vit(LS_CFG, seed=1)
    c = LS_CFG
    hf = Dinov2Model(Dinov2Config(hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                                  mlp_ratio=c.mlp_dim // c.width, image_size=c.image_size, patch_size=c.patch_size,
                                  layer_norm_eps=c.eps, hidden_act="gelu", qkv_bias=True,
                                  attn_implementation="eager")).eval()
    sd = hf_state_dict(ours, "dinov2")
    sd["embeddings.mask_token"] = hf.embeddings.mask_token.detach().clone()  # unused without a mask
    hf.load_state_dict(sd, strict=True)
    return ours, hf


def pixels(cfg, batch=2, seed=0):
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_hidden(hf, x, depth):
    hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hidden) == depth + 1  # embeddings + one per block: the indexing select_layer follows
    return hidden


@pytest.mark.parametrize("select_layer", [-2, -1, 1, 0])
@torch.no_grad()
def test_vit_matches_hf_vit(vit_pair, select_layer):
    ours, hf = vit_pair
    x = pixels(VIT_CFG)
    ref = hf_hidden(hf, x, VIT_CFG.depth)[select_layer][:, 1:]  # drop CLS, as LLaVA does
    got = ours(x, select_layer=select_layer)
    assert got.shape == (2, VIT_CFG.grid ** 2, VIT_CFG.width)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("select_layer", [-2, -1])
@torch.no_grad()
def test_layerscale_vit_matches_hf_dinov2(dinov2_pair, select_layer):
    ours, hf = dinov2_pair
    x = pixels(LS_CFG)
    # Dinov2 always routes the position embeddings through its bicubic interpolation; at the native
    # grid it must hand back the table untouched, or this would not be a like-for-like comparison.
    emb = torch.zeros(1, LS_CFG.grid ** 2 + 1, LS_CFG.width)
    assert hf.embeddings.interpolate_pos_encoding(emb, LS_CFG.image_size, LS_CFG.image_size) \
        is hf.embeddings.position_embeddings
    ref = hf_hidden(hf, x, LS_CFG.depth)[select_layer][:, 1:]
    torch.testing.assert_close(ours(x, select_layer=select_layer), ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_layerscale_gammas_are_applied(dinov2_pair):
    ours, _ = dinov2_pair
    x = pixels(LS_CFG)
    plain = VisionTransformer(LS_CFG).eval()
    plain.load_state_dict(ours.state_dict())
    for blk in plain.blocks:
        blk.ls1.gamma.fill_(1.0), blk.ls2.gamma.fill_(1.0)
    assert (plain(x, select_layer=-1) - ours(x, select_layer=-1)).abs().max() > 1e-2


def test_from_state_dict_head_dim():
    """The head count is invisible in the shapes: the loader assumes 64-wide heads (every
    BiomedCLIP/DINOv2 ViT-B); other towers need head_dim (or the loader's num_heads) given."""
    sd = random_vit(VIT_CFG).state_dict()
    assert VisionConfig.from_state_dict(sd, head_dim=16) == VIT_CFG
    assert VisionConfig.from_state_dict(random_vit(DISK_CFG).state_dict()) == DISK_CFG
    with pytest.raises(CheckpointError, match="num_heads"):  # width 32 is no multiple of 64
        VisionConfig.from_state_dict(VisionTransformer(VisionConfig.tiny()).state_dict())


@torch.no_grad()
def test_load_with_num_heads(tmp_path):
    """A tower whose heads are not 64 wide loads right when num_heads is passed."""
    vit = random_vit(VIT_CFG, seed=4)
    torch.save({f"visual.trunk.{k}": v for k, v in vit.state_dict().items()}, tmp_path / "open_clip_pytorch_model.bin")
    loaded = checkpoint.load_vision_tower(tmp_path, num_heads=VIT_CFG.num_heads)
    assert loaded.config == VIT_CFG
    x = pixels(VIT_CFG)
    assert torch.equal(loaded(x), vit(x))


# ----------------------------------------------------------------------------------------------
# load_vision_tower on open_clip-style files


@torch.no_grad()
def test_load_open_clip_checkpoint(tmp_path):
    """(a) BiomedCLIP's layout: `visual.trunk.*` next to text tower, head and logit_scale keys."""
    vit = random_vit(DISK_CFG, seed=2)
    sd = {f"visual.trunk.{k}": v for k, v in vit.state_dict().items()}
    sd.update({"visual.head.proj.weight": torch.randn(16, DISK_CFG.width), "logit_scale": torch.tensor(4.6),
               "text.transformer.embeddings.word_embeddings.weight": torch.randn(10, 8)})
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    loaded = checkpoint.load_vision_tower(tmp_path)  # a folder: the file is found by name
    assert loaded.config == DISK_CFG
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen tower
    x = pixels(DISK_CFG)
    assert torch.equal(loaded(x), vit(x))
    half = checkpoint.load_vision_tower(tmp_path / "open_clip_pytorch_model.bin", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


@torch.no_grad()
def test_load_llava_rad_checkpoint(tmp_path):
    """(b) LLaVA-Rad's layout: a `state_dict` wrapper, DDP `module.` prefix, patch 14, LayerScale;
    image size, patch, depth and LayerScale are all read off the tensor shapes."""
    vit = random_vit(DISK_LS_CFG, seed=3)
    inner = {f"module.visual.trunk.{k}": v for k, v in vit.state_dict().items()}
    inner["module.visual.head.proj.weight"] = torch.randn(16, DISK_LS_CFG.width)
    path = tmp_path / "biomedclip_cxr_518.pt"
    torch.save({"state_dict": inner, "epoch": 3}, path)
    loaded = checkpoint.load_vision_tower(path)
    c = loaded.config
    assert (c.image_size, c.patch_size, c.depth, c.width, c.mlp_dim, c.layer_scale) == (42, 14, 3, 128, 256, True)
    x = pixels(DISK_LS_CFG)
    assert torch.equal(loaded(x), vit(x))


def test_load_without_trunk_keys(tmp_path):
    torch.save({"text.proj.weight": torch.randn(4, 4), "logit_scale": torch.tensor(1.0)}, tmp_path / "clip.bin")
    with pytest.raises(CheckpointError, match=r"no 'visual\.trunk\.\*' tensors"):
        checkpoint.load_vision_tower(tmp_path / "clip.bin")


def test_load_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="open_clip_pytorch_model.bin"):
        checkpoint.load_vision_tower(tmp_path)


@pytest.mark.parametrize("key, change", [
    ("blocks.1.attn.proj.weight", "reshape"),  # mis-shaped
    ("blocks.0.norm2.bias", "drop"),  # missing, not shape-defining: caught by the strict load
    ("pos_embed", "drop"),  # missing and needed to read the architecture
    ("blocks.1.ls1.gamma", "add"),  # unexpected: a stray gamma (LayerScale is read off block 0)
])
def test_load_bad_trunk_names_the_key(tmp_path, key, change):
    sd = {f"visual.trunk.{k}": v for k, v in random_vit(DISK_CFG).state_dict().items()}
    full = f"visual.trunk.{key}"
    if change == "reshape":
        sd[full] = sd[full][:, :-1]
    elif change == "drop":
        del sd[full]
    else:
        sd[full] = torch.ones(DISK_CFG.width)
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        checkpoint.load_vision_tower(tmp_path)


@pytest.mark.parametrize("shape", [(2, 3, 48, 48), (2, 1, 32, 32), (3, 32, 32)])
def test_wrong_image_shape(shape):
    vit = VisionTransformer(DISK_CFG)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        vit(torch.zeros(shape))
