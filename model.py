"""The LLaVA-style model of FairLLaVA, written from scratch: Llama/Vicuna + ViT + projector.

FairLLaVA (CVPR 2026, arXiv 2603.26008) fine-tunes LLaVA-Rad: a Vicuna-7B-v1.5 language model
(the Llama-2 architecture) that reads the patch tokens of a frozen BiomedCLIP vision tower through
a two-layer MLP "projector" (Sec. 3, "Overall architecture"). This file holds the architecture:

- `LlamaConfig` / `Llama`: RMSNorm, rotary embeddings, grouped-query attention (with an optional
  KV cache), SwiGLU MLP. Module names mirror the Hugging Face keys exactly, so an HF checkpoint
  loads with a strict `load_state_dict` and no key map.
- `VisionConfig` / `VisionTransformer`: a timm-layout ViT whose hyper-parameters are read off the
  checkpoint's tensor shapes (stock BiomedCLIP ViT-B/16 at 224 px, LLaVA-Rad's ViT-B/14 at 518 px).
- `LlavaModel`: image patch tokens -> `mm_projector` -> spliced into the text embeddings where
  input_ids holds the image sentinel -200 (LLaVA's convention).
- the LM loss: `lm_loss` on logits (the definition), `causal_lm_loss` on the last hidden state
  (what training uses: the same number without ever holding the (B, T, vocab) logits).

Elsewhere:
- checkpoint.py: loading and saving the official layouts (HF Llama folders or hub ids, safetensors
  or pickled .bin, sharded or not; the open_clip vision tower; LLaVA's projector), `load_llava`,
  and the one strict-load reporter `check_state_dict`.
- generate.py: `KVCache` (what Llama.forward's `cache` argument takes), `generate` and the
  fixed-shape `decode_step` torch.compile captures; `python generate.py --llm ... --prompt ...`.
- fast.py: the speed paths, each beside the plain version it replaces: `Linear` (nn.Linear, faster
  for few-row products on CPU), the chunked cross-entropy behind `causal_lm_loss`, LoRA's dropout
  and fused forward.
- data.py: the tokenizer and the conversation template.

Run `python model.py` for a smoke test: a tiny random LLaVA does a forward pass with the LM loss
on CPU in about a second.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Linear is nn.Linear (same parameters and keys) with a faster CPU path for few-row products
from fast import LOSS_CHUNK_ELEMENTS, Linear, linear_cross_entropy

IMAGE_TOKEN_INDEX = -200  # sentinel id standing for "the image goes here" in input_ids
IGNORE_INDEX = -100  # label value that the LM loss skips


class CheckpointError(ValueError):
    """A checkpoint or config that does not fit the model; the message names the file and keys."""


def _check_int(name, value, low, high, what="an integer"):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"{name} must be {what} in {low}..{high}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Llama / Vicuna


@dataclass
class LlamaConfig:
    # Defaults are lmsys/vicuna-7b-v1.5's config.json (the Llama-2-7B architecture).
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads means grouped-query attention
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        """One validation of the settings, wherever a config comes from (config.json through
        checkpoint.llama_config_from_hf, the preflight, the tests): types, ranges, finiteness, divisibility."""
        # the ceilings are far above any real model; they turn a typo such as 1e12 layers into a refusal, not a hang
        for name, ceiling in (("vocab_size", 2 ** 24), ("hidden_size", 2 ** 20), ("intermediate_size", 2 ** 22),
                              ("num_hidden_layers", 4096), ("num_attention_heads", 2 ** 14),
                              ("num_key_value_heads", 2 ** 14), ("max_position_embeddings", 2 ** 24)):
            _check_int(name, getattr(self, name), 1, ceiling)
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise CheckpointError(f"{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise CheckpointError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            _check_int(name, getattr(self, name), 0, self.vocab_size - 1, what="a token id")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"hidden_size {self.hidden_size} is not divisible by "
                                  f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim {self.head_dim} (hidden_size / num_attention_heads) must be even "
                                  f"for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                                  f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides):
        """A few-hundred-thousand-parameter Llama for tests and the CPU demo."""
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        kw.update(overrides)
        return cls(**kw)




class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, as the HF/Meta Llama code does;
        # in bf16 the mean of squares would lose precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables (B, T, head_dim) for rotary embeddings (Su et al. 2021), HF layout:
    frequencies duplicated as cat(freqs, freqs) to pair with `rotate_half`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x (B, nh, T, hd); cos/sin (B, T, hd). HF checkpoints permute q/k weights for this
    # half-split convention, so no permutation is needed at load time.
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, nkv, S, hd), S = past + T
        # Grouped-query attention: each kv head serves n_head / n_kv query heads; enable_gqa lets
        # the kernel share them instead of copying the (cached) keys and values.
        gqa = self.n_kv != self.n_head
        if mask is None:  # no padding, no cache: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer_idx=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Holds the `model.*` keys of an HF LlamaForCausalLM checkpoint."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask_4d(attention_mask, past, T):
    """Boolean (B, 1, T, S) mask: query t (absolute position past+t) may see key s when s is a real
    token and s <= past+t. A padding query may always see itself, so no row is all-False (that
    would give NaN in softmax); its output is never used."""
    B, S = attention_mask.shape
    q_pos = torch.arange(past, past + T, device=attention_mask.device)
    k_pos = torch.arange(S, device=attention_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    mask = causal[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache=None, return_hidden=False, last_only=False, head=True):
        """logits (B, T, vocab); with return_hidden also the list of n_layers + 1 hidden states in
        HF's `hidden_states` order: the embeddings, then each decoder layer's output, the last one
        after the final RMSNorm (as HF returns it). head=False returns that last hidden state
        (B, T, H) in place of the logits: training feeds it to `causal_lm_loss`, which applies
        lm_head itself, to the supervised positions only.

        attention_mask (B, S) covers the cached tokens plus the new ones (1 real, 0 padding).
        position_ids default to each sample's count of real tokens so far, which is what left-padded
        batched generation needs and equals 0..T-1 for right-padded training batches."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        mask = None
        if cache is not None or (attention_mask is not None and not bool(attention_mask.all())):
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
            mask = attention_mask_4d(attention_mask, past, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)

        hidden = [x]
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute activations in backward instead of storing them (official config).
                x = checkpoint(layer, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
            hidden.append(x)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        hidden[-1] = x
        if head:  # generation needs only the last position's logits: skip the (B, T, vocab) projection
            x = self.lm_head(x[:, -1:] if last_only else x)
        return (x, hidden) if return_hidden else x


# ----------------------------------------------------------------------------------------------
# Vision transformer (timm key layout, as inside open_clip's BiomedCLIP `visual.trunk`)


@dataclass
class VisionConfig:
    # Defaults: BiomedCLIP's ViT-B/16 at 224 px. LLaVA-Rad's tower is ViT-B/14 at 518 px with LayerScale.
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layer_scale: bool = False
    eps: float = 1e-6
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        for name, ceiling in (("image_size", 2 ** 14), ("patch_size", 2 ** 10), ("width", 2 ** 16), ("depth", 1024),
                              ("num_heads", 2 ** 10), ("mlp_dim", 2 ** 18)):
            _check_int(name, getattr(self, name), 1, ceiling)
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < math.inf):
            raise CheckpointError(f"vision eps must be a finite number > 0, got {self.eps!r}")

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @classmethod
    def tiny(cls, **overrides):
        kw = dict(image_size=32, patch_size=8, width=32, depth=3, num_heads=2, mlp_dim=64)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_state_dict(cls, sd, head_dim=64, source="checkpoint"):
        """Read the architecture off tensor shapes (as openai/CLIP does). The head count is not
        visible in the shapes; every BiomedCLIP/DINOv2 ViT-B uses head_dim 64."""
        try:
            width = sd["cls_token"].shape[-1]
            patch = sd["patch_embed.proj.weight"].shape[-1]
            n_pos = sd["pos_embed"].shape[1]
            mlp_dim = sd["blocks.0.mlp.fc1.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"{source}: vision tower key {e.args[0]!r} is missing") from None
        grid = math.isqrt(n_pos - 1)
        if grid * grid != n_pos - 1:
            raise CheckpointError(f"{source}: pos_embed has {n_pos} positions, expected 1 + a square grid")
        if width % head_dim:
            raise CheckpointError(f"{source}: width {width} is not a multiple of head_dim {head_dim}; "
                                  f"pass num_heads explicitly")
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        return cls(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                   num_heads=width // head_dim, mlp_dim=mlp_dim, layer_scale="blocks.0.ls1.gamma" in sd)


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)


class VitAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class VitMlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class VitBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = VitAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = VitMlp(cfg)
        self.ls1 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.ls2 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid ** 2 + 1, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(VitBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, pixels, select_layer=-2):
        """Patch tokens (B, grid^2, width) of one block's output, CLS dropped, no final norm —
        LLaVA's feature choice. select_layer indexes [embeddings, block 1, ..., block depth] as
        HF's hidden_states do, so -2 is the penultimate block."""
        S = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (S, S):
            raise ValueError(f"vision tower expects images of shape (B, 3, {S}, {S}), got {tuple(pixels.shape)}")
        depth = len(self.blocks)
        if not -(depth + 1) <= select_layer <= depth:
            raise ValueError(f"select_layer {select_layer} is out of range for a {depth}-block tower "
                             f"(valid: {-(depth + 1)} .. {depth})")
        n_blocks = select_layer % (depth + 1)
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, C)
        for blk in self.blocks[:n_blocks]:
            x = blk(x)
        return x[:, 1:]


# ----------------------------------------------------------------------------------------------
# LLaVA: vision tower -> projector -> language model


def build_projector(vision_width, hidden_size):
    """LLaVA's `mlp2x_gelu`: keys mm_projector.0.* and mm_projector.2.*."""
    return nn.Sequential(nn.Linear(vision_width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


@dataclass
class LlavaOutput:
    logits: torch.Tensor | None  # (B, T', V) on the expanded sequence (sentinel -> image patches)
    loss: torch.Tensor | None
    hidden: list | None  # n_layers + 1 tensors (B, T', H)
    attention_mask: torch.Tensor  # (B, T')
    labels: torch.Tensor | None  # (B, T')
    image_mask: torch.Tensor  # (B, T') True at image-patch positions


def lm_loss(logits, labels, sample_weight=None, normalizer=None):
    """Causal LM cross-entropy: position t predicts token t+1, over labels != IGNORE_INDEX.
    With sample_weight (B,) (the reweighting baseline) each sample's tokens count w_i times:
    sum_i w_i sum_t l_it / sum_i w_i n_i. `normalizer` replaces the denominator: training divides
    by the supervised-token count of the whole step (all micro-batches, all ranks), so that the
    gradient does not depend on how a batch is split across GPUs and accumulation steps."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    logits, labels = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)  # (B, T-1)
    w = (labels != IGNORE_INDEX).float()
    if sample_weight is not None:
        w = w * sample_weight.float()[:, None]
    return (tok * w).sum() / (w.sum().clamp(min=1e-8) if normalizer is None else normalizer)


def causal_lm_loss(hidden, lm_head_weight, labels, sample_weight=None, normalizer=None,
                   chunk_elements=LOSS_CHUNK_ELEMENTS):
    """lm_loss(hidden @ lm_head_weight^T, labels, sample_weight, normalizer), computed without the
    (B, T, vocab) logits: only the supervised positions (labels[t + 1] != IGNORE_INDEX) go through
    lm_head, a chunk of rows at a time (fast.linear_cross_entropy), and each chunk's gradient is
    formed while its logits exist:

        d loss / d logits_i = w_i (softmax(logits_i) - onehot(y_i)),   w_i = token weight / denominator

    so what outlives a chunk is the gradient for its rows of `hidden` (and for lm_head_weight,
    when it is trained), not the logits. Equal to lm_loss to fp32 rounding (tests/test_fast.py);
    in LLaVA training most positions (image patches, prompt) are not supervised and never reach
    lm_head. The logits are computed in the dtype autocast gives F.linear and the cross-entropy in
    fp32, as lm_loss does after `.float()`. Differentiable once (no double backward)."""
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    sel = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    w = sel.float() if sample_weight is None else sel * sample_weight.float()[:, None]
    w = w / (w.sum().clamp(min=1e-8) if normalizer is None else normalizer)
    rows, targets, w = hidden[:, :-1][sel], labels[:, 1:][sel], w[sel]  # (N, H), (N,), (N,)
    return linear_cross_entropy(rows, lm_head_weight, targets, w, chunk_elements)


def supervised_weight(labels, sample_weight=None):
    """The denominator lm_loss uses: (weighted) number of supervised tokens. The first position
    is never a target, so this can be read off the text labels before the image is spliced in."""
    n = (labels[:, 1:] != IGNORE_INDEX).float().sum(1)
    return (n if sample_weight is None else n * sample_weight.float()).sum()


class LlavaModel(nn.Module):
    def __init__(self, llm_cfg, vision_cfg):
        super().__init__()
        self.vision_tower = VisionTransformer(vision_cfg)
        self.mm_projector = build_projector(vision_cfg.width, llm_cfg.hidden_size)
        self.llm = Llama(llm_cfg)
        self.vision_tower.requires_grad_(False)  # frozen in both stages (paper Sec. 3)
        self.select_layer = -2

    def encode_images(self, pixel_values):
        with torch.no_grad():  # the tower is frozen: no activations kept for backward
            feats = self.vision_tower(pixel_values, self.select_layer)
        return self.mm_projector(feats.to(self.mm_projector[0].weight.dtype))  # (B, N, H)

    def prepare_inputs(self, input_ids, pixel_values, attention_mask, labels=None):
        """Replace each sample's single -200 sentinel by its N projected patch embeddings. Every
        sample grows by N - 1 tokens, so a right-padded (or left-padded) batch keeps its layout."""
        B, T = input_ids.shape
        is_img = input_ids == IMAGE_TOKEN_INDEX
        counts = is_img.sum(1)
        if pixel_values is None:
            if counts.any():
                raise ValueError("input_ids contain the image sentinel -200 but no pixel_values were given")
            emb = self.llm.model.embed_tokens(input_ids)
            return emb, attention_mask, labels, torch.zeros_like(input_ids, dtype=torch.bool)
        if not bool((counts == 1).all()):
            raise ValueError(f"each sample needs exactly one image sentinel {IMAGE_TOKEN_INDEX}; "
                             f"counts per sample: {counts.tolist()}")
        if pixel_values.shape[0] != B:
            raise ValueError(f"{pixel_values.shape[0]} images for a batch of {B} prompts")
        img = self.encode_images(pixel_values)  # (B, N, H)
        N = img.shape[1]
        text = self.llm.model.embed_tokens(input_ids.masked_fill(is_img, 0))  # (B, T, H)
        pos = is_img.int().argmax(1)  # sentinel position per sample
        embeds, masks, labs, img_masks = [], [], [], []
        for b in range(B):
            p = int(pos[b])
            embeds.append(torch.cat([text[b, :p], img[b].to(text.dtype), text[b, p + 1:]]))
            m = attention_mask[b]
            masks.append(torch.cat([m[:p], m.new_ones(N), m[p + 1:]]))
            im = torch.zeros(T - 1 + N, dtype=torch.bool, device=input_ids.device)
            im[p:p + N] = True
            img_masks.append(im)
            if labels is not None:
                lb = labels[b]
                labs.append(torch.cat([lb[:p], lb.new_full((N,), IGNORE_INDEX), lb[p + 1:]]))
        labels = torch.stack(labs) if labels is not None else None
        return torch.stack(embeds), torch.stack(masks), labels, torch.stack(img_masks)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                return_hidden=False, sample_weight=None, normalizer=None, return_logits=None):
        """With labels: the loss (causal_lm_loss with sample_weight and normalizer, see lm_loss),
        and no logits unless return_logits=True: training never needs the (B, T', vocab) tensor.
        Without labels: the logits."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, mask, labels, image_mask = self.prepare_inputs(input_ids, pixel_values, attention_mask, labels)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=return_hidden, head=False)
        x, hidden = out if return_hidden else (out, None)
        loss = None if labels is None else \
            causal_lm_loss(x, self.llm.lm_head.weight, labels, sample_weight, normalizer)
        if return_logits is None:
            return_logits = labels is None
        logits = self.llm.lm_head(x) if return_logits else None
        return LlavaOutput(logits, loss, hidden, mask, labels, image_mask)


# ----------------------------------------------------------------------------------------------
# A tiny model for tests and the smoke demo


def tiny_llava(seed=0, llm=None, vision=None):
    """A random tiny LLaVA for tests and the smoke demo."""
    torch.manual_seed(seed)
    return LlavaModel(llm or LlamaConfig.tiny(), vision or VisionConfig.tiny())


if __name__ == "__main__":
    import time
    t0 = time.time()
    model = tiny_llava().eval()
    n = sum(p.numel() for p in model.parameters())
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9], [1, 10, IMAGE_TOKEN_INDEX, 11, 12, 13, 14]])
    labels = torch.tensor([[IGNORE_INDEX] * 5 + [8, 9], [IGNORE_INDEX] * 4 + [12, 13, 14]])
    with torch.no_grad():
        out = model(ids, pixels, labels=labels, return_logits=True)
    print(f"tiny random LLaVA ({n:,} parameters): 2 prompts of 7 tokens, the image sentinel spliced into "
          f"{out.image_mask.sum(1).tolist()} patch tokens each -> logits {tuple(out.logits.shape)}, LM loss "
          f"{out.loss.item():.3f} (log {model.llm.config.vocab_size} = {math.log(model.llm.config.vocab_size):.3f})")
    print(f"done in {time.time() - t0:.2f}s (random weights; `python generate.py --llm FOLDER --prompt TEXT` "
          f"continues a prompt with a real model, `python demo.py` trains and evaluates a tiny one)")
