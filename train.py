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

    python train.py --demo                        # the whole story on the synthetic benchmark (CPU)
    python train.py --stage 2 --method fairllava --llm lmsys/vicuna-7b-v1.5 ...   # real run
    torchrun --nproc_per_node=8 train.py ...      # the official 8-GPU setting
    python train.py --dry-run                     # 7B parameter counts and memory estimate

Outputs in --out: `mm_projector.bin` (LLaVA key names), `adapter/` (PEFT format), `log.jsonl` (one
line per optimizer step), `monitor.jsonl` (with --monitor-json) and `checkpoint.pt` (trainable
tensors, phi included + optimizers + step + RNG state, written atomically, loadable with
weights_only=True) from which --resume continues exactly.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate
from fairness import FairnessConfig, FairnessRegularizer, leak_report
from lora import LoRAConfig, apply_lora, count_parameters, lora_state_dict, load_peft_adapter, \
    mark_only_lora_as_trainable, save_peft_adapter
from data import load_tokenizer
from model import (LlamaConfig, LlavaModel, VisionConfig, check_state_dict, load_llava, load_projector, lm_loss,
                   supervised_weight)

METHODS = ("lora", "resample", "reweight", "fairllava")


@dataclass
class TrainConfig:
    # model: a local folder or hub id for each part (official: Vicuna-7B-v1.5 + BiomedCLIP)
    llm: str = "lmsys/vicuna-7b-v1.5"
    vision: str = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    vision_heads: int = 0  # 0: width / 64 (every ViT-B)
    tokenizer: str = ""  # tokenizer.json or its folder; default: the --llm folder
    projector: str = ""  # stage-1 mm_projector.bin to start stage 2 from
    adapter: str = ""  # a PEFT adapter folder to start stage 2 from (e.g. LLaVA-Rad's)
    # data
    train_json: str = ""
    image_root: str = ""
    dataset: str = "mimic"
    max_length: int = 2048
    # method
    stage: int = 2
    method: str = "fairllava"
    attributes: tuple = ("race", "age", "gender")  # joint debiasing; one name = single-attribute mode
    lambdas: dict = field(default_factory=lambda: {"race": 0.2, "age": 0.6, "gender": 0.1})
    dac_weight: float = 1.0  # lambda1
    lm_weight: float = 1.0  # lambda3
    layer: str = "mid"
    tokens: str = "image"
    pool: str = "mean"
    protocol: str = "alternating"
    dac_steps: int = 1  # phi updates per batch in the alternating protocol
    dac_memory: int = 0  # phi also fits the last N pooled h (not in the paper)
    h_norm: str = "none"  # how phi and DIM see h: none (paper) | l2 (official) | batch (fairness.normalize_h)
    balance_on: tuple = ("race",)  # attributes whose joint groups resample/reweight balance
    lora_r: int = 64
    lora_alpha: float = 128.0
    lora_dropout: float = 0.05
    # optimisation (official: AdamW 1e-4 stage 2 / 1e-3 stage 1, cosine, warmup 3%, no decay)
    lr: float = 1e-4
    dac_lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 6  # per process, per micro-step
    grad_accum: int = 2
    grad_clip: float = 1.0
    dtype: str = "bf16"  # frozen weights and autocast dtype on GPU; CPU always runs fp32
    grad_checkpointing: bool = True
    seed: int = 42
    num_workers: int = 2
    # bookkeeping
    out: str = "runs/fairllava"
    resume: bool = False
    save_every: int = 500
    log_every: int = 10
    max_bad_steps: int = 10  # this many non-finite losses in a row stops the run
    overfit_one_batch: bool = False
    stop_after: int = 0  # debug: stop after this many steps, as if killed (tests --resume)
    dump_grads: str = ""  # debug: save the first step's gradients to this file (tests DDP equivalence)
    monitor_json: str = ""  # held-out LLaVA JSON on which the leak is measured during training
    monitor_every: int = 25
    monitor_n: int = 400


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", action="store_true", help="run the whole story on the synthetic benchmark (CPU, minutes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="--demo: seeds to run and aggregate")
    p.add_argument("--demo-dir", default="runs/demo", help="--demo: where data, models and results go")
    p.add_argument("--demo-methods", nargs="+", default=["lora", "fairllava"],
                   help="--demo: methods to compare (lora, resample, reweight, fairllava, fairllava_lbfgs)")
    p.add_argument("--dry-run", action="store_true", help="build the 7B model on the meta device; print counts and memory")
    helps = {
        "llm": "language model folder or hub id", "vision": "open_clip vision checkpoint (file, folder or hub id)",
        "vision_heads": "vision attention heads (0: width/64)", "tokenizer": "tokenizer.json or folder (default: --llm)",
        "projector": "mm_projector.bin to start from", "adapter": "PEFT adapter folder to start from",
        "train_json": "LLaVA-style training JSON", "image_root": "folder the JSON's image paths are relative to",
        "dataset": "mimic | padchest | ham10000", "max_length": "max text tokens per sample",
        "stage": "1: projector only; 2: LoRA + projector", "method": " | ".join(METHODS),
        "attributes": "attributes to debias (several = joint, one = single-attribute)",
        "lambdas": "per-attribute DIM weights, e.g. race=0.2 age=0.6 gender=0.1",
        "dac_weight": "lambda1, weight of L_DAC", "lm_weight": "lambda3, weight of L_LM",
        "layer": "hidden layer for h: first | mid | last | mean | an index", "tokens": "image | answer | all",
        "pool": "mean | random_token (official variant)", "protocol": "alternating (paper) | single_step (official)",
        "dac_steps": "phi updates per batch (alternating protocol)",
        "h_norm": "how phi and DIM see h: none (paper) | l2 (per sample, official code) | batch (standardised "
                  "over the batch); l2 and batch are blind to the scale of h",
        "dac_memory": "phi also fits the last N pooled h of earlier batches; not in the paper (0: off)",
        "monitor_json": "held-out JSON: every --monitor-every steps log phi's accuracy, CLUB, a fresh probe "
                        "and the spread of h on it (monitor.jsonl)",
        "monitor_every": "steps between two monitor points", "monitor_n": "held-out records the monitor uses",
        "balance_on": "attributes whose joint groups resample/reweight balance", "lora_r": "LoRA rank",
        "lora_alpha": "LoRA alpha (scale alpha/r)", "lora_dropout": "dropout on the LoRA path", "lr": "learning rate",
        "dac_lr": "learning rate of phi", "weight_decay": "AdamW weight decay", "warmup_ratio": "linear warmup share",
        "epochs": "epochs (fractions allowed)", "max_steps": "optimizer steps (overrides --epochs)",
        "batch_size": "samples per process per micro-step", "grad_accum": "micro-steps per optimizer step",
        "grad_clip": "max gradient norm (0: off)", "dtype": "bf16 | fp32 (GPU)", "grad_checkpointing": "recompute activations",
        "seed": "random seed", "num_workers": "data loader workers", "out": "output folder",
        "resume": "continue from --out/checkpoint.pt", "save_every": "checkpoint every N steps",
        "log_every": "log every N steps", "max_bad_steps": "stop after N non-finite losses in a row",
        "overfit_one_batch": "debug: train on the first batch only",
        "stop_after": "debug: stop after N steps as if killed (then --resume)",
        "dump_grads": "debug: save the first step's gradients to this file",
    }
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        elif f.name in ("attributes", "balance_on"):
            p.add_argument(flag, nargs="+", default=list(f.default), help=helps[f.name])
        elif f.name == "lambdas":
            p.add_argument(flag, nargs="+", default=None, help=helps[f.name])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=helps[f.name])
    a = p.parse_args(argv)
    kw = {f.name: getattr(a, f.name) for f in fields(TrainConfig)}
    kw["attributes"], kw["balance_on"] = tuple(kw["attributes"]), tuple(kw["balance_on"])
    if a.lambdas is None:
        kw["lambdas"] = TrainConfig().lambdas
    else:
        try:
            kw["lambdas"] = {k: float(v) for k, v in (s.split("=") for s in a.lambdas)}
        except ValueError:
            p.error(f"--lambdas expects name=value pairs, got {a.lambdas}")
    if kw["method"] not in METHODS:
        p.error(f"--method must be one of {METHODS}")
    return a, TrainConfig(**kw)


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
        apply_lora(model.llm, LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
        model.llm.to(d.device)
        if cfg.adapter:
            load_peft_adapter(model.llm, cfg.adapter)
        mark_only_lora_as_trainable(model, extra=("mm_projector",))
    model.llm.gradient_checkpointing = cfg.grad_checkpointing
    return model


def fairness_config(cfg):
    """The FairnessConfig this run's flags describe (also used to pool h when nothing is debiased)."""
    return FairnessConfig(attributes=cfg.attributes, lambdas={**FairnessConfig().lambdas, **cfg.lambdas},
                          dac_weight=cfg.dac_weight, layer=cfg.layer, tokens=cfg.tokens, pool=cfg.pool,
                          protocol=cfg.protocol, dac_steps=cfg.dac_steps, h_norm=cfg.h_norm,
                          dac_memory=cfg.dac_memory)


def build_regularizer(cfg, model, opt, d):
    """phi and its optimizer for FairLLaVA's stage 2, else (None, None). Alternating protocol: phi
    has its own AdamW, stepped inside the regulariser; single step: phi joins the main optimizer."""
    if cfg.method != "fairllava" or cfg.stage != 2:
        return None, None
    fcfg = fairness_config(cfg)
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
        self.file = open(Path(cfg.out) / "monitor.jsonl", "a" if resume else "w")

    def log(self, step, model, fair):
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


def make_loader_state(cfg, dataset, d, epoch):
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


def train(cfg, d=None, quiet=False, progress=None):
    """Train as `cfg` says. quiet: no progress bar; progress(step, total, record): called every
    --log-every steps instead (the demo prints one line from it)."""
    d = d or setup_distributed()
    out = Path(cfg.out)
    if d.master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
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

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fair, dac_opt = build_regularizer(cfg, model, opt, d)
    ddp = DDP(model, device_ids=[d.local_rank] if d.device.startswith("cuda") else None) if d.world > 1 else model
    monitor = Monitor(cfg, fairness_config(cfg), tokenizer, dataset.image_processor, cfg.resume) \
        if cfg.monitor_json and d.master else None

    batches0 = make_loader_state(cfg, dataset, d, 0)
    if not batches0:
        raise ValueError(f"{cfg.train_json}: {len(dataset)} samples give no full batch of {cfg.batch_size} "
                         f"per process on {d.world} process(es)")
    steps_per_epoch = max(1, len(batches0) // cfg.grad_accum)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total)
    # one schedule for every learning rate, phi's included (as in the official run, where phi sits
    # in the main optimizer); a function of the step alone, so a resumed run needs no state for it
    optimizers = [opt] + ([dac_opt.opt] if dac_opt is not None else [])
    for o in optimizers:
        for g in o.param_groups:
            g.setdefault("base_lr", g["lr"])
    set_lr = lambda s: [g.__setitem__("lr", g["base_lr"] * cosine_lr(s, total, warmup))
                        for o in optimizers for g in o.param_groups]

    step, bad_steps = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume:
        step = load_checkpoint(ckpt_path, model, fair, opt, dac_opt)
    log = open(out / "log.jsonl", "a") if d.master else None
    use_autocast = d.device.startswith("cuda") and cfg.dtype == "bf16"
    bar = tqdm(total=total, initial=step, disable=not d.master or quiet, desc=f"stage {cfg.stage} {cfg.method}")
    t0, tokens_seen = time.time(), 0
    if monitor is not None and step == 0:
        monitor.log(0, model, fair)
    model.train()
    fixed = None
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = make_loader_state(cfg, dataset, d, epoch)
        start = in_epoch * cfg.grad_accum  # resume mid-epoch: skip the batches already seen
        # The loader gets its own generator: creating an iterator draws a seed, and drawing it from
        # the global RNG would shift the dropout stream of a resumed run.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[start:steps_per_epoch * cfg.grad_accum],
                                             collate_fn=data.collate, num_workers=cfg.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        it = iter(loader)
        for _ in range(in_epoch, steps_per_epoch):
            if step >= total:
                break
            stats, skipped = {}, False
            micro = []
            for _ in range(cfg.grad_accum):
                b = next(it)
                if cfg.overfit_one_batch:
                    fixed = fixed or b
                    b = fixed
                micro.append(b)
            set_lr(step)
            lr_now = opt.param_groups[0]["lr"]
            # The LM loss of the step is (sum of token losses) / (supervised tokens of the whole
            # step, all ranks): per micro-batch, its share of that sum. DDP averages gradients over
            # ranks, so multiply by the world size to get the sum back.
            n_tok = sum(supervised_weight(b["labels"], b.get("sample_weight")) for b in micro).to(d.device)
            all_reduce_mean_([n_tok], d)
            n_tok = n_tok * d.world
            loss_sum = torch.zeros((), device=d.device)
            for k, b in enumerate(micro):
                last = k == len(micro) - 1
                ctx = ddp.no_sync() if (d.world > 1 and not last) else contextlib.nullcontext()
                with ctx:
                    loss, mstats = micro_step(cfg, ddp, fair, dac_opt, b, d, use_autocast, n_tok)
                    loss.backward()
                loss_sum += loss.detach()
                tokens_seen += int(b["attention_mask"].sum())
                for key, v in mstats.items():
                    stats[key] = stats.get(key, 0.0) + float(v) / cfg.grad_accum
            if cfg.dump_grads and step == 0 and d.master:  # debug/test hook: the first step's gradients
                atomic_save({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
                            cfg.dump_grads)
            # Single-step phi is outside DDP: average its gradients by hand.
            if fair is not None and dac_opt is None:
                all_reduce_mean_([p.grad for p in fair.parameters() if p.grad is not None], d)
            finite = torch.isfinite(loss_sum).float()
            all_reduce_mean_([finite], d)
            if finite.item() < 1.0:  # some rank saw inf/nan: every rank skips this step together
                opt.zero_grad(set_to_none=True)
                bad_steps += 1
                if d.master:
                    print(f"step {step}: non-finite loss ({loss_sum.item()}), step skipped", file=sys.stderr)
                if bad_steps >= cfg.max_bad_steps:
                    raise FloatingPointError(f"{bad_steps} non-finite losses in a row: stopping "
                                             f"(last good checkpoint: {ckpt_path})")
                skipped = True
            else:
                bad_steps = 0
                if cfg.grad_clip > 0:
                    gn = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
                    stats["grad_norm"] = float(gn)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            all_reduce_mean_([loss_sum], d)
            if d.master:
                rec = {"step": step, "loss": loss_sum.item(), "lr": lr_now, "skipped": skipped, **stats}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.update(1)
                if progress is not None and (step % cfg.log_every == 0 or step == total):
                    progress(step, total, rec)
                if step % cfg.log_every == 0 or step == total:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr_now:.2e}",
                                    tok_s=f"{tokens_seen * d.world / (time.time() - t0):.0f}")
            if monitor is not None and (step % cfg.monitor_every == 0 or step == total):
                monitor.log(step, model, fair)
            if step % cfg.save_every == 0 or step == total:
                save_checkpoint(ckpt_path, cfg, model, fair, opt, dac_opt, step, d)
            if cfg.stop_after and step >= cfg.stop_after:
                break
        if cfg.stop_after and step >= cfg.stop_after:
            if d.master:
                log.close()
                print(f"stopping after step {step} (--stop-after)", file=sys.stderr)
            return model, fair
    bar.close()
    if d.master:
        log.close()
        export(out, cfg, model)
    if d.world > 1:
        dist.barrier()
    return model, fair


def micro_step(cfg, ddp, fair, dac_opt, b, d, use_autocast, n_tok):
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
        out = ddp(ids, px, mask, labels, return_hidden=fair is not None)
    lm = lm_loss(out.logits, out.labels, sw, normalizer=n_tok) * d.world
    loss = cfg.lm_weight * lm
    stats = {"lm_loss": lm_loss(out.logits.detach(), out.labels, sw)}  # this micro-batch's mean, for the log
    if fair is not None:
        attrs = {a: b["attrs"][a].to(dev) for a in cfg.attributes}
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


def load_checkpoint(path, model, fair, opt, dac_opt):
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume: {path} not found")
    try:  # tensors, numbers and strings only: a checkpoint from elsewhere cannot run code
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--resume {path}: not a checkpoint written by train.py ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    keys = set(st) if isinstance(st, dict) else set()
    missing = sorted({"step", "trainable", "optimizer", "dac_optimizer", "rng"} - keys)
    if missing:  # a torch file of something else
        raise ValueError(f"--resume {path}: not a checkpoint written by train.py (no {', '.join(missing)})")
    sd = st["trainable"]
    expected = trainable_state(model, fair)
    check_state_dict(expected, sd, f"--resume {path}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(sd[k])
    opt.load_state_dict(st["optimizer"])
    if dac_opt is not None:
        dac_opt.load_state_dict(st["dac_optimizer"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    set_rng_state(st["rng"][rank])
    return st["step"]


def export(out, cfg, model):
    """The files evaluate.py and LLaVA-style tools read: the projector and the PEFT adapter."""
    proj = {f"model.mm_projector.{k}": v.detach().cpu().contiguous() for k, v in model.mm_projector.state_dict().items()}
    atomic_save(proj, out / "mm_projector.bin")
    if cfg.stage == 2:
        save_peft_adapter(model.llm, out / "adapter", LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))


# ----------------------------------------------------------------------------------------------
# --dry-run: the 7B run's sizes without allocating anything


def dry_run(cfg):
    with torch.device("meta"):
        model = LlavaModel(LlamaConfig(), VisionConfig())
        apply_lora(model.llm, LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
        fair = FairnessRegularizer(FairnessConfig(attributes=cfg.attributes), 4096)
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
        "one layer recomputed (attn + SwiGLU + LoRA paths, flash attention)": B * T * (10 * H + 4 * I + 14 * cfg.lora_r) * w,
        "logits + their gradient (fp32 for the loss)": 3 * B * T * V * 4,
    }
    print(f"Vicuna-7B + BiomedCLIP ViT-B/16, LoRA r={cfg.lora_r} on q,k,v,o,gate,up,down")
    print(f"  language model   {sum(p.numel() for p in model.llm.parameters()) - lora_n:>15,}  frozen")
    print(f"  vision tower     {vit_n:>15,}  frozen")
    print(f"  LoRA             {lora_n:>15,}  trainable")
    print(f"  projector        {proj_n:>15,}  trainable")
    print(f"  DAC (phi)        {dac_n:>15,}  trainable ({', '.join(cfg.attributes)})")
    print(f"  total trainable {trainable + dac_n:,} of {trainable + frozen + dac_n:,} "
          f"({100 * (trainable + dac_n) / (trainable + frozen + dac_n):.2f}%)")
    print(f"Estimated memory per GPU at batch {B} x length {T}, {cfg.dtype}, "
          f"{'with' if cfg.grad_checkpointing else 'WITHOUT'} gradient checkpointing:")
    if not cfg.grad_checkpointing:
        mem["layer inputs kept by checkpointing"] = 0
        mem["all layers' activations (no checkpointing)"] = L * B * T * (10 * H + 4 * I + 14 * cfg.lora_r) * w
    for k, v in mem.items():
        print(f"  {k:<70} {v / GB:7.2f} GiB")
    print(f"  {'total (excluding allocator slack and CUDA context, ~1-2 GiB)':<70} {sum(mem.values()) / GB:7.2f} GiB")
    return sum(mem.values())


def main(argv=None):
    args, cfg = parse_args(argv)
    if args.dry_run:
        dry_run(cfg)
    elif args.demo:
        import demo
        demo.run(args, cfg)
    else:
        d = setup_distributed()
        try:
            train(cfg, d)
        finally:
            if d.world > 1:
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
