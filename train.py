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

    python train.py --stage 2 --method fairllava --llm lmsys/vicuna-7b-v1.5 ...   # real run
    torchrun --nproc_per_node=8 train.py ...      # the official 8-GPU setting
    python train.py --dry-run                     # 7B parameter counts and memory estimate

What this file holds is the training itself: setup, the loop, and `train_step`, one optimizer step
of Algorithm 1. Next door: config.py (TrainConfig and the flags), train_io.py (what --out holds,
the checkpoint --resume continues from exactly), monitor.py (the mechanism on held-out data),
preflight.py (--preflight, --dry-run), ddp.py (the torchrun process group).
"""

import contextlib
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from config import TrainConfig, parse_args
from data import load_tokenizer
from ddp import Dist, setup_distributed
from fairness import FairnessRegularizer
from lora import apply_lora, load_peft_adapter, mark_only_lora_as_trainable
from checkpoint import load_llava, load_projector
from model import supervised_weight
from monitor import Monitor
from preflight import check_tokenizer, check_train_run, dry_run
from train_io import Board, atomic_save, bad_item_stop, check_out, export, report_text, restore_checkpoint, \
    save_checkpoint, start_outputs, summary_writer


# ----------------------------------------------------------------------------------------------
# distributed: the process group (ddp.py, shared with evaluate.py) and the collectives training needs


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
        return self.opt.step(synced)  # the optimizer calls synced (with or without a closure) before stepping

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


def cosine_lr(step, total, warmup):
    """Linear warmup then cosine decay to 0 (HF's cosine schedule, as the official run uses)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    torchrun, which the forward goes through), phi and the optimizers, the data, the schedule, and
    (rank 0, --report-to tensorboard) the TensorBoard view of the logs."""
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
    board: Board | None = None  # opened by train() once --out is ready

    @property
    def autocast(self):
        """bf16 autocast on GPUs (the official recipe); CPUs always run fp32."""
        return self.d.device.startswith("cuda") and self.cfg.dtype == "bf16"

    def accumulating(self, skip_sync):
        """DDP's no_sync for the micro-batches before the last of a step: gradients accumulate
        locally and are averaged over ranks once, in the last one's backward."""
        return self.net.no_sync() if (self.d.world > 1 and skip_sync) else contextlib.nullcontext()

    def warn(self, message):
        if self.d.master:  # one line per event, not one per rank
            print(message, file=sys.stderr)

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
    cfg.fair.check_layer(model.llm.config.num_hidden_layers)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.llm)
    check_tokenizer(cfg.tokenizer or cfg.llm, tokenizer, model.llm.config, model.llm.model.embed_tokens.weight.shape[0])
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


def train(cfg, d=None, quiet=False, progress=None, overwrite=False, strict_text=False):
    """Train as `cfg` says. quiet: no progress bar; progress(step, total, record): called every
    --log-every steps instead (the demo prints one line from it). overwrite: clear a non-empty
    --out first; strict_text: refuse text that becomes <unk> or is cut (see report_text)."""
    d = d or setup_distributed()
    if not cfg.train_json:
        raise ValueError("--train-json is required (the LLaVA-style training JSON; --dry-run needs none)")
    if cfg.report_to == "tensorboard":
        summary_writer()  # a missing package is refused now, not after setup
    ckpt = check_out(cfg, overwrite)  # read-only: --out is not touched until setup has worked
    if d.world > 1:  # every rank has looked at --out before rank 0 writes to it
        dist.barrier()
    run = setup(cfg, d, strict_text)
    step = restore_checkpoint(ckpt, Path(cfg.out) / "checkpoint.pt", run) if ckpt is not None else 0
    if d.master:
        start_outputs(cfg, step, overwrite)
    if cfg.report_to == "tensorboard" and d.master:
        run.board = Board(cfg.out, step)
    log = open(Path(cfg.out) / "log.jsonl", "a") if d.master else None
    try:
        finished = train_steps(run, step, log, quiet, progress)
    finally:
        if log is not None:
            log.close()
        if run.board is not None:
            run.board.close()
    if finished and d.master:
        export(Path(cfg.out), cfg, run.model)
    if d.world > 1:
        dist.barrier()
    return run.model, run.fair


def train_steps(run, step, log, quiet, progress):
    """The training loop: optimizer steps from `step` on -> True at the end of training, False after
    --stop-after. An item that fails to load mid-run (a truncated image) ends training with a
    checkpoint of the steps done and one line naming the item."""
    cfg, out = run.cfg, Path(run.cfg.out)
    bar = tqdm(total=run.total, initial=step, disable=not run.d.master or quiet, desc=f"stage {cfg.stage} {cfg.method}")
    if run.monitor is not None and step == 0:
        monitor_point(run, 0)
    run.model.train()
    bad_steps, saved = 0, step
    try:
        for micro in micro_batches(run, step):
            run.set_lr(step)
            lr = run.opt.param_groups[0]["lr"]
            loss, stats, stepped = train_step(run, micro, step)
            bad_steps = 0 if stepped else bad_steps + 1
            if bad_steps >= cfg.max_bad_steps:
                kept = f"the last checkpoint, of step {saved}, is {out / 'checkpoint.pt'}" if saved else "no checkpoint was saved"
                raise FloatingPointError(f"{bad_steps} non-finite losses in a row (--max-bad-steps): stopping; {kept}")
            step += 1
            log_step(run, log, bar, progress, {"step": step, "loss": loss, "lr": lr, "skipped": not stepped, **stats})
            if run.monitor is not None and (step % cfg.monitor_every == 0 or step == run.total):
                monitor_point(run, step)
            if step % cfg.save_every == 0 or step == run.total:
                save_checkpoint(out / "checkpoint.pt", cfg, run.model, run.fair, run.opt, run.dac_opt, step, run.d)
                saved = step
            if cfg.stop_after and step >= cfg.stop_after:
                run.warn(f"stopping after step {step} (--stop-after)")
                return False
    except data.DataError as e:
        raise data.DataError(bad_item_stop(run, e, step, saved)) from None
    finally:
        bar.close()
    return True


def train_step(run, micro, step):
    """One optimizer step of FairLLaVA (Algorithm 1) over the step's --grad-accum micro-batches
    -> (the step's loss, stats for the log, whether the step was taken). The baselines have no phi:
    steps (2)-(4) are skipped and L_total is lambda3 L_LM.

    Scales: L_LM is the token mean of the whole step, so each micro-batch adds its token losses
    divided by n_tok, the supervised tokens of the step over all micro-batches and ranks; the
    gradient then does not depend on how a batch is split over GPUs and accumulation steps (DDP
    averages gradients over ranks, hence x world). L_DAC and L_DIM are means within each micro-batch
    (CLUB is estimated within the micro-batch, as in the official code), hence / grad_accum."""
    cfg, d, fair = run.cfg, run.d, run.fair
    n_tok = sum(supervised_weight(b["labels"], b.get("sample_weight")) for b in micro).to(d.device)
    all_reduce_mean_([n_tok], d)
    n_tok = n_tok * d.world
    loss_sum, stats = torch.zeros((), device=d.device), {}
    for k, b in enumerate(micro):
        ids, mask, labels, px = (b[key].to(d.device) for key in ("input_ids", "attention_mask", "labels", "pixel_values"))
        sw = b["sample_weight"].to(d.device) if "sample_weight" in b else None  # the reweighting baseline
        with run.accumulating(k < len(micro) - 1):  # under DDP, gradients are synced on the last micro-batch
            # (1) one forward pass of the backbone: the LM loss, and the hidden states h is read from
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.autocast):
                out = run.net(ids, px, mask, labels, return_hidden=fair is not None, sample_weight=sw, normalizer=n_tok)
            l_lm, l_dac, l_dim, mstats = out.loss * d.world, 0.0, {}, {}
            if fair is not None:
                attrs = {a: b["attrs"][a].to(d.device) for a in cfg.fair.attributes}
                # (2) h(x): the pooled hidden state (--layer mid, --tokens image: layer 16's image tokens)
                h, valid = fair.pool(out.hidden, image_mask=out.image_mask, attention_mask=out.attention_mask,
                                     labels=out.labels)  # samples with no pooled token are left out below
                # (3) phi learns to read the attributes from sg(h): L_DAC reaches phi only. Paper
                #     (--protocol alternating): phi takes its own optimizer step now and is frozen from
                #     here on, so no L_DAC is left for L_total; official code (single_step): L_DAC joins
                #     L_total, and the one optimizer step below updates phi with everything else.
                l_dac, mstats = fair.phi_step(h, attrs, run.dac_opt, valid)
                # (4) L_DIM^a = penalty(CLUB_a(h)) with phi frozen: gradients reach h (LoRA, projector) only
                l_dim, dim_stats = fair.dim_terms(h, attrs, valid)
                mstats.update(dim_stats)
            # (5) L_total = lambda1 L_DAC + sum_a lambda_a L_DIM^a + lambda3 L_LM (paper, "Loss & Training")
            dim = sum(cfg.fair.lambdas[a] * l_dim[a] for a in l_dim)
            loss = (cfg.fair.dac_weight * l_dac + dim) / cfg.grad_accum + cfg.lm_weight * l_lm
            loss.backward()
        loss_sum += loss.detach()
        # this micro-batch's mean token loss, for the log: the same sum over its own token count
        mstats = {"lm_loss": l_lm.detach() * n_tok / (d.world * supervised_weight(out.labels, sw).clamp_min(1e-8)),
                  **mstats, **({"dim_loss": dim.detach()} if fair is not None else {})}
        for key, v in mstats.items():
            stats[key] = stats.get(key, 0.0) + float(v) / cfg.grad_accum
    if cfg.dump_grads and step == 0 and d.master:  # debug/test hook: the first step's gradients
        atomic_save({n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None},
                    cfg.dump_grads)
    if fair is not None and run.dac_opt is None:  # single-step phi is outside DDP: averaged by hand
        all_reduce_mean_([p.grad for p in fair.parameters() if p.grad is not None], d)
    # (6) clip and step, or, if some rank saw inf / nan, skip the step on every rank
    finite = torch.isfinite(loss_sum).float()
    all_reduce_mean_([finite], d)
    if finite.item() < 1.0:
        run.opt.zero_grad(set_to_none=True)
        run.warn(f"step {step}: non-finite loss ({loss_sum.item()}), step skipped")
        all_reduce_mean_([loss_sum], d)
        return loss_sum.item(), stats, False
    if cfg.grad_clip > 0:
        params = [p for g in run.opt.param_groups for p in g["params"]]
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    all_reduce_mean_([loss_sum], d)
    return loss_sum.item(), stats, True


def log_step(run, log, bar, progress, rec):
    """One line of log.jsonl per optimizer step; the progress bar (or the demo's progress line)
    every --log-every steps."""
    if not run.d.master:
        return
    log.write(json.dumps(rec) + "\n")
    log.flush()
    if run.board is not None:
        run.board.write("train", rec)
    bar.update(1)
    if rec["step"] % run.cfg.log_every == 0 or rec["step"] == run.total:
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
        if progress is not None:
            progress(rec["step"], run.total, rec)


def monitor_point(run, step):
    """One point of the held-out monitor: a line of monitor.jsonl (and its scalars on the board)."""
    point = run.monitor.log(step, run.model, run.fair)
    if run.board is not None:
        run.board.write("monitor", point)


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
            micro = [next(it) for _ in range(cfg.grad_accum)]
            if cfg.overfit_one_batch:  # debug: the run's first batch, over and over
                fixed = fixed or micro[0]
                micro = [fixed] * cfg.grad_accum
            yield micro
            step += 1




def main(argv=None):
    args, cfg = parse_args(argv)
    if args.dry_run:
        return dry_run(cfg)
    if args.preflight:
        sys.exit(check_train_run(cfg, args))
    d = setup_distributed()
    try:
        train(cfg, d, overwrite=args.overwrite, strict_text=args.strict_text)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input: one line naming what, no traceback
        sys.exit(f"train.py: error: {data.one_line(e)}")
    finally:
        if d.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
