"""The settings of a training run: TrainConfig (one dataclass, the official recipe as defaults) and
its command line. Kept out of train.py so that train.py holds the training itself.

    python train.py --help        # every flag, in groups, with its default

A bad value is refused when the flags are parsed, in one line naming the flag (exit code 2),
before any model is built. `to_argv` gives the flags back from a config (parse_args(to_argv(c))
gives c), which the tests and the demo use.
"""

import argparse
import math
import re
from dataclasses import dataclass, field, fields

import data
from fairness import DAC_INITS, H_NORMS, NEGATIVE_CHOICES, POOL_CHOICES, PROTOCOLS, TOKEN_CHOICES, FairnessConfig
from lora import LoRAConfig


METHODS = ("lora", "resample", "reweight", "fairllava")


DTYPES = ("bf16", "fp32")


REPORT_TO = ("none", "tensorboard")  # where the logged numbers also go; log.jsonl is always written


def _f(default, help, **kw):
    """A config field with its --help text beside it."""
    if isinstance(default, (tuple, dict, list)) or callable(default):
        return field(default_factory=default if callable(default) else (lambda: default), metadata=dict(help=help), **kw)
    return field(default=default, metadata=dict(help=help), **kw)


@dataclass
class TrainConfig:
    # model: a local folder or hub id for each part (official: Vicuna-7B-v1.5 + BiomedCLIP)
    llm: str = _f("lmsys/vicuna-7b-v1.5", "language model folder or hub id (HF Llama layout)")
    vision: str = _f("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                     "open_clip vision checkpoint (file, folder or hub id)")
    vision_heads: int = _f(0, "vision attention heads (0: open_clip_config.json's, else width / 64)")
    tokenizer: str = _f("", "tokenizer.json or tokenizer.model (SentencePiece), or their folder (default: the --llm folder)")
    projector: str = _f("", "stage-1 mm_projector.bin to start stage 2 from")
    adapter: str = _f("", "a PEFT adapter folder to start stage 2 from (e.g. LLaVA-Rad's)")
    # data
    train_json: str = _f("", "LLaVA-style training JSON (required)")
    image_root: str = _f("", "folder the JSON's image paths are relative to (default: the JSON's)")
    dataset: str = _f("mimic", "format of --train-json and --monitor-json (ham: HAM10000)")
    max_length: int = _f(2048, "max text tokens per sample")
    # method: the regulariser's and LoRA's settings live in their own configs (flags below)
    stage: int = _f(2, "1: projector only; 2: LoRA + projector")
    method: str = _f("fairllava", "stage-2 method (see the top of train.py)")
    fair: FairnessConfig = _f(FairnessConfig, "the regulariser (fairness.FairnessConfig)")
    lora: LoRAConfig = _f(LoRAConfig, "the adapters (lora.LoRAConfig)")
    lm_weight: float = _f(1.0, "lambda3, the weight of L_LM")
    balance_on: tuple = _f(("race",), "attributes whose joint groups resample / reweight balance")
    # optimisation (official: AdamW 1e-4 stage 2 / 1e-3 stage 1, cosine, warmup 3%, no decay)
    lr: float = _f(1e-4, "learning rate (LoRA + projector)")
    dac_lr: float = _f(1e-4, "learning rate of phi (on the same schedule)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.03, "share of the steps with a linear warmup")
    epochs: float = _f(3.0, "epochs (fractions allowed)")
    max_steps: int = _f(0, "optimizer steps; > 0 overrides --epochs")
    batch_size: int = _f(6, "samples per process per micro-step")
    grad_accum: int = _f(2, "micro-steps per optimizer step")
    grad_clip: float = _f(1.0, "max gradient norm (0: off)")
    dtype: str = _f("bf16", "frozen weights and autocast on GPU (CPU always runs fp32)")
    grad_checkpointing: bool = _f(True, "recompute activations in backward")
    seed: int = _f(42, "random seed")
    num_workers: int = _f(2, "data loader workers")
    # bookkeeping
    out: str = _f("runs/fairllava", "output folder")
    resume: bool = _f(False, "continue from --out/checkpoint.pt, with the same flags (only bookkeeping flags "
                              "may change: see RESUMABLE in train_io.py)")
    save_every: int = _f(500, "checkpoint every N steps")
    log_every: int = _f(10, "progress every N steps")
    report_to: str = _f("none", "tensorboard: also write the numbers of log.jsonl and monitor.jsonl as "
                                "TensorBoard events in --out/tensorboard/ (rank 0; needs pip install tensorboard)")
    max_bad_steps: int = _f(10, "stop after N non-finite losses in a row")
    monitor_json: str = _f("", "held-out JSON: every --monitor-every steps, log a fresh probe's accuracy, phi's "
                               "accuracy, CLUB and the spread of h on it (monitor.jsonl)")
    monitor_every: int = _f(25, "steps between two monitor points")
    monitor_n: int = _f(400, "held-out records the monitor uses")
    overfit_one_batch: bool = _f(False, "debug: train on the first batch only")
    stop_after: int = _f(0, "debug: stop after N steps as if killed (then --resume)")
    dump_grads: str = _f("", "debug: save the first step's gradients to this file (tests DDP equivalence)")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"--report-to must be one of {REPORT_TO}, got {self.report_to!r}")
        if self.dataset not in data.DATASETS:
            raise ValueError(f"--dataset must be one of {sorted(data.DATASETS)}, got {self.dataset!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")
        for name in ("batch_size", "grad_accum", "log_every", "save_every", "monitor_every", "monitor_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "stop_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"--epochs must be a finite number > 0, got {self.epochs}")
        for name in ("lr", "dac_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "lm_weight", "grad_clip"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1) (a share of the steps), got {self.warmup_ratio}")
        if self.max_bad_steps < 1:
            raise ValueError(f"--max-bad-steps must be >= 1, got {self.max_bad_steps}")
        for name in ("num_workers", "vision_heads"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2 (a prompt and an answer token), got {self.max_length}")
        if not 0 <= self.seed < 2 ** 32:  # numpy's seeds
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")


# Flags of the nested configs: --NAME for FairnessConfig.NAME, --lora-NAME for LoRAConfig.NAME.
NESTED = {"fair": ("", FairnessConfig), "lora": ("lora-", LoRAConfig)}


LORA_HELP = {"r": "LoRA rank", "alpha": "LoRA alpha (update scale alpha / r)", "dropout": "dropout on the LoRA path"}


# --help in groups: each flag of TrainConfig (nested ones as "fair.NAME" / "lora.NAME") in one.
GROUPS = {
    "model": ("llm", "vision", "vision_heads", "tokenizer", "projector", "adapter"),
    "data": ("train_json", "image_root", "dataset", "max_length", "balance_on"),
    "optimisation": ("stage", "method", "lm_weight", "lr", "dac_lr", "weight_decay", "warmup_ratio", "epochs",
                     "max_steps", "batch_size", "grad_accum", "grad_clip", "dtype", "grad_checkpointing", "seed",
                     "num_workers"),
    "LoRA": ("lora",),
    "fairness (FairLLaVA's regulariser)": ("fair",),
    "run and checkpoint": ("out", "resume", "save_every", "log_every", "report_to", "max_bad_steps", "monitor_json",
                           "monitor_every", "monitor_n"),
    "debug": ("overfit_one_batch", "stop_after", "dump_grads"),
}
GROUP_OF = {name: title for title, names in GROUPS.items() for name in names}

# Flags that take one of a fixed set of names (argparse lists them in --help and refuses others).
CHOICES = {"stage": (1, 2), "dataset": tuple(sorted(data.DATASETS)), "method": METHODS, "dtype": DTYPES,
           "report_to": REPORT_TO, "balance_on": tuple(data.ATTRIBUTES), "fair.attributes": tuple(data.ATTRIBUTES),
           "fair.tokens": TOKEN_CHOICES, "fair.pool": POOL_CHOICES, "fair.negatives": NEGATIVE_CHOICES,
           "fair.protocol": PROTOCOLS, "fair.h_norm": H_NORMS, "fair.dac_init": DAC_INITS}


def _add_flag(p, flag, default, help, dest):
    if not isinstance(default, bool):
        return _add_valued_flag(p, flag, default, help, dest, CHOICES.get(dest))
    p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help, dest=dest)


def _add_valued_flag(p, flag, default, help, dest, choices):
    # with choices, argparse's own metavar {a,b,c} shows the names that are allowed
    metavar = None if choices else flag[2:].upper().replace("-", "_")
    if isinstance(default, tuple):
        p.add_argument(flag, nargs="+", default=list(default), help=f"{help} (default: {' '.join(map(str, default))})",
                       dest=dest, metavar=metavar, choices=choices)
    elif isinstance(default, dict):  # name=value pairs, merged into the defaults
        pairs = " ".join(f"{k}={v}" for k, v in default.items())
        p.add_argument(flag, nargs="+", default=None, dest=dest, metavar="NAME=VALUE",
                       help=f"{help} (default: {pairs}; the names not given keep their default)")
    else:
        p.add_argument(flag, type=type(default), default=default, help=help, dest=dest, metavar=metavar,
                       choices=choices)


def parse_args(argv=None):
    """Flags -> (args, TrainConfig). A bad value is one line naming the flag, exit code 2. args
    holds what is not a setting of the run (so not in TrainConfig nor config.json): --dry-run,
    --overwrite, --strict-text, --preflight, --world-size."""
    p = data.OneLineParser(prog="train.py", formatter_class=data.HelpFormatter,
                           description="Two-stage FairLLaVA training, on one CPU or with torchrun on 8 GPUs.")
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    run = groups["run and checkpoint"]
    run.add_argument("--overwrite", action="store_true",
                     help="clear a non-empty --out (the files train.py writes) before a fresh run; without it, "
                          "a non-empty --out is refused unless --resume")
    run.add_argument("--preflight", action="store_true",
                     help="check in seconds, with the run's other flags, that it would start: paths, checkpoint keys "
                          "and shapes (from file headers), tokenizer vs embedding, image size, the training JSON with "
                          "every image decoded, batches per rank, --out writable with room, GPU memory; one table, "
                          "exit 0 if the run would start, else one line per problem and exit 2")
    run.add_argument("--world-size", type=int, default=0, metavar="N",
                     help="--preflight: the number of processes to check the batches for (default: $WORLD_SIZE, else 1)")
    run.add_argument("--dry-run", action="store_true",
                     help="build the 7B model on the meta device; print counts and memory")
    groups["data"].add_argument("--strict-text", action="store_true",
                                help="refuse training text with characters the tokenizer lacks (<unk>) or longer than "
                                     "--max-length, naming the first such record; without it they are counted in one line")
    top = [f for f in fields(TrainConfig) if f.name not in NESTED]
    for f in top:
        _add_flag(groups[GROUP_OF[f.name]], "--" + f.name.replace("_", "-"), getattr(TrainConfig(), f.name),
                  f.metadata["help"], f.name)
    for key, (prefix, cls) in NESTED.items():
        for f in fields(cls):
            help = f.metadata.get("help") if key == "fair" else LORA_HELP.get(f.name)
            if help:
                _add_flag(groups[GROUP_OF[key]], "--" + prefix + f.name.replace("_", "-"), getattr(cls(), f.name), help,
                          f"{key}.{f.name}")
    a = vars(p.parse_args(argv))
    try:
        nested = {}
        for key, (_, cls) in NESTED.items():
            kw = {k.split(".", 1)[1]: v for k, v in a.items() if k.startswith(key + ".") and v is not None}
            if "lambdas" in kw:
                try:
                    kw["lambdas"] = {**cls().lambdas, **{k: float(v) for k, v in (s.split("=") for s in kw["lambdas"])}}
                except ValueError:
                    raise ValueError(f"--lambdas expects name=value pairs, got {kw['lambdas']}") from None
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
            nested[key] = cls(**kw)
        cfg = TrainConfig(**{f.name: tuple(a[f.name]) if isinstance(a[f.name], list) else a[f.name] for f in top},
                          **nested)
    except ValueError as e:
        p.error(re.sub(r"FairnessConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e)))
    if a["overwrite"] and cfg.resume:
        p.error("--overwrite clears --out, --resume continues the run in it: give one of them")
    if a["world_size"] < 0:
        p.error(f"--world-size must be >= 0, got {a['world_size']}")
    return argparse.Namespace(dry_run=a["dry_run"], overwrite=a["overwrite"], strict_text=a["strict_text"],
                              preflight=a["preflight"], world_size=a["world_size"]), cfg


def to_argv(cfg):
    """The flags that give `cfg` back: parse_args(to_argv(cfg))[1] == cfg (for the settings that
    have a flag; LoRA targets and the DAC head sizes have none)."""
    argv = []

    def add(flag, v):
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, (tuple, list)):  # a list: the same setting read back from config.json
            argv.extend([flag, *map(str, v)])
        elif isinstance(v, dict):
            argv.extend([flag, *(f"{a}={b}" for a, b in v.items())])
        else:
            argv.extend([flag, str(v)])

    for f in fields(cfg):
        if f.name not in NESTED:
            add("--" + f.name.replace("_", "-"), getattr(cfg, f.name))
            continue
        prefix, cls = NESTED[f.name]
        for g in fields(cls):
            if (g.metadata.get("help") if f.name == "fair" else LORA_HELP.get(g.name)):
                add("--" + prefix + g.name.replace("_", "-"), getattr(getattr(cfg, f.name), g.name))
    return argv
