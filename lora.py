"""
LoRA: low-rank adapters for the language model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", Sec. 4.1). FairLLaVA's stage 2 trains only these adapters (plus the
projector) on top of the frozen Vicuna-7B; everything else stays frozen.

A frozen linear layer W (out, in) gets a trainable low-rank update:

        x ──┬──> W ─────────────────────────┐
            │                               (+) ──> y = W x + (alpha / r) * B A dropout(x)
            └──> dropout ──> A (r, in) ──> B (out, r)

A starts kaiming-uniform(a=sqrt(5)) and B starts at zero, so at step 0 the model is exactly
the base model (Sec. 4.1). For inference, B A * alpha / r can be folded into W ("merge") so the
adapter costs nothing, and subtracted again ("unmerge").

Official FairLLaVA / LLaVA-Rad setting: r 64, alpha 128, dropout 0.05 on every linear layer of the
decoder (q, k, v, o, gate, up, down), not lm_head.

Key layout. The wrapped layer keeps its own `weight` / `bias` keys, and the adapter adds
`lora_A.weight` (r, in) and `lora_B.weight` (out, r) next to them:
    model.layers.0.self_attn.q_proj.weight          (the frozen base weight, key unchanged)
    model.layers.0.self_attn.q_proj.lora_A.weight
    model.layers.0.self_attn.q_proj.lora_B.weight
PEFT writes the same names with the prefix `base_model.model.`, so converting to and from PEFT
is a plain prefix (files that kept PEFT's in-memory adapter name, `lora_A.default.weight`, load too).
Adapter paths are relative to the Llama module: inside a LlavaModel, pass `llava.llm`.

Use (stage 2; the base weights are loaded first, then wrapped):
    apply_lora(llava.llm, LoRAConfig())           # or load_peft_adapter(llava.llm, released_dir)
    mark_only_lora_as_trainable(llava, extra=("mm_projector",))
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(llava)], lr=1e-4)
    ...
    save_peft_adapter(llava.llm, out_dir)         # loads with peft.PeftModel.from_pretrained too
    merge_lora(llava.llm)                         # for inference: W += (alpha / r) B A

What is left out of PEFT's LoRA: DoRA, rsLoRA, per-module ranks (rank_pattern), LoRA on biases,
embeddings or convolutions, and several adapters per model. Loading an adapter that uses them fails
with an error naming the field.

The trainable and frozen parameter counts at the Vicuna-7B size (159,907,840 LoRA parameters at
r 64): `python train.py --dry-run`.
"""

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import save_file

from checkpoint import check_state_dict, load_tensors
from fast import Dropout, linear, lora_linear

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    # names matched like PEFT does: a module path equal to the name or ending in "." + name;
    # a single string is a regular expression that must match the whole module path
    targets: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        """The one validation of LoRA settings (flags, adapter_config.json, the tests)."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= 2 ** 16:
            raise ValueError(f"LoRA r (--lora-r) must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ValueError(f"LoRA alpha (--lora-alpha) must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout (--lora-dropout) must be a number in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.targets, str) or (isinstance(self.targets, (tuple, list)) and self.targets and
                                                   all(isinstance(t, str) for t in self.targets))):
            raise ValueError(f"LoRA targets must be module names or one regular expression, got {self.targets!r}")

    @classmethod
    def tiny(cls, **overrides):
        return cls(**{"r": 4, "alpha": 8.0, "dropout": 0.0, **overrides})


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W and b frozen and kept under their own keys."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # the very same Parameter objects as the wrapped layer: no copy, and the key stays `weight`
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # LoRA weights in fp32 even over a bf16 base: the update B A is small next to W, and
        # bf16 would round most of it away (and optimizers keep their state in the param's dtype)
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)   # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # weight (out, r)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()  # fast.Dropout: nn.Dropout, faster
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        if self.merged:  # B A already folded into W
            return linear(x, self.weight, self.bias)
        # W x + scaling * B(A(dropout(x))), dropout on the adapter's input only (fast.lora_linear:
        # that sum with B z accumulated into W x in one GEMM)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.dropout)

    def delta_weight(self):
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            # add in fp32, round once to the base dtype
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        # undoes merge up to rounding: fp32 weights come back within fp32 tolerance, a bf16 base
        # within bf16 rounding (not bit-exact: W + BA - BA is rounded twice)
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha}, merged={self.merged}")


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every nn.Linear whose path matches cfg.targets by a LoRALinear; returns their paths."""
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers; apply it once")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    wrapped = [name for name in linears if _matches(name, cfg.targets)]
    if isinstance(cfg.targets, str):
        unmatched = [] if wrapped else [cfg.targets]
    else:
        unmatched = [t for t in cfg.targets if not any(_matches(n, [t]) for n in wrapped)]
    if unmatched:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"LoRA targets {unmatched} match no nn.Linear in the model; "
                         f"linear layer names available: {available}")
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(linears[name], cfg.r, cfg.alpha, cfg.dropout, dtype)
        # new modules start in training mode: keep the model's mode, or an eval model would get dropout
        setattr(parent, child, layer.train(linears[name].training))
    return wrapped


def _is_lora_param(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B")


def mark_only_lora_as_trainable(model: nn.Module, extra: tuple[str, ...] = ()) -> None:
    """Freeze everything but the LoRA weights and the parameters under the `extra` name prefixes
    (e.g. "mm_projector", which stage 2 keeps training)."""
    names = [n for n, _ in model.named_parameters()]
    if not any(_is_lora_param(n) for n in names):
        raise ValueError("mark_only_lora_as_trainable: the model has no LoRA layers; call apply_lora first")
    unmatched = [e for e in extra if not any(n == e or n.startswith(e + ".") for n in names)]
    if unmatched:
        raise ValueError(f"mark_only_lora_as_trainable: extra prefixes {unmatched} match no parameter")
    for n, p in model.named_parameters():
        p.requires_grad_(_is_lora_param(n) or any(n == e or n.startswith(e + ".") for e in extra))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) numbers of parameters; shared parameters are counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.state_dict(keep_vars=True).items() if _is_lora_param(n)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def _load_lora_tensors(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict copy of LoRA tensors into the model: every LoRA key present, nothing left over, shapes
    equal (a wrong rank r shows as shape mismatches)."""
    own = lora_state_dict(model)
    if not own:
        raise ValueError(f"loading {source}: the model has no LoRA layers; call apply_lora first")
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError(f"loading {source}: unmerge_lora first (the old B A is folded into the weights)")
    check_state_dict(own, sd, source)
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k])  # casts to the LoRA dtype (fp32) and device


# ---------------------------------------------------------------------------------------------
# PEFT format: adapter_config.json + adapter_model.safetensors (or .bin), keys
# base_model.model.<module path>.lora_A.weight. LLaVA-Rad's and FairLLaVA's adapters are in it.

# PEFT options this implementation does not have, with the value that means "off"
_PEFT_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False,
                     "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                     "layers_to_transform": None}


def _config_from_model(model: nn.Module) -> LoRAConfig:
    layers = lora_layers(model).items()
    if not layers:
        raise ValueError("the model has no LoRA layers; call apply_lora first")
    settings = {(m.r, m.alpha, getattr(m.dropout, "p", 0.0)) for _, m in layers}
    if len(settings) != 1:
        raise ValueError(f"LoRA layers have different (r, alpha, dropout): {sorted(settings)}; "
                         "the PEFT config holds one")
    r, alpha, dropout = settings.pop()
    # short names ("q_proj") when they pick out exactly the wrapped layers, else the full paths
    wrapped = sorted(name for name, _ in layers)
    short = tuple(sorted({name.rsplit(".", 1)[-1] for name in wrapped}))
    hits = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and _matches(n, short))
    return LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=short if hits == wrapped else tuple(wrapped))


def save_peft_adapter(model: nn.Module, out_dir: str, cfg: LoRAConfig | None = None,
                      base_model_name_or_path: str | None = None) -> None:
    """Write `model`'s adapter as PEFT does, loadable by PeftModel.from_pretrained(hf_llama, out_dir)."""
    found = _config_from_model(model)
    if cfg is not None and (cfg.r, cfg.alpha) != (found.r, found.alpha):
        raise ValueError(f"save_peft_adapter: cfg says r={cfg.r}, alpha={cfg.alpha} but the model's "
                         f"LoRA layers have r={found.r}, alpha={found.alpha}")
    cfg = cfg or found
    os.makedirs(out_dir, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout,
              "target_modules": cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    sd = {PEFT_PREFIX + k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    save_file(sd, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def _from_peft_key(key: str) -> str:
    # "base_model.model.X.lora_A[.default].weight" -> "X.lora_A.weight"; keys without the PEFT
    # prefix are returned as they are, and then reported as unexpected
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key)


def _read_adapter_config(config_path: str) -> dict:
    """adapter_config.json -> dict with the keys LoRA needs; a missing or bad file is one error
    naming it (a bare JSONDecodeError or KeyError would not say which file)."""
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: not found (an adapter folder holds adapter_config.json "
                                "and adapter_model.safetensors)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{config_path}: not UTF-8 text; expected PEFT's adapter_config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got a JSON {type(config).__name__}")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        raise ValueError(f"{config_path}: missing field(s) {', '.join(missing)} of a PEFT LoRA config")
    return config


def _lora_config_of(config: dict, config_path: str) -> LoRAConfig:
    """A PEFT adapter_config.json dict -> LoRAConfig, refusing the PEFT options not implemented here."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config['peft_type']!r} is not LORA")
    for field, off in _PEFT_UNSUPPORTED.items():
        if config.get(field, off) not in (off, None):
            raise ValueError(f"{config_path}: {field}={config[field]!r} is not supported here (only {off!r})")
    targets = config["target_modules"]  # _read_adapter_config made sure r, lora_alpha and this are there
    try:
        return LoRAConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                          targets=targets if isinstance(targets, str) else tuple(targets))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_path}: {e}") from None


def _adapter_weights(adapter_dir: str) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.exists(os.path.join(adapter_dir, name)):
            return os.path.join(adapter_dir, name)
    raise FileNotFoundError(f"{adapter_dir}: neither adapter_model.safetensors nor adapter_model.bin")


def load_peft_adapter(model: nn.Module, adapter_dir: str) -> LoRAConfig:
    """Load a PEFT LoRA adapter into `model` (the Llama module), wrapping it first with the adapter's
    r / alpha / dropout / targets if it has no LoRA layers yet. Strict: keys and shapes must match."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    cfg = _lora_config_of(_read_adapter_config(config_path), config_path)
    # load_tensors names the file when it cannot be read (truncated download, not safetensors)
    path = _adapter_weights(adapter_dir)
    sd = load_tensors(path)
    if not lora_layers(model):
        apply_lora(model, cfg)
    else:  # already wrapped: r is checked by the shapes below, alpha has to be checked here
        alphas = sorted({m.alpha for m in lora_layers(model).values()})
        if alphas != [cfg.alpha]:
            raise ValueError(f"{config_path}: lora_alpha {cfg.alpha} but the model's LoRA layers have alpha {alphas}")
    _load_lora_tensors(model, {_from_peft_key(k): v for k, v in sd.items()}, path)
    return cfg


