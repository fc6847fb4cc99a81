"""Two-stage FairLLaVA training, on one CPU or with torchrun on 8 GPUs.

Stage 1 (paper Sec. 3): vision tower and language model frozen; the projector psi is trained on
the LM loss to align image patches with the word embeddings.
Stage 2: vision tower and language model frozen; LoRA theta + projector psi are trained, with one
of four methods:
  lora       plain LoRA fine-tuning (the LLaVA-Rad baseline)
  resample   plain LoRA on group-balanced batches (baseline)
  reweight   plain LoRA with inverse group-frequency sample weights (baseline)
  fairllava  L_total = lambda1 L_DAC + lambda2 L_DIM + lambda3 L_LM (Algorithm 1): the demographic
             attribute classifier phi is fitted on stop-gradient hidden states, then, frozen, it
             scores the CLUB mutual-information bound that LoRA + projector minimise.

    python demo.py                                # the whole story on the synthetic benchmark (CPU)
    python train.py --stage 2 --method fairllava --llm lmsys/vicuna-7b-v1.5 ...   # real run
    torchrun --nproc_per_node=8 train.py ...      # the official 8-GPU setting
    python train.py --dry-run                     # 7B parameter counts and memory estimate

Outputs in --out: `config.json` (the settings), `mm_projector.bin` (LLaVA key names), `adapter/`
(PEFT format), `log.jsonl` (one line per optimizer step), `monitor.jsonl` (with --monitor-json) and
`checkpoint.pt` (trainable tensors, phi included + optimizers + step + RNG state, written
atomically, loadable with weights_only=True) from which --resume continues exactly. A fresh run
needs an empty --out (--overwrite clears train.py's files first); --resume refuses changed
settings (RESUMABLE lists the flags that may change) and cuts the logs back to the checkpoint's
step, so that after a kill each step is logged once.
"""

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate
from fairness import H_NORMS, NEGATIVE_CHOICES, POOL_CHOICES, PROTOCOLS, TOKEN_CHOICES, FairnessConfig, \
    FairnessRegularizer, leak_report
from lora import LoRAConfig, apply_lora, count_parameters, lora_state_dict, load_peft_adapter, \
    mark_only_lora_as_trainable, save_peft_adapter
from data import load_tokenizer
from model import (LOSS_CHUNK_ELEMENTS, LlamaConfig, LlavaModel, VisionConfig, check_state_dict, load_llava,
                   load_projector, supervised_weight)

METHODS = ("lora", "resample", "reweight", "fairllava")
DTYPES = ("bf16", "fp32")


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
    train_json: str = _f("", "LLaVA-style training JSON")
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
                              "may change: see RESUMABLE in train.py)")
    save_every: int = _f(500, "checkpoint every N steps")
    log_every: int = _f(10, "progress every N steps")
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


# Flags of the nested configs: --NAME for FairnessConfig.NAME, --lora-NAME for LoRAConfig.NAME.
NESTED = {"fair": ("", FairnessConfig), "lora": ("lora-", LoRAConfig)}
LORA_HELP = {"r": "LoRA rank", "alpha": "LoRA alpha (update scale alpha / r)", "dropout": "dropout on the LoRA path"}
# Flags that take one of a fixed set of names (argparse lists them in --help and refuses others).
CHOICES = {"stage": (1, 2), "dataset": tuple(sorted(data.DATASETS)), "method": METHODS, "dtype": DTYPES,
           "balance_on": tuple(data.ATTRIBUTES), "fair.attributes": tuple(data.ATTRIBUTES),
           "fair.tokens": TOKEN_CHOICES, "fair.pool": POOL_CHOICES, "fair.negatives": NEGATIVE_CHOICES,
           "fair.protocol": PROTOCOLS, "fair.h_norm": H_NORMS}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in --help, unless its text already says it or there is none to show
    (an empty path would print "(default: )", a plain switch "(default: False)")."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if "default:" in (action.help or "") or action.default in ("", None) or switch:
            return action.help
        return super()._get_help_string(action)


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
    p = data.OneLineParser(prog="train.py", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="build the 7B model on the meta device; print counts and memory")
    p.add_argument("--overwrite", action="store_true",
                   help="clear a non-empty --out (the files train.py writes) before a fresh run; without it, "
                        "a non-empty --out is refused unless --resume")
    p.add_argument("--preflight", action="store_true",
                   help="check in seconds, with the run's other flags, that it would start: paths, checkpoint keys "
                        "and shapes (from file headers), tokenizer vs embedding, image size, the training JSON with "
                        "every image decoded, batches per rank, --out writable with room, GPU memory; one table, "
                        "exit 0 if the run would start, else one line per problem and exit 2")
    p.add_argument("--world-size", type=int, default=0, metavar="N",
                   help="--preflight: the number of processes to check the batches for (default: $WORLD_SIZE, else 1)")
    p.add_argument("--strict-text", action="store_true",
                   help="refuse training text with characters the tokenizer lacks (<unk>) or longer than "
                        "--max-length, naming the first such record; without it they are counted in one line")
    top = [f for f in fields(TrainConfig) if f.name not in NESTED]
    for f in top:
        _add_flag(p, "--" + f.name.replace("_", "-"), getattr(TrainConfig(), f.name), f.metadata["help"], f.name)
    for key, (prefix, cls) in NESTED.items():
        for f in fields(cls):
            help = f.metadata.get("help") if key == "fair" else LORA_HELP.get(f.name)
            if help:
                _add_flag(p, "--" + prefix + f.name.replace("_", "-"), getattr(cls(), f.name), help, f"{key}.{f.name}")
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


# ----------------------------------------------------------------------------------------------
# distributed setup (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE)


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0


def setup_distributed():
    if "RANK" not in os.environ:
        return Dist(device="cuda" if torch.cuda.is_available() else "cpu")
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return Dist(rank, local, world, f"cuda:{local}")
    dist.init_process_group("gloo")
    return Dist(rank, local, world, "cpu")


def all_reduce_mean_(tensors, d):
    if d.world > 1:
        for t in tensors:
            dist.all_reduce(t)
            t /= d.world


class SyncedOptimizer:
    """phi's optimizer under DDP: average phi's gradients over ranks before each step. phi is not
    inside the DDP-wrapped model (it is stepped on its own, inside the alternating step)."""

    def __init__(self, opt, params, d):
        self.opt, self.params, self.d = opt, list(params), d
        self.param_groups = opt.param_groups

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        def synced():
            loss = closure() if closure is not None else None
            all_reduce_mean_([p.grad for p in self.params if p.grad is not None], self.d)
            return loss
        if closure is None:
            synced()
            return self.opt.step()
        return self.opt.step(synced)

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# model and trainable parameters


def build_model(cfg, d):
    gpu = d.device.startswith("cuda")
    wdtype = torch.bfloat16 if (gpu and cfg.dtype == "bf16") else torch.float32
    model = load_llava(cfg.llm, cfg.vision, dtype=wdtype, device=d.device, vision_heads=cfg.vision_heads or None)
    # Trainable tensors stay fp32 (bf16 autocast computes with them); frozen ones use wdtype.
    model.mm_projector.float()
    if cfg.projector:
        load_projector(model.mm_projector, cfg.projector)
    if cfg.stage == 1:
        model.requires_grad_(False)
        model.mm_projector.requires_grad_(True)
    else:
        apply_lora(model.llm, cfg.lora)
        model.llm.to(d.device)
        if cfg.adapter:
            load_peft_adapter(model.llm, cfg.adapter)
        mark_only_lora_as_trainable(model, extra=("mm_projector",))
    model.llm.gradient_checkpointing = cfg.grad_checkpointing
    return model


def build_regularizer(cfg, model, opt, d):
    """phi and its optimizer for FairLLaVA's stage 2, else (None, None). Alternating protocol: phi
    has its own AdamW, stepped inside the regulariser; single step: phi joins the main optimizer."""
    if cfg.method != "fairllava" or cfg.stage != 2:
        return None, None
    fcfg = cfg.fair
    fair = FairnessRegularizer(fcfg, model.llm.config.hidden_size).to(d.device)
    if d.world > 1:  # every rank starts from the same phi
        for p in fair.parameters():
            dist.broadcast(p.data, 0)
    if fcfg.protocol == "alternating":
        return fair, SyncedOptimizer(torch.optim.AdamW(fair.parameters(), lr=cfg.dac_lr, weight_decay=0.0),
                                     fair.parameters(), d)
    opt.add_param_group({"params": list(fair.parameters()), "lr": cfg.dac_lr})  # DDP does not see phi: synced by hand
    return fair, None


class Monitor:
    """The mechanism on held-out data: every --monitor-every steps, h of the first --monitor-n
    records of --monitor-json (teacher-forced, eval mode, masked mean as configured), then
    fairness.leak_report: a fresh probe's accuracy, phi's accuracy and CLUB, the spread of h.
    One JSON line per point in monitor.jsonl. It draws nothing from the random streams, so a
    monitored run trains exactly as an unmonitored one."""

    def __init__(self, cfg, fcfg, tokenizer, processor, resume):
        self.records = data.read_llava_json(cfg.monitor_json, cfg.dataset, image_root=cfg.image_root or None)
        self.records = self.records[:cfg.monitor_n]
        self.attrs = {a: torch.tensor([r["attrs"][a] for r in self.records]) for a in data.ATTRIBUTES}
        self.fcfg, self.tokenizer, self.processor = fcfg, tokenizer, processor
        # opened at the first point: a setup that fails later leaves --out as it was
        self.path, self.mode, self.file = Path(cfg.out) / "monitor.jsonl", "a" if resume else "w", None

    def log(self, step, model, fair):
        if self.file is None:
            self.file = open(self.path, self.mode)
        was_training = model.training
        h = evaluate.pooled_features(model, self.tokenizer, self.processor, self.records, self.fcfg.layer,
                                     self.fcfg.tokens, batch_size=32)
        model.train(was_training)
        self.file.write(json.dumps({"step": step, **leak_report(h, self.attrs, fair)}) + "\n")
        self.file.flush()


def cosine_lr(step, total, warmup):
    """Linear warmup then cosine decay to 0 (HF's cosine schedule, as the official run uses)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every random stream, as tensors and numbers only, so a checkpoint loads with
    torch.load(weights_only=True): nothing in it can run code."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": (version, torch.tensor(mt, dtype=torch.int64), gauss),
         "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path, save_fn=None):
    """Write to a temp file in the same folder, then rename: a crash leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        (save_fn or torch.save)(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# data


def epoch_batches(cfg, dataset, d, epoch):
    """The batches (lists of dataset indices) this rank sees in `epoch`. Each rank gets a disjoint
    share, as DistributedSampler gives; resample draws group-balanced indices instead."""
    if cfg.method == "resample" and cfg.stage == 2:
        sampler = data.GroupBalancedSampler(data.group_labels(dataset.records, cfg.balance_on), num_samples=len(dataset),
                                            rank=d.rank, world_size=d.world, seed=cfg.seed)
    else:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=d.world, rank=d.rank,
                                                      shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    n = len(idx) // cfg.batch_size
    return [idx[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class Run:
    """What one training run holds: the model (and `net`, the same model wrapped in DDP under
    torchrun, which the forward goes through), phi and the optimizers, the data, the schedule."""
    cfg: TrainConfig
    d: Dist
    model: torch.nn.Module
    net: torch.nn.Module
    fair: FairnessRegularizer | None
    opt: torch.optim.Optimizer
    dac_opt: SyncedOptimizer | None
    dataset: data.ReportDataset
    steps_per_epoch: int
    total: int
    monitor: Monitor | None

    def set_lr(self, step):
        """One schedule for every learning rate, phi's included (as in the official run, where phi
        sits in the main optimizer); a function of the step alone, so resuming needs no state for it."""
        warmup = int(self.cfg.warmup_ratio * self.total)
        for o in [self.opt] + ([self.dac_opt.opt] if self.dac_opt is not None else []):
            for g in o.param_groups:
                g.setdefault("base_lr", g["lr"])
                g["lr"] = g["base_lr"] * cosine_lr(step, self.total, warmup)


def setup(cfg, d, strict_text=False):
    """Model, data, phi, optimizers and schedule, in a fixed order (the random stream depends on it).
    Writes nothing: --out is touched only once all of this has worked."""
    seed_everything(cfg.seed)
    model = build_model(cfg, d)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.llm)
    vit = model.vision_tower.config
    records = data.read_llava_json(cfg.train_json, cfg.dataset, image_root=cfg.image_root or None)
    weights = None
    if cfg.method == "reweight" and cfg.stage == 2:
        weights = data.inverse_frequency_weights(data.group_labels(records, cfg.balance_on))
    dataset = data.ReportDataset(records, tokenizer, data.ImageProcessor(vit.image_size, vit.mean, vit.std),
                                 cfg.max_length, sample_weights=weights)
    report_text(data.scan_text(records, tokenizer, cfg.max_length), cfg, d, strict_text)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    fair, dac_opt = build_regularizer(cfg, model, opt, d)
    net = DDP(model, device_ids=[d.local_rank] if d.device.startswith("cuda") else None) if d.world > 1 else model
    monitor = Monitor(cfg, cfg.fair, tokenizer, dataset.image_processor, cfg.resume) \
        if cfg.monitor_json and d.master else None
    n_batches = len(epoch_batches(cfg, dataset, d, 0))
    if not n_batches:
        raise ValueError(f"{cfg.train_json}: {len(dataset)} samples give no full batch of {cfg.batch_size} "
                         f"per process on {d.world} process(es)")
    steps_per_epoch = max(1, n_batches // cfg.grad_accum)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    return Run(cfg, d, model, net, fair, opt, dac_opt, dataset, steps_per_epoch, total, monitor)


def report_text(scan, cfg, d, strict):
    """Text that tokenisation changes silently (<unk> for characters the vocabulary lacks, the cut at
    --max-length): one summary line, or with --strict-text a refusal naming the first record."""
    parts = [f"{len(ids)} of {scan.n} reports {what} (first: id {data.short(ids[0])})"
             for ids, what in ((scan.unk, "have <unk> tokens, characters the tokenizer lacks"),
                               (scan.cut, f"were cut at --max-length {cfg.max_length}")) if ids]
    if not parts:
        return
    if strict:
        raise ValueError(f"--strict-text: {cfg.train_json}: " + "; ".join(parts))
    if d.master:
        print(f"{cfg.train_json}: " + "; ".join(parts) + " (--strict-text refuses such data)", file=sys.stderr)


def train(cfg, d=None, quiet=False, progress=None, overwrite=False, strict_text=False):
    """Train as `cfg` says. quiet: no progress bar; progress(step, total, record): called every
    --log-every steps instead (the demo prints one line from it). overwrite: clear a non-empty
    --out first; strict_text: refuse text that becomes <unk> or is cut (see report_text)."""
    d = d or setup_distributed()
    if not cfg.train_json:
        raise ValueError("--train-json is required (the LLaVA-style training JSON; --dry-run needs none)")
    ckpt = check_out(cfg, overwrite)  # read-only: --out is not touched until setup has worked
    if d.world > 1:  # every rank has looked at --out before rank 0 writes to it
        dist.barrier()
    run = setup(cfg, d, strict_text)
    step = restore_checkpoint(ckpt, Path(cfg.out) / "checkpoint.pt", run) if ckpt is not None else 0
    if d.master:
        start_outputs(cfg, step, overwrite)
    log = open(Path(cfg.out) / "log.jsonl", "a") if d.master else None
    try:
        finished = train_steps(run, step, log, quiet, progress)
    finally:
        if log is not None:
            log.close()
    if finished and d.master:
        export(Path(cfg.out), cfg, run.model)
    if d.world > 1:
        dist.barrier()
    return run.model, run.fair


def train_steps(run, step, log, quiet, progress):
    """The optimizer steps from `step` on -> True at the end of training, False after --stop-after.
    An item that fails to load mid-run (a truncated image) ends training with a checkpoint of the
    steps done and one line naming the item."""
    cfg, d, out = run.cfg, run.d, Path(run.cfg.out)
    bar = tqdm(total=run.total, initial=step, disable=not d.master or quiet, desc=f"stage {cfg.stage} {cfg.method}")
    if run.monitor is not None and step == 0:
        run.monitor.log(0, run.model, run.fair)
    run.model.train()
    bad_steps, saved = 0, step
    try:
        for micro in micro_batches(run, step):
            run.set_lr(step)
            lr_now = run.opt.param_groups[0]["lr"]
            loss_sum, stats = forward_backward(run, micro, step)
            skipped = not optimizer_step(run, loss_sum, stats, step)
            bad_steps = bad_steps + 1 if skipped else 0
            if bad_steps >= cfg.max_bad_steps:
                raise FloatingPointError(f"{bad_steps} non-finite losses in a row: stopping "
                                         f"(last good checkpoint: {out / 'checkpoint.pt'})")
            step += 1
            all_reduce_mean_([loss_sum], d)
            if d.master:
                rec = {"step": step, "loss": loss_sum.item(), "lr": lr_now, "skipped": skipped, **stats}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.update(1)
                if step % cfg.log_every == 0 or step == run.total:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr_now:.2e}")
                    if progress is not None:
                        progress(step, run.total, rec)
            if run.monitor is not None and (step % cfg.monitor_every == 0 or step == run.total):
                run.monitor.log(step, run.model, run.fair)
            if step % cfg.save_every == 0 or step == run.total:
                save_checkpoint(out / "checkpoint.pt", cfg, run.model, run.fair, run.opt, run.dac_opt, step, d)
                saved = step
            if cfg.stop_after and step >= cfg.stop_after:
                if d.master:
                    print(f"stopping after step {step} (--stop-after)", file=sys.stderr)
                return False
    except data.DataError as e:
        raise data.DataError(bad_item_stop(run, e, step, saved)) from None
    finally:
        bar.close()
    return True


def bad_item_stop(run, e, step, saved):
    """The message for an item that passed the checks up front but fails to load now, after the
    steps done are saved (the random state is that of the end of `step`: loading draws nothing).
    Under torchrun the other ranks wait inside a collective, so no checkpoint can be agreed on."""
    path = Path(run.cfg.out) / "checkpoint.pt"
    if step > saved and run.d.world == 1:
        save_checkpoint(path, run.cfg, run.model, run.fair, run.opt, run.dac_opt, step, run.d)
        saved = step
    kept = f"steps 1-{saved} are in {path}: fix or drop the item, then --resume" if saved else "no step was done"
    # a DataLoader worker wraps the message in its traceback; the item's own words are the last line
    last = re.sub(r"^[\w.]*DataError: ", "", str(e).strip().splitlines()[-1])
    return f"{last} ({kept})"


def micro_batches(run, step):
    """From `step` to the end: each optimizer step's list of --grad-accum batches. A resumed run
    skips the batches its epoch has already seen."""
    cfg, fixed = run.cfg, None
    while step < run.total:
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        batches = epoch_batches(cfg, run.dataset, run.d, epoch)
        start = in_epoch * cfg.grad_accum
        # The loader gets its own generator: creating an iterator draws a seed, and drawing it from
        # the global RNG would shift the dropout stream of a resumed run.
        loader = torch.utils.data.DataLoader(run.dataset, batch_sampler=batches[start:run.steps_per_epoch * cfg.grad_accum],
                                             collate_fn=data.collate, num_workers=cfg.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        it = iter(loader)
        for _ in range(in_epoch, run.steps_per_epoch):
            if step >= run.total:
                return
            micro = []
            for _ in range(cfg.grad_accum):
                b = next(it)
                if cfg.overfit_one_batch:
                    fixed = fixed or b
                    b = fixed
                micro.append(b)
            yield micro
            step += 1


def forward_backward(run, micro, step):
    """Forward and backward of every micro-batch of one optimizer step -> (the step's loss, stats).
    The LM loss of the step is (sum of token losses) / (supervised tokens of the whole step, all
    ranks): per micro-batch, its share of that sum. DDP averages gradients over ranks, so each
    share is multiplied by the world size to get the sum back."""
    cfg, d = run.cfg, run.d
    n_tok = sum(supervised_weight(b["labels"], b.get("sample_weight")) for b in micro).to(d.device)
    all_reduce_mean_([n_tok], d)
    n_tok = n_tok * d.world
    use_autocast = d.device.startswith("cuda") and cfg.dtype == "bf16"
    loss_sum, stats = torch.zeros((), device=d.device), {}
    for k, b in enumerate(micro):
        last = k == len(micro) - 1
        with run.net.no_sync() if (d.world > 1 and not last) else contextlib.nullcontext():
            loss, mstats = micro_step(cfg, run.net, run.fair, run.dac_opt, b, d, use_autocast, n_tok)
            loss.backward()
        loss_sum += loss.detach()
        for key, v in mstats.items():
            stats[key] = stats.get(key, 0.0) + float(v) / cfg.grad_accum
    if cfg.dump_grads and step == 0 and d.master:  # debug/test hook: the first step's gradients
        atomic_save({n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None},
                    cfg.dump_grads)
    if run.fair is not None and run.dac_opt is None:  # single-step phi is outside DDP: average by hand
        all_reduce_mean_([p.grad for p in run.fair.parameters() if p.grad is not None], d)
    return loss_sum, stats


def optimizer_step(run, loss_sum, stats, step):
    """Clip and step, or, if some rank saw inf/nan, skip the step on every rank. True if stepped."""
    finite = torch.isfinite(loss_sum).float()
    all_reduce_mean_([finite], run.d)
    if finite.item() < 1.0:
        run.opt.zero_grad(set_to_none=True)
        if run.d.master:
            print(f"step {step}: non-finite loss ({loss_sum.item()}), step skipped", file=sys.stderr)
        return False
    if run.cfg.grad_clip > 0:
        params = [p for g in run.opt.param_groups for p in g["params"]]
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return True


def micro_step(cfg, net, fair, dac_opt, b, d, use_autocast, n_tok):
    """One forward of the backbone -> this micro-batch's part of the step's loss, plus stats:

        L_total = lambda1 L_DAC + lambda2 L_DIM + lambda3 L_LM        (paper, "Loss & Training")

    lambda3 = --lm-weight on L_LM; lambda2 is per attribute (--lambdas) inside L_DIM; lambda1 =
    --dac-weight on L_DAC, which reaches phi only (in the alternating protocol phi is stepped inside
    `fair` and L_DIM is returned with phi frozen). One forward serves both terms; like the official
    code, CLUB is estimated within the micro-batch."""
    dev = d.device
    ids, mask, labels = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev)
    px = b["pixel_values"].to(dev)
    sw = b["sample_weight"].to(dev) if "sample_weight" in b else None  # reweighting baseline
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
        out = net(ids, px, mask, labels, return_hidden=fair is not None, sample_weight=sw, normalizer=n_tok)
    lm = out.loss * d.world
    loss = cfg.lm_weight * lm
    # this micro-batch's mean token loss, for the log: the same sum over its own token count
    stats = {"lm_loss": lm.detach() * n_tok / (d.world * supervised_weight(out.labels, sw).clamp_min(1e-8))}
    if fair is not None:
        attrs = {a: b["attrs"][a].to(dev) for a in cfg.fair.attributes}
        h, valid = fair.pool(out.hidden, image_mask=out.image_mask, attention_mask=out.attention_mask,
                             labels=out.labels)
        reg, fstats = fair(h, attrs, dac_opt, valid=valid)  # samples with no pooled token are left out
        loss = loss + reg / cfg.grad_accum
        stats.update(fstats)
    return loss, stats


def trainable_state(model, fair):
    sd = {f"mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()}
    sd.update({f"llm.{k}": v for k, v in lora_state_dict(model.llm).items()})
    if fair is not None:
        sd.update({f"fair.{k}": v for k, v in fair.state_dict().items()})
    return sd


def save_checkpoint(path, cfg, model, fair, opt, dac_opt, step, d):
    # Each rank's RNG differs (dropout), so gather them all; rank 0 writes the one file.
    rngs = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs[0] = rng_state()
    if d.master:
        state = {"step": step, "config": json.dumps(asdict(cfg)),
                 "trainable": {k: v.detach().cpu() for k, v in trainable_state(model, fair).items()},
                 "optimizer": opt.state_dict(), "dac_optimizer": dac_opt.state_dict() if dac_opt else None,
                 "rng": rngs}
        atomic_save(state, path)
    if d.world > 1:
        dist.barrier()


CHECKPOINT_KEYS = {"step", "config", "trainable", "optimizer", "dac_optimizer", "rng"}


def read_checkpoint(path):
    """checkpoint.pt -> its dict, with "config" parsed. Anything else (a truncated file, a foreign
    one) is a ValueError naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume: {path} not found")
    try:  # tensors, numbers and strings only: a checkpoint from elsewhere cannot run code
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0].split(". ")[0][:160] if str(e).strip() else ""
        raise ValueError(f"--resume {path}: not a checkpoint written by train.py, or a truncated one "
                         f"({type(e).__name__}: {why})") from None
    keys = set(st) if isinstance(st, dict) else set()
    missing = sorted(CHECKPOINT_KEYS - keys)
    if missing:  # a torch file of something else
        raise ValueError(f"--resume {path}: not a checkpoint written by train.py (no {', '.join(missing)})")
    try:
        st["config"] = json.loads(st["config"])
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume {path}: its stored config is not valid JSON ({e})") from None
    if not isinstance(st["config"], dict):
        raise ValueError(f"--resume {path}: its stored config is not a JSON object")
    return st


def restore_checkpoint(st, path, run):
    """Trainable tensors, optimizer states and random streams of read_checkpoint's dict -> the step."""
    expected = trainable_state(run.model, run.fair)
    check_state_dict(expected, st["trainable"], f"--resume {path}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(st["trainable"][k])
    run.opt.load_state_dict(st["optimizer"])
    if run.dac_opt is not None:
        run.dac_opt.load_state_dict(st["dac_optimizer"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    set_rng_state(st["rng"][rank])
    return st["step"]


# ----------------------------------------------------------------------------------------------
# --out: fresh, overwritten or resumed

# Settings that may differ on --resume: they decide what is logged and saved, and when, but not the
# numbers, so the resumed run stays the uninterrupted one. Every other setting is fixed by the
# checkpoint: --max-steps and --epochs too, as the learning-rate schedule is a function of the total.
RESUMABLE = ("out", "resume", "save_every", "log_every", "max_bad_steps", "monitor_json", "monitor_every",
             "monitor_n", "num_workers", "stop_after", "dump_grads")
# What train.py writes in --out (plus NAME.tmp while writing): what --overwrite may delete.
OUTPUTS = ("config.json", "log.jsonl", "monitor.jsonl", "checkpoint.pt", "mm_projector.bin", "adapter")


def check_out(cfg, overwrite):
    """Before anything is built: a fresh run needs an empty --out (or --overwrite, which may only
    delete what train.py writes); a resumed one its checkpoint, made with the same settings.
    -> the checkpoint's dict, or None."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    for flag, path in _inputs(cfg).items():  # an input in --out would be cleared (--overwrite) or written over
        if path and _inside(Path(path), out):
            raise ValueError(f"{flag} {path} lies inside --out {out}, which train.py writes (and --overwrite "
                             f"clears): copy it elsewhere or choose another --out")
    if cfg.resume:
        if overwrite:
            raise ValueError("--overwrite clears --out, --resume continues the run in it: give one of them")
        st = read_checkpoint(out / "checkpoint.pt")
        check_resume_flags(st["config"], cfg, out / "checkpoint.pt")
        return st
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise ValueError(f"--out {out} is not empty ({_some(entries)}): --resume continues the run in it, "
                         f"--overwrite clears it first")
    foreign = [e for e in entries if e not in OUTPUTS and e.removesuffix(".tmp") not in OUTPUTS]
    if foreign:
        raise ValueError(f"--overwrite: --out {out} holds files train.py does not write ({_some(foreign)}); "
                         f"remove them or choose another --out")
    return None


def _inputs(cfg):
    """The paths a run reads, by flag (hub ids included: they never lie inside --out)."""
    return {"--llm": cfg.llm, "--vision": cfg.vision, "--tokenizer": cfg.tokenizer, "--projector": cfg.projector,
            "--adapter": cfg.adapter, "--train-json": cfg.train_json, "--image-root": cfg.image_root,
            "--monitor-json": cfg.monitor_json}


def _inside(path, folder):
    """Whether `path` is `folder` or lies under it (links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _some(names, n=3):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _flag_values(config):
    """{flag name: value} of a config as JSON gives it back ({field: ...} with nested dicts)."""
    flags = {}
    for key, value in config.items():
        if key in NESTED and isinstance(value, dict):
            prefix = NESTED[key][0]
            flags.update({"--" + prefix + k.replace("_", "-"): v for k, v in value.items()})
        else:
            flags["--" + key.replace("_", "-")] = value
    return flags


def check_resume_flags(old, cfg, path):
    """Refuse a resume whose settings differ from the checkpoint's, naming each flag with both
    values: training would go on with the new values while the first steps used the old ones."""
    now = _flag_values(json.loads(json.dumps(asdict(cfg))))  # tuples -> lists, as in the checkpoint
    then = _flag_values(old)
    free = ["--" + name.replace("_", "-") for name in RESUMABLE]
    flags = list(now) + [f for f in then if f not in now]
    changed = [f"{f} {_shown(now.get(f))} does not match the checkpoint's {_shown(then.get(f))}"
               for f in flags if f not in free and now.get(f) != then.get(f)]
    if changed:
        why = "; the learning-rate schedule is set by the total steps" if any(
            c.startswith(("--max-steps", "--epochs")) for c in changed) else ""
        raise ValueError(f"--resume {path}: " + "; ".join(changed) + f" (only {', '.join(free[2:])} may change "
                         f"on resume{why}; other settings need a new --out)")


def _shown(value):
    """A flag's value as it is typed."""
    if value is None:
        return "(not set)"
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return data.short(value) if value == "" else str(value)


def start_outputs(cfg, step, overwrite):
    """Setup worked: make --out ready. A fresh run with --overwrite first deletes train.py's old
    files; a resumed one cuts log.jsonl and monitor.jsonl back to the checkpoint's step, so that
    after a kill each step is logged once. config.json then says the settings of this run."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in out.iterdir():  # check_out made sure these are train.py's own files
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if cfg.resume:
        for name in ("log.jsonl", "monitor.jsonl"):
            truncate_jsonl(out / name, step)
    atomic_save(json.dumps(asdict(cfg), indent=2) + "\n", out / "config.json", save_fn=lambda text, p: Path(p).write_text(text))


def truncate_jsonl(path, step):
    """Keep the lines of a JSON-lines log up to `step`. A last line cut by a kill is dropped; any
    other line that is not a JSON object with a step is an error naming the file and line."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
            raise ValueError(f"--resume: {path} line {n} is not a JSON object with a step ({data.short(line)}); "
                             f"expected one JSON object per line, as train.py writes")
        if rec["step"] <= step:
            keep.append(line + "\n")
    atomic_save("".join(keep), path, save_fn=lambda text, p: Path(p).write_text(text))


def export(out, cfg, model):
    """The files evaluate.py and LLaVA-style tools read: the projector and the PEFT adapter."""
    proj = {f"model.mm_projector.{k}": v.detach().cpu().contiguous() for k, v in model.mm_projector.state_dict().items()}
    atomic_save(proj, out / "mm_projector.bin")
    if cfg.stage == 2:
        save_peft_adapter(model.llm, out / "adapter", cfg.lora)


# ----------------------------------------------------------------------------------------------
# --dry-run: the 7B run's sizes without allocating anything


def dry_run(cfg, llm_cfg=None, vision_cfg=None):
    """Print the parameter counts and a per-GPU memory estimate -> the estimate in bytes. The
    official Vicuna-7B + ViT-B/16 unless the configs of other checkpoints are given."""
    llm_cfg, vision_cfg = llm_cfg or LlamaConfig(), vision_cfg or VisionConfig()
    with torch.device("meta"):
        model = LlavaModel(llm_cfg, vision_cfg)
        apply_lora(model.llm, cfg.lora)
        fair = FairnessRegularizer(cfg.fair, llm_cfg.hidden_size)
    mark_only_lora_as_trainable(model, extra=("mm_projector",))
    lora_n = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    proj_n = sum(p.numel() for p in model.mm_projector.parameters())
    vit_n = sum(p.numel() for p in model.vision_tower.parameters())
    trainable, frozen = count_parameters(model)
    dac_n = sum(p.numel() for p in fair.parameters())
    c, B, T = model.llm.config, cfg.batch_size, cfg.max_length
    H, L, V, I = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
    GB = 1024 ** 3
    w = 2 if cfg.dtype == "bf16" else 4
    mem = {
        "frozen weights": frozen * w,
        "trainable fp32 weights + grads + AdamW (4 copies)": (trainable + dac_n) * 4 * 4,
        # with checkpointing each layer keeps its input; one layer's activations are rebuilt in backward
        "layer inputs kept by checkpointing": L * B * T * H * w,
        "one layer recomputed (attn + SwiGLU + LoRA paths, flash attention)": B * T * (10 * H + 4 * I + 14 * cfg.lora.r) * w,
        # model.causal_lm_loss: one chunk of fp32 logits at a time (+ its bf16 copies), and the
        # supervised rows of the last hidden state with their gradient (at most all B * T)
        "LM loss: one chunk of logits, supervised rows + their gradient":
            max(1, LOSS_CHUNK_ELEMENTS // V) * V * (4 + (2 if w == 2 else 0)) + 2 * B * T * H * w,
    }
    official = (llm_cfg, vision_cfg) == (LlamaConfig(), VisionConfig())
    what = "Vicuna-7B + BiomedCLIP ViT-B/16" if official else \
        f"Llama {llm_cfg.num_hidden_layers}x{llm_cfg.hidden_size} + ViT {vision_cfg.depth}x{vision_cfg.width}"
    print(f"{what}, LoRA r={cfg.lora.r} on {','.join(t.removesuffix('_proj') for t in cfg.lora.targets)}")
    print(f"  language model   {sum(p.numel() for p in model.llm.parameters()) - lora_n:>15,}  frozen")
    print(f"  vision tower     {vit_n:>15,}  frozen")
    print(f"  LoRA             {lora_n:>15,}  trainable")
    print(f"  projector        {proj_n:>15,}  trainable")
    print(f"  DAC (phi)        {dac_n:>15,}  trainable ({', '.join(cfg.fair.attributes)})")
    print(f"  total trainable {trainable + dac_n:,} of {trainable + frozen + dac_n:,} "
          f"({100 * (trainable + dac_n) / (trainable + frozen + dac_n):.2f}%)")
    print(f"Estimated memory per GPU at batch {B} x length {T}, {cfg.dtype}, "
          f"{'with' if cfg.grad_checkpointing else 'WITHOUT'} gradient checkpointing:")
    if not cfg.grad_checkpointing:
        mem["layer inputs kept by checkpointing"] = 0
        mem["all layers' activations (no checkpointing)"] = L * B * T * (10 * H + 4 * I + 14 * cfg.lora.r) * w
    for k, v in mem.items():
        print(f"  {k:<70} {v / GB:7.2f} GiB")
    print(f"  {'total (excluding allocator slack and CUDA context, ~1-2 GiB)':<70} {sum(mem.values()) / GB:7.2f} GiB")
    return sum(mem.values())


# ----------------------------------------------------------------------------------------------
# --preflight: everything setup() would refuse, and what would fail later (batches, disk, memory),
# checked in seconds without loading a tensor, so a cluster job fails before it queues for GPUs.

# bytes per trainable parameter in checkpoint.pt: the fp32 weight and AdamW's two moments
CHECKPOINT_BYTES_PER_PARAM = 4 * 3


def preflight(cfg, args):
    """train.py --preflight with the run's flags: one table of checks -> exit status 0 or 2."""
    pf = evaluate.Preflight()
    paths = evaluate.preflight_paths(pf, {
        "--llm": (cfg.llm, "model"), "--vision": (cfg.vision, "model"), "--projector": (cfg.projector, "file"),
        "--adapter": (cfg.adapter, "folder"), "--tokenizer": (cfg.tokenizer, "file or folder"),
        "--train-json": (cfg.train_json, "file"), "--image-root": (cfg.image_root, "folder"),
        "--monitor-json": (cfg.monitor_json, "file")}, required=("--train-json",))
    if cfg.stage == 1 and paths.pop("--adapter", None) is not None:
        pf.skip("adapter", "stage 1 trains the projector only; --adapter is not used")
    llm, vis, tok = evaluate.preflight_model(pf, paths, cfg.vision_heads or None, cfg.lora)
    records = _preflight_data(pf, cfg, paths, tok, args.strict_text)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    if records is not None:
        pf.check("batches per rank", lambda: _batches_row(cfg, len(records), world))
    else:
        pf.skip("batches per rank", "needs the train json to pass")
    pf.check("out state", lambda: _out_state_row(cfg, args.overwrite))
    if llm is not None and vis is not None:
        trainable = trainable_count(cfg, llm, vis)
        evaluate.preflight_out(pf, cfg.out, checkpoint_bytes(trainable),
                               f"checkpoints of {trainable:,} trainable parameters")
        _preflight_gpu(pf, cfg, llm, vis)
    else:
        evaluate.preflight_out(pf, cfg.out)
        pf.skip("gpu memory", "needs the llm and vision checks to pass")
    return pf.report("train.py")


def _preflight_data(pf, cfg, paths, tok, strict_text):
    """The training JSON in full (and --monitor-json), then its text as the tokenizer cuts it."""
    records = None
    if "--train-json" in paths:
        records = evaluate.preflight_records(pf, "train json", cfg.train_json, cfg.dataset, cfg.image_root or None)
    if "--monitor-json" in paths:
        evaluate.preflight_records(pf, "monitor json", cfg.monitor_json, cfg.dataset, cfg.image_root or None)
    if records is not None and tok is not None:
        pf.check("train text", lambda: _text_row(records, tok, cfg, strict_text))
    return records


def _text_row(records, tok, cfg, strict):
    scan = data.scan_text(records, tok, cfg.max_length)  # a DataError for an item that cannot be trained
    detail = f"{len(scan.unk)} of {scan.n} reports with <unk>, {len(scan.cut)} cut at --max-length {cfg.max_length}"
    if strict and (scan.unk or scan.cut):
        raise ValueError(f"--strict-text: {cfg.train_json}: {detail}")
    return detail


def _batches_row(cfg, n, world):
    """Each rank needs one optimizer step's worth of samples: --batch-size x --grad-accum. The
    DistributedSampler drops the tail (n // world each); resampling draws ceil(n / world)."""
    resample = cfg.method == "resample" and cfg.stage == 2
    per_rank = math.ceil(n / world) if resample else n // world
    need = cfg.batch_size * cfg.grad_accum
    if per_rank < need:
        raise ValueError(f"{cfg.train_json}: {n} samples give {per_rank} per rank on {world} rank(s), fewer than one "
                         f"step's --batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} = {need}")
    steps = per_rank // cfg.batch_size // cfg.grad_accum
    return f"{world} rank(s) x {per_rank} samples: {steps} optimizer step(s) per epoch"


def _out_state_row(cfg, overwrite):
    """check_out's verdict on --out; for --resume the checkpoint's settings are read with its
    tensors left on disk (mmap onto the meta device)."""
    if not cfg.resume:
        check_out(cfg, overwrite)
        return "fresh run: --out is empty or absent" if not overwrite else "--overwrite: train.py's old files go"
    path = Path(cfg.out) / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found")
    try:
        st = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        old = json.loads(st["config"])
    except Exception as e:
        raise ValueError(f"--resume {path}: not a readable checkpoint written by train.py ({type(e).__name__})") from None
    check_resume_flags(old, cfg, path)
    return f"--resume from step {st['step']}: settings match"


def trainable_count(cfg, llm_cfg, vision_cfg):
    """Trainable parameters of the run (projector, + LoRA in stage 2, + phi for FairLLaVA), on meta."""
    with torch.device("meta"):
        model = LlavaModel(llm_cfg, vision_cfg)
        if cfg.stage == 2:
            apply_lora(model.llm, cfg.lora)
        fair = FairnessRegularizer(cfg.fair, llm_cfg.hidden_size) if (cfg.method == "fairllava" and cfg.stage == 2) else None
    n = sum(p.numel() for p in model.mm_projector.parameters())
    n += sum(v.numel() for v in lora_state_dict(model.llm).values())
    return n + (sum(p.numel() for p in fair.parameters()) if fair is not None else 0)


def checkpoint_bytes(trainable):
    """Disk --out needs at the peak: checkpoint.pt twice (atomic_save writes NAME.tmp beside the
    old one) plus the fp32 exports (mm_projector.bin, adapter/)."""
    return 2 * trainable * CHECKPOINT_BYTES_PER_PARAM + trainable * 4


def _preflight_gpu(pf, cfg, llm, vis):
    if not torch.cuda.is_available():
        pf.skip("gpu memory", "(no GPU)")
        return

    def row():
        with contextlib.redirect_stdout(io.StringIO()):  # the table is the output, not dry_run's lines
            need = dry_run(cfg, llm, vis)
        free, total = torch.cuda.mem_get_info(0)
        gib = 1024 ** 3
        if need > free:
            raise ValueError(f"--dry-run estimates {need / gib:.1f} GiB per GPU at --batch-size {cfg.batch_size} x "
                             f"--max-length {cfg.max_length}, {free / gib:.1f} GiB free of {total / gib:.1f} on "
                             f"{torch.cuda.get_device_name(0)}")
        return f"estimate {need / gib:.1f} GiB of {free / gib:.1f} GiB free ({torch.cuda.get_device_name(0)})"
    pf.check("gpu memory", row)


def main(argv=None):
    args, cfg = parse_args(argv)
    if args.dry_run:
        return dry_run(cfg)
    if args.preflight:
        sys.exit(preflight(cfg, args))
    d = setup_distributed()
    try:
        train(cfg, d, overwrite=args.overwrite, strict_text=args.strict_text)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming what, no traceback
        sys.exit(f"train.py: error: {data.one_line(e)}")
    finally:
        if d.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
