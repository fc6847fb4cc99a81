"""The built-in demo: FairLLaVA on a synthetic chest X-ray benchmark with a real shortcut, on a CPU.

    python3 demo.py                       # draw 1, seed 10, four methods: about 6 minutes on 2 CPU cores
    python3 demo.py --seeds 10 11 12      # with 95% intervals over seeds and paired differences
    python3 demo.py --study               # the README's study: 2 draws x 6 seeds, lambda = 0, controls, dose
    python3 demo.py --check-draws 100 101 102 103 104 --seeds 0 --dir runs/draws   # the benchmark on other draws
    python3 demo.py --lr 1e-3 --dir runs/slow   # any setting below can be changed from the command line

What it does, through the same code and file formats as a real run:
1. synthetic.make_synthetic writes one draw of the benchmark (synthetic.py: black patients are
   under-diagnosed in training; the held-out splits are decorrelated). A draw changes the patients;
   the pretrain split, hence the tokenizer and the base models, is the same on every draw (--base-seed).
2. Stand-ins for the public base models, pre-trained on the decorrelated "pretrain" split, so no
   shortcut hides in them: a tiny Llama on the report text ("Vicuna", HF layout) and a tiny ViT
   on the findings and the demographics ("BiomedCLIP", open_clip layout with open_clip_config.json).
3. Per seed: stage 1 (projector), then stage 2 from that projector once per method:
     lora                plain LoRA (the LLaVA-Rad baseline)
     fairllava           FairLLaVA, the paper's protocol: h raw, one AdamW step of phi per batch
     fairllava_official  FairLLaVA as the official code trains it: one optimizer step, one random
                         image token per sample, L2-normalised
     fairllava_batch     FairLLaVA with h standardised over the batch for phi and DIM (scale-blind),
                         phi fitted 5 times per batch at lr 1e-2 on the batch and the last 512 h,
                         lambdas x 0.3: settings chosen on the val split (docs/variant_selection.md)
     <arm>_l0            that FairLLaVA arm with every lambda_a = 0 (a control)
   Each logs the mechanism on the val split (monitor.jsonl: a fresh probe, phi's accuracy, CLUB,
   the spread of h; the study logs it on the runs whose curves it draws) and is evaluated on the
   test split: BLEU, CheXpert-F1 and the benchmark's Finding-F1 per group with gaps, ES-M and
   stratified bootstrap intervals, per-group error rates, the trace-swap flip rate, and a fresh
   probe's accuracy at reading each attribute from h.
4. results.md (the tables), curves.png (the mechanism), summary.json (every number) in --dir.

Every unit of work (data, base models, stage 1, each run, each evaluation) records the settings
and the content of the inputs it was made with; a folder is reused only when they equal the
requested ones, refused otherwise (--overwrite redoes it): a killed study re-run redoes only its
unfinished units. Two worker processes train side by side (--workers), one thread each.
"""

import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import evaluate
import outputs
import synthetic
from data import conversation_prompt, load_tokenizer
import metrics
from metrics import markdown_table
from checkpoint import save_llama
from model import Llama, LlamaConfig, VisionConfig, VisionTransformer
from fairness import FairnessConfig
from lora import LoRAConfig
from config import TrainConfig
from train import cosine_lr, train
from train_io import run_inputs

# The stand-in base models (fixed: they play the role of downloaded weights).
LLM = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=512)
VIT = VisionConfig(image_size=64, patch_size=16, width=64, depth=4, num_heads=2, mlp_dim=128)
FAIR_ARMS = {"fairllava": "FairLLaVA (paper protocol)", "fairllava_official": "FairLLaVA (official code)",
             "fairllava_batch": "FairLLaVA (batch-standardised h)"}
LABELS = {"lora": "LoRA (LLaVA-Rad baseline)", **FAIR_ARMS,
          **{f"{m}_l0": f"{label}, lambda = 0" for m, label in FAIR_ARMS.items()},
          "resample": "Resampling", "reweight": "Reweighting"}
HEADLINE_ARMS = ("lora", "fairllava", "fairllava_official", "fairllava_batch")


class DemoError(ValueError):
    pass


@dataclass
class DemoConfig:
    dir: str = field(default="runs/demo", metadata=dict(help="where data, models and results go"))
    seeds: tuple = field(default=(10,), metadata=dict(help="training seeds to run (intervals need 2 or more)"))
    methods: tuple = field(default=HEADLINE_ARMS, metadata=dict(
        help=f"methods to compare: {', '.join(LABELS)} (_l0: that arm with lambda = 0)"))
    workers: int = field(default=2, metadata=dict(help="training processes side by side (one thread each)"))
    overwrite: bool = field(default=False, metadata=dict(help="redo a folder whose recorded settings differ"))
    # the benchmark
    shortcut_strength: float = field(default=1.0, metadata=dict(help="0: no shortcut; 1: black 0.08 vs 0.40"))
    n_test: int = field(default=2400, metadata=dict(help="test cases (race drawn uniformly: about a quarter each)"))
    data_seed: int = field(default=1, metadata=dict(help="the benchmark draw: seed of the synthetic patients"))
    base_seed: int = field(default=1234, metadata=dict(
        help="seed of the pretrain split, hence of the tokenizer and the stand-in base models (the same on every draw)"))
    # training: the 7B recipe at the scale of a 1M-parameter model (higher rates, smaller rank)
    stage1_lr: float = field(default=5e-3, metadata=dict(help="stage 1 learning rate"))
    stage1_epochs: float = field(default=3.0, metadata=dict(help="stage 1 epochs"))
    lr: float = field(default=3e-3, metadata=dict(help="stage 2 learning rate (LoRA + projector)"))
    epochs: float = field(default=3.0, metadata=dict(help="stage 2 epochs"))
    batch_size: int = field(default=16, metadata=dict(help="samples per step"))
    lora_r: int = field(default=16, metadata=dict(help="LoRA rank (alpha = 2 r)"))
    lambda_scale: float = field(default=1.0, metadata=dict(help="paper protocol and official code: lambdas x this"))
    variant_dac_lr: float = field(default=1e-2, metadata=dict(help="fairllava_batch: phi's learning rate"))
    variant_dac_steps: int = field(default=5, metadata=dict(help="fairllava_batch: phi steps per batch"))
    variant_dac_memory: int = field(default=512, metadata=dict(help="fairllava_batch: earlier h phi also fits"))
    variant_lambda_scale: float = field(default=0.3, metadata=dict(help="fairllava_batch: lambdas x this"))
    study: bool = field(default=False, metadata=dict(help="run the whole study (84 stage-2 runs, about 95 minutes on 2 cores)"))
    check_draws: tuple = field(default=(), metadata=dict(
        help="instead: LoRA and its shortcut-free control on each of these draws, first --seeds value"))


def parse_args(argv=None):
    p = data.OneLineParser(prog="demo.py", description=__doc__.split("\n")[0], formatter_class=data.HelpFormatter)
    for f in fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif isinstance(f.default, tuple):
            p.add_argument(flag, nargs="+", type=type(f.default[0]) if f.default else int, default=list(f.default),
                           help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    a = p.parse_args(argv)
    cfg = DemoConfig(**{f.name: tuple(getattr(a, f.name)) if isinstance(f.default, tuple) else getattr(a, f.name)
                        for f in fields(DemoConfig)})
    bad = [m for m in cfg.methods if m not in LABELS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {list(LABELS)}")
    flag = lambda name: "--" + name.replace("_", "-")
    for name in ("workers", "batch_size", "lora_r", "variant_dac_steps"):
        if getattr(cfg, name) < 1:
            p.error(f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
    if cfg.n_test < 240:  # 4 race groups of >= 30 reports (smaller groups are left out of the gap)
        p.error(f"--n-test must be >= 240 (4 race groups of at least 30 reports each), got {cfg.n_test}")
    bad = [v for v in cfg.seeds + (cfg.data_seed, cfg.base_seed) + cfg.check_draws if not 0 <= v < 2 ** 32]
    if bad:
        p.error(f"--seeds, --data-seed, --base-seed and --check-draws must be in [0, 2**32) (numpy's seeds), got {bad[0]}")
    if len(set(cfg.seeds)) < len(cfg.seeds):
        p.error(f"--seeds lists a seed twice: {' '.join(map(str, cfg.seeds))}")
    if cfg.variant_dac_memory < 0:
        p.error(f"--variant-dac-memory must be >= 0, got {cfg.variant_dac_memory}")
    if cfg.study and cfg.check_draws:
        p.error("--study and --check-draws are two runs: give one")
    fixed = [flag(n) for n in ("seeds", "data_seed", "methods") if getattr(cfg, n) != getattr(DemoConfig, n)]
    if cfg.study and fixed:
        p.error(f"--study runs its own draws, seeds and arms (README, \"The study\"); {', '.join(fixed)} would not be used")
    if cfg.check_draws and (len(cfg.seeds) != 1 or cfg.methods != DemoConfig.methods):
        p.error("--check-draws trains LoRA and its control with one training seed: give one --seeds value, no --methods")
    for name in ("stage1_lr", "stage1_epochs", "lr", "epochs", "variant_dac_lr"):
        if not (getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name))):
            p.error(f"{flag(name)} must be a finite number > 0, got {getattr(cfg, name)}")
    for name in ("shortcut_strength", "lambda_scale", "variant_lambda_scale"):
        if not (getattr(cfg, name) >= 0 and math.isfinite(getattr(cfg, name))):
            p.error(f"{flag(name)} must be a finite number >= 0, got {getattr(cfg, name)}")
    return cfg


def say(msg):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# config-keyed folders: reuse what was made with the same settings, refuse what was not


def portable(key, root):
    """`key` with every path under `root` written relative to it ("$DIR/..."), so that a copy of
    a --dir is reused as it stands (README, "Experiments to try")."""
    root = str(root).rstrip("/") + "/"
    if isinstance(key, dict):
        return {k: portable(v, root) for k, v in key.items()}
    if isinstance(key, (list, tuple)):
        return [portable(v, root) for v in key]
    return "$DIR/" + key[len(root):] if isinstance(key, str) and key.startswith(root) else key


def _claim(folder):
    """The marker beside an unfinished unit: the demo's proof that it made the folder, so that a
    killed run's half-written folder can be removed and nothing else ever is."""
    return folder.with_name(folder.name + ".demo_unfinished")


def _not_a_folder(path):
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise DemoError(f"{path} is {kind}, not a folder the demo made; move it away or use another --dir")


def unit(folder, key, overwrite, root=None):
    """True when `folder` is complete and was made with `key` (a JSON-able dict; paths under `root`
    compared relative to it): reuse it. A folder made with other settings is refused (DemoError
    naming the fields), or removed with --overwrite; an unfinished one of the demo's is removed.
    False: the caller makes it, then calls done() with the same key.
    The rule for what is removed: only a folder the demo can prove it made: one holding its
    demo_key.json, or one with the demo's "unfinished" marker beside it (written before the folder
    is made). Any other folder, file or link at that path is refused, untouched."""
    folder = Path(folder)
    _not_a_folder(folder)
    stamp, claim = folder / "demo_key.json", _claim(folder)
    if stamp.is_file():
        try:
            old = json.loads(stamp.read_text())
        except ValueError as e:
            raise DemoError(f"{stamp}: not readable JSON ({e}); remove the folder or use another --dir") from None
        key = json.loads(json.dumps(portable(key, root) if root is not None else key))  # tuples -> lists
        if old == key:
            return True
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k)) if isinstance(old, dict) else ["all"]
        if not overwrite:
            raise DemoError(f"{folder} was made with other settings ({', '.join(diff)} differ); "
                            f"use another --dir, or --overwrite to redo it")
    elif folder.exists() and not (claim.is_file() and not claim.is_symlink()):
        raise DemoError(f"{folder} exists but was not made by the demo (no demo_key.json in it); "
                        f"move it away or use another --dir")
    if claim.is_symlink() or claim.is_dir():
        raise DemoError(f"{claim}: expected the demo's marker of an unfinished folder, a plain file; move it away")
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text("made by demo.py; unfinished until demo_key.json is written in the folder\n")
    if folder.exists():
        shutil.rmtree(folder)
    return False


def done(folder, key, root=None):
    folder = Path(folder)
    (folder / "demo_key.json").write_text(json.dumps(portable(key, root) if root is not None else key, indent=1))
    _claim(folder).unlink(missing_ok=True)


# The files the demo writes in --dir itself: each written over only while it holds what the demo
# wrote there (outputs.py keeps the record).
OUTPUTS = ("results.md", "summary.json", "curves.png", "curves_lambda0.png", "tradeoff.png")


def write_output(root, name, write):
    outputs.write(root, name, write, "the demo")


# ----------------------------------------------------------------------------------------------
# the stand-in base models


def pretrain_llm(data_dir, out_dir, steps=300, batch=32, seed=1234):
    """Next-token pre-training of the tiny Llama on the pretrain split's conversations, no images."""
    tok = load_tokenizer(data_dir / "tokenizer.json")
    recs = data.read_llava_json(data_dir / "pretrain.json", check_images=False)
    seqs = [tok.encode(conversation_prompt(r["question"].replace("<image>\n", ""), r["answer"])).ids for r in recs]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), **LLM)
    model = Llama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(seqs), (batch,), generator=g).tolist()
        T = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(batch, T, dtype=torch.long)
        mask = torch.zeros(batch, T, dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, :len(seqs[i])], mask[b, :len(seqs[i])] = torch.tensor(seqs[i]), 1
        for grp in opt.param_groups:
            grp["lr"] = 3e-3 * cosine_lr(step, steps, 0)
        logits = model(ids, attention_mask=mask)
        labels = ids.masked_fill(mask == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            say(f"base LLM: step {step + 1}/{steps}, LM loss {loss.item():.3f}")
    save_llama(model, out_dir)
    shutil.copy(data_dir / "tokenizer.json", out_dir / "tokenizer.json")


def pretrain_vit(data_dir, out_dir, steps=800, batch=64, seed=1234):
    """The tiny ViT learns the findings and, with explicit heads for them, race, age group and sex:
    real towers encode these without being trained to (Gichoya et al.); this one is trained to, so
    that its features carry them as a real tower's do. The pretrain split is decorrelated: no
    finding-race link to learn."""
    items = json.loads((data_dir / "pretrain.json").read_text())
    recs = data.read_llava_json(data_dir / "pretrain.json")
    proc = data.ImageProcessor(VIT.image_size, VIT.mean, VIT.std)
    x = torch.stack([proc(data.load_image(r["image"], r["id"])) for r in recs])
    y = torch.tensor([[float(it["findings_labels"][k]) for k in synthetic.FINDINGS] for it in items])
    targets = {a: torch.tensor([r["attrs"][a] for r in recs]) for a in ("race", "age", "gender")}
    torch.manual_seed(seed)
    vit = VisionTransformer(VIT)
    heads = torch.nn.ModuleDict({"findings": torch.nn.Linear(VIT.width, len(synthetic.FINDINGS)),
                                 **{a: torch.nn.Linear(VIT.width, data.ATTRIBUTES[a].num_classes) for a in targets}})
    opt = torch.optim.AdamW(list(vit.parameters()) + list(heads.parameters()), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        feats = vit.norm(vit(x[idx], select_layer=-1).mean(1))  # (B, width)
        loss = F.binary_cross_entropy_with_logits(heads["findings"](feats), y[idx])
        loss = loss + sum(F.cross_entropy(heads[a](feats), t[idx]) for a, t in targets.items()) / len(targets)
        for grp in opt.param_groups:
            grp["lr"] = 2e-3 * cosine_lr(step, steps, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 200 == 0:
            say(f"base ViT: step {step + 1}/{steps}, loss {loss.item():.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({f"visual.trunk.{k}": v.detach().clone() for k, v in vit.state_dict().items()},
               out_dir / "open_clip_pytorch_model.bin")  # the open_clip layout, with its config beside it
    (out_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"vision_cfg": {"image_size": VIT.image_size, "patch_size": VIT.patch_size, "width": VIT.width,
                                      "layers": VIT.depth, "heads": VIT.num_heads}}}, indent=1))


# ----------------------------------------------------------------------------------------------
# one run: stage 2 + evaluation (a worker process each)


def method_settings(cfg, method):
    """TrainConfig fields of a demo method; "<arm>_l0" is that FairLLaVA arm with every lambda_a = 0
    (phi trains as in the arm, nothing of DIM reaches the backbone). Where each value comes from:
    README, "The arms"."""
    arm, scale = (method[:-3], 0.0) if method.endswith("_l0") else (method, None)
    lam = FairnessConfig().lambdas  # the official 0.2 / 0.6 / 0.1
    lambdas = lambda default: {a: v * (default if scale is None else scale) for a, v in lam.items()}
    if arm == "fairllava":  # the paper's Algorithm 1; phi at the backbone's lr and initialised as the official code does
        return dict(method="fairllava", dac_lr=cfg.lr, fair=FairnessConfig(dac_init="normal",
                                                                           lambdas=lambdas(cfg.lambda_scale)))
    if arm == "fairllava_official":  # as the official code trains: REFERENCE.md, "How the official code trains phi"
        return dict(method="fairllava", dac_lr=cfg.lr, fair=FairnessConfig(
            protocol="single_step", pool="random_token", h_norm="l2", smooth_abs=True, dac_init="normal",
            lambdas=lambdas(cfg.lambda_scale)))
    if arm == "fairllava_batch":
        return dict(method="fairllava", dac_lr=cfg.variant_dac_lr, fair=FairnessConfig(
            h_norm="batch", dac_steps=cfg.variant_dac_steps, dac_memory=cfg.variant_dac_memory,
            lambdas=lambdas(cfg.variant_lambda_scale)))
    return dict(method=method)


def train_config(cfg, paths, seed, stage, out, monitor=True, **kw):
    base = dict(llm=str(paths["base"] / "llm"), vision=str(paths["base"] / "vision"),
                tokenizer=str(paths["base"] / "llm"), train_json=str(paths["data"] / "train.json"), dataset="mimic",
                seed=seed, batch_size=cfg.batch_size, grad_accum=1, num_workers=0, max_length=256, dtype="fp32",
                grad_checkpointing=False, save_every=10 ** 9, log_every=25, stage=stage, out=str(out),
                lora=LoRAConfig(r=cfg.lora_r, alpha=2.0 * cfg.lora_r, dropout=0.05))
    if stage == 1:
        base.update(method="lora", lr=cfg.stage1_lr, epochs=cfg.stage1_epochs)
    else:
        base.update(lr=cfg.lr, epochs=cfg.epochs, projector=str(Path(paths["stage1"]) / "mm_projector.bin"))
        if monitor:  # the curves; the monitor draws no random numbers (the adapter is the same without it)
            base.update(monitor_json=str(paths["data"] / "val.json"), monitor_every=25, monitor_n=400)
    base.update(kw)
    return TrainConfig(**base)


def _progress(name):
    t0 = time.time()
    return lambda step, total, rec: say(f"{name}: step {step}/{total}, LM loss {rec.get('lm_loss', rec['loss']):.3f} "
                                        f"({time.time() - t0:.0f}s)")


def contents(*paths):
    """{file name relative to its unit: fingerprint} of the files (every file of a folder) a unit
    reads: a unit's key holds them, so a reused unit is one made from the same bytes, whichever
    settings made its inputs (a stage 2 after stage 1 was retrained, an evaluation after the test
    images changed). What a key cannot see: the code of this project (a new version that trains
    differently reuses the old folders: --overwrite redoes them) and the middle of files over 2 MiB
    (evaluate.file_fingerprint)."""
    out = {}
    for path in map(Path, paths):
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != "demo_key.json") \
            if path.is_dir() else [path]
        for f in files:
            out[f"{path.name}/{f.relative_to(path)}" if path.is_dir() else path.name] = evaluate.file_fingerprint(f)
    return out


def run_key(tcfg):
    """A training unit's key: its settings and the content of what it reads (the base models, the
    data and, for stage 2, stage 1's projector: a retrained stage 1 means a new stage 2)."""
    settings = {k: v for k, v in asdict(tcfg).items() if k != "report_to"}  # where logs also go: not what is trained
    return {**settings, "inputs": contents(*dict.fromkeys(p for p in run_inputs(tcfg).values() if p))}


def run_unit(tcfg, name, overwrite):
    """Train one stage (in a worker): skipped when the folder holds a finished run of the same settings."""
    torch.set_num_threads(1)  # tiny tensors: one thread each, two processes side by side
    out = Path(tcfg.out)
    key, root = run_key(tcfg), out.parents[2]  # out = DIR/drawD/seedS/NAME
    if unit(out, key, overwrite, root):
        say(f"{name}: reused {out}")
        return
    t = time.time()
    train(tcfg, quiet=True, progress=_progress(name))
    done(out, key, root)
    say(f"{name}: trained in {time.time() - t:.0f}s")


SPLITS = ("train", "test", "swap")  # what an evaluation reads (train: the probe's training records)


def evaluate_unit(tcfg, paths, name, overwrite):
    """Evaluate one trained run on the test and swap splits (in a worker) -> results dict."""
    torch.set_num_threads(1)
    run = Path(tcfg.out)
    out = run / "eval"
    key = {"run": run_key(tcfg), "test": str(paths["data"] / "test.json"), "max_new_tokens": 96, "n_resamples": 200,
           "bootstrap": "stratified, with the gap's permutation null",
           "inputs": contents(run / "mm_projector.bin", run / "adapter", *(paths["data"] / f"{s}.json" for s in SPLITS))}
    root = run.parents[2]
    if unit(out, key, overwrite, root):
        return json.loads((out / "results.json").read_text())
    t = time.time()
    base = paths["base"]
    model = evaluate.load_model(str(base / "llm"), str(base / "vision"), str(run / "mm_projector.bin"),
                                str(run / "adapter"))
    tok = load_tokenizer(base / "llm")
    proc = data.ImageProcessor(VIT.image_size, VIT.mean, VIT.std)
    splits = {s: (data.read_llava_json(paths["data"] / f"{s}.json"), json.loads((paths["data"] / f"{s}.json").read_text()))
              for s in SPLITS[1:]}
    preds = {s: evaluate.generate_predictions(model, tok, recs, proc, out / f"predictions_{s}.jsonl", batch_size=64,
                                              max_new_tokens=96, desc=f"{name} {s}", quiet=True)
             for s, (recs, _) in splits.items()}
    res = evaluate.score(preds["test"], splits["test"][0], seed=tcfg.seed, extra_metrics={"FindF1": synthetic.FINDING_F1})
    train_recs = data.read_llava_json(paths["data"] / "train.json")
    res["probe"] = evaluate.attribute_probe(model, tok, proc, train_recs, splits["test"][0], layer=tcfg.fair.layer,
                                            tokens=tcfg.fair.tokens)
    res["error_rates"] = synthetic.error_rates(preds["test"], splits["test"][1])
    res["swap"] = synthetic.swap_flips(preds["test"], preds["swap"], splits["swap"][1])
    evaluate.write_outputs(res, out, title=name)
    done(out, key, root)
    say(f"{name}: evaluated in {time.time() - t:.0f}s")
    return res


def stage2_and_eval(tcfg, paths, name, overwrite):
    run_unit(tcfg, name, overwrite)
    return evaluate_unit(tcfg, paths, name, overwrite)


# ----------------------------------------------------------------------------------------------
# the pipeline


def prepare(cfg, root, pool, draw, strength=None, uniform_train=False, name="data"):
    """One draw's benchmark (a folder per shortcut setting, under DIR/drawD) and the base models
    (DIR/base, shared by every draw: they read the pretrain split only, which base_seed fixes)."""
    scfg = synthetic.SyntheticConfig(n_test=cfg.n_test, seed=draw, base_seed=cfg.base_seed, uniform_train=uniform_train,
                                     shortcut_strength=cfg.shortcut_strength if strength is None else strength)
    data_dir = root / f"draw{draw}" / name
    if not unit(data_dir, asdict(scfg), cfg.overwrite):
        t = time.time()
        synthetic.make_synthetic(data_dir, scfg)
        done(data_dir, asdict(scfg))
        say(f"draw {draw}: benchmark written to {data_dir} ({time.time() - t:.0f}s)")
    base = root / "base"
    per_split = ("n_train", "n_val", "n_test", "n_swap", "shortcut_strength", "uniform_train")
    pre = {k: v for k, v in asdict(scfg).items() if k not in per_split + (("seed",) if cfg.base_seed is not None else ())}
    if not unit(base, pre, cfg.overwrite):
        t = time.time()
        jobs = [pool.submit(_pretrain, fn, data_dir, base / sub) for fn, sub in (("llm", "llm"), ("vit", "vision"))]
        [j.result() for j in jobs]
        done(base, pre)
        say(f"stand-in base models pre-trained ({time.time() - t:.0f}s)")
    return {"data": data_dir, "base": base}


def _die_with_parent(parent):
    """In each worker: exit when the demo that started it is gone (a kill -9 gives it no chance to
    stop its pool), so that no worker goes on writing into --dir. Polls once a second."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _slow_pid(seconds):
    """A job that holds its worker for `seconds`: tests use it to reach every worker of a pool."""
    time.sleep(seconds)
    return os.getpid()


def _pretrain(which, data_dir, out):
    torch.set_num_threads(1)
    (pretrain_llm if which == "llm" else pretrain_vit)(data_dir, out)


@dataclass
class Spec:
    """One stage-2 run of the demo or the study: `method` trained on `paths` (a draw's data folder
    and the base models) with training seed `seed`, in DIR/drawD/seedS/`tag`."""
    paths: dict
    draw: int
    seed: int
    method: str
    tag: str = ""
    extra: dict = field(default_factory=dict)  # TrainConfig fields over the method's
    monitor: bool = False  # log the mechanism on val (monitor.jsonl): the curves

    def __post_init__(self):
        self.tag = self.tag or self.method

    @property
    def stage1(self):  # DIR/drawD/seedS/stage1_<data folder>: shared by every run on this data and seed
        return self.paths["data"].parent / f"seed{self.seed}" / f"stage1_{self.paths['data'].name}"

    @property
    def out(self):
        return self.paths["data"].parent / f"seed{self.seed}" / self.tag


def _timed(fn, *args):
    t = time.time()
    out = fn(*args)
    return out, time.time() - t


def _wait(jobs, what, workers):
    """Collect finished jobs {key: future of (result, seconds)} with a progress line and an ETA from
    the units done so far (a reused unit takes no time and does not count towards the rate)."""
    from concurrent.futures import as_completed
    keys = {f: k for k, f in jobs.items()}
    out, worked, t0 = {}, [], time.time()
    for n, f in enumerate(as_completed(keys), 1):
        res, secs = f.result()
        out[keys[f]] = res
        if secs > 5:
            worked.append(secs)
        left = len(jobs) - n
        eta = f", about {left * np.mean(worked) / workers / 60:.0f} min left" if worked and left else ""
        say(f"{what}: {n}/{len(jobs)} done ({(time.time() - t0) / 60:.1f} min{eta})")
    return out


def run_runs(cfg, pool, specs):
    """[Spec] -> {(draw, seed, tag): results}. Stage 1 of each (data, seed) first, then every stage 2
    + evaluation, `cfg.workers` at a time."""
    stage1 = {}
    for sp in specs:
        stage1.setdefault(str(sp.stage1), (train_config(cfg, sp.paths, sp.seed, 1, sp.stage1),
                                    f"draw {sp.draw} seed {sp.seed} stage 1 ({sp.paths['data'].name})"))
    _wait({k: pool.submit(_timed, run_unit, t, n, cfg.overwrite) for k, (t, n) in stage1.items()}, "stage 1",
          cfg.workers)
    jobs = {}
    for sp in specs:
        p = {**sp.paths, "stage1": sp.stage1}
        tcfg = train_config(cfg, p, sp.seed, 2, sp.out, monitor=sp.monitor, **{**method_settings(cfg, sp.method), **sp.extra})
        jobs[(sp.draw, sp.seed, sp.tag)] = pool.submit(_timed, stage2_and_eval, tcfg, p,
                                                       f"draw {sp.draw} seed {sp.seed} {sp.tag}", cfg.overwrite)
    return _wait(jobs, "stage 2 + evaluation", cfg.workers)


# ----------------------------------------------------------------------------------------------
# tables, figures, summary.json

COLLAPSE = 30.0  # a run "collapses" when its whole-set Finding-F1 is below this: half of LoRA's lowest on the draws check


def mean_ci(values):
    """Mean and the half-width of its 95% t-interval (NaN for one value)."""
    v = np.asarray(values, dtype=float)
    half = metrics.t_quantile(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(half)


def ci_cell(values, digits=1):
    """"mean ± half" of a 95% t-interval ("mean" alone for one value)."""
    mu, half = mean_ci(values)
    return f"{mu:.{digits}f}" + (f" ± {half:.{digits}f}" if len(values) > 1 else "")


def summary_of(res):
    """One run's machine-readable numbers (see the README's "summary.json")."""
    out = {"overall": {n: res["overall"][n] for n in res["headline"].values()}, "fairness": {}, "probe": res["probe"],
           "error_rates": res["error_rates"], "swap": res["swap"]}
    for a, by_metric in res["fairness"].items():
        out["fairness"][a] = {n: {k: by_metric[n][k] for k in ("m_all", "gap", "es", "ci", "gap_null", "gap_corrected")
                                  if k in by_metric[n]} |
                              {"groups": {g: {"score": s["score"], "n": s["n"], "ci": s.get("ci")}
                                          for g, s in by_metric[n]["groups"].items()}}
                              for n in res["headline"].values()}
    return out


BLACK = synthetic.RACE_NAMES[synthetic.SyntheticConfig.disadvantaged_race]


def key_numbers(res):
    """The few numbers that tell the story of one run (the README's table), all 0-100."""
    find, chex = race_gap(res), res["fairness"]["race"]["CheXpert-F1 (micro)"]
    others = [g["score"] for name, g in find["groups"].items() if name != BLACK]
    swap = res["swap"]
    n = sum(v["n_cases"] for v in swap.values())
    out = {"Δ Finding-F1, race": find["gap"], f"Finding-F1, {BLACK} patients": find["groups"][BLACK]["score"],
           "Finding-F1, other races (mean)": sum(others) / len(others), "ES-Finding-F1, race": find["es"],
           "Δ CheXpert-F1, race": chex["gap"], "ES-CheXpert-F1, race": chex["es"]}
    for a in ("age", "gender"):  # the seesaw: a gap closed for one attribute may open for another
        if a in res["fairness"]:
            out[f"Δ Finding-F1, {a}"] = res["fairness"][a][synthetic.FINDING_F1.name]["gap"]
    out |= {"Finding-F1, whole test set": res["overall"][synthetic.FINDING_F1.name]["score"],
            "CheXpert-F1, whole test set": res["overall"]["CheXpert-F1 (micro)"]["score"],
            "BLEU-4, whole test set": res["overall"]["BLEU-4"]["score"]}
    for a, chance in (("race", 25), ("age", 33), ("gender", 50)):
        if a in res["probe"]:
            out[f"probe: {a} from h (chance {chance})"] = res["probe"][a]["accuracy"]
    return out | {f"trace swap: findings lost, white→{BLACK}": 100 * swap[f"white->{BLACK}"]["lost"],
                  "trace swap: labels changed, all": 100 * sum(v["changed"] * v["n_cases"] for v in swap.values()) / n}


def units_of(results, methods):
    """The (draw, seed) pairs every method has a run for, sorted."""
    return sorted({(d, s) for d, s, _ in results if all((d, s, m) in results for m in methods)})


def unit_name(u):
    return f"draw {u[0]}, seed {u[1]}"


def key_rows(results, methods, units):
    """The README's table: one run -> the value (with its bootstrap interval for the race gap);
    several -> mean ± 95% t-interval over runs."""
    rows = []
    for k in key_numbers(results[units[0] + (methods[0],)]):
        cells = []
        for m in methods:
            if len(units) == 1 and k == "Δ Finding-F1, race":
                cells.append(gap_cell(results[units[0] + (m,)]["fairness"]["race"][synthetic.FINDING_F1.name], 1))
            else:
                cells.append(ci_cell([key_numbers(results[u + (m,)])[k] for u in units]))
        rows.append([k] + cells)
    return rows


def gap_cell(rep, digits=2):
    """A gap with its stratified-bootstrap interval and, beside it, its null: what max - min comes
    to at these group sizes when the groups do not differ (labels shuffled; 95th percentile)."""
    lo, hi = rep["ci"]["gap"]
    null = f"; null {rep['gap_null']['q95']:.{digits}f}" if "gap_null" in rep else ""
    return f"{rep['gap']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}{null}]"


def run_dir(root, unit, tag):
    """DIR/drawD/seedS/TAG: a stage-2 run's folder (Spec.out), for the report's readers."""
    return root / f"draw{unit[0]}" / f"seed{unit[1]}" / tag


def predictions_file(root, unit, tag):
    return run_dir(root, unit, tag) / "eval" / "predictions_test.jsonl"


def race_gap(res):
    return res["fairness"]["race"][synthetic.FINDING_F1.name]


def headline_rows(results, methods, units):
    """Rows of the paper's table: each headline number as mean ± 95% CI over runs."""
    keys = list(evaluate.headline(results[units[0] + (methods[0],)]))
    return [[k] + [ci_cell([evaluate.headline(results[u + (m,)])[k] for u in units], 2) for m in methods]
            for k in keys]


PAIRED_KEYS = ("Δ Finding-F1, race", "ES-Finding-F1, race", f"Finding-F1, {BLACK} patients", "Finding-F1, other races (mean)",
               "Δ Finding-F1, age", "Δ Finding-F1, gender", "Finding-F1, whole test set",
               "CheXpert-F1, whole test set", "BLEU-4, whole test set", "probe: race from h (chance 25)",
               "probe: age from h (chance 33)", "probe: gender from h (chance 50)")


PAIRED_HEADER = ["method", "metric", "mean ± 95% CI", "95% CI", "", "runs < 0", "range"]  # paired_rows' columns


def paired_rows(results, methods, units, keys=PAIRED_KEYS, against="lora"):
    """Per-run differences method − `against` (same draw, seed and stage 1): mean ± 95% t-interval
    over runs, how many runs lie below 0, and the range; "no difference shown" where the interval
    holds 0."""
    rows = []
    for m in methods:
        if m == against:
            continue
        for k in keys:
            d = [key_numbers(results[u + (m,)]).get(k, math.nan) - key_numbers(results[u + (against,)]).get(k, math.nan)
                 for u in units]
            if any(math.isnan(x) for x in d):
                continue
            mu, half = mean_ci(d)
            verdict = "no difference shown" if len(d) < 2 or abs(mu) <= half else ("lower" if mu < 0 else "higher")
            rows.append([LABELS[m], k, f"{mu:+.2f} ± {half:.2f}", f"[{mu - half:+.2f}, {mu + half:+.2f}]", verdict,
                         f"{sum(x < 0 for x in d)}/{len(d)}", f"{min(d):+.1f} … {max(d):+.1f}"])
    return rows


def paired_bootstrap_rows(root, methods, units, n_resamples=1000):
    """Per run, the change in the race gap in Finding-F1 against LoRA on the same test cases, with
    its 95% paired stratified bootstrap interval (metrics.paired_difference): how much of a run's
    difference the test set resolves, before the spread over training runs."""
    rows = []
    for u in units:
        recs = data.read_llava_json(root / f"draw{u[0]}" / "data" / "test.json", check_images=False)
        races = data.group_names(recs, "race")
        hyps = lambda tag: evaluate.match_predictions(evaluate.read_predictions(predictions_file(root, u, tag)), recs)
        lora, refs = hyps("lora")
        cells = []
        for m in methods:
            if m == "lora":
                continue
            diff = metrics.paired_difference(synthetic.FINDING_F1, hyps(m)[0], lora, refs, races,
                                             n_resamples=n_resamples, seed=u[1])
            point, lo, hi = diff["gap"]
            cells.append(f"{point:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" *" if lo > 0 or hi < 0 else ""))
        rows.append([unit_name(u)] + cells)
    return rows


def collapse_rows(results, methods, units):
    """Per arm: runs whose whole-set Finding-F1 is below COLLAPSE, and the race gap of the others."""
    rows = []
    for m in methods:
        rs = [results[u + (m,)] for u in units]
        whole = [key_numbers(r)["Finding-F1, whole test set"] for r in rs]
        kept = [race_gap(r)["gap"] for r, w in zip(rs, whole) if w >= COLLAPSE]
        rows.append([LABELS[m], f"{sum(w < COLLAPSE for w in whole)}/{len(rs)}", f"{min(whole):.1f}",
                     ci_cell(kept) if kept else "-"])
    return rows


def benchmark_rows(results, units):
    """The benchmark's checks on LoRA: per-race error rates, mean over runs."""
    rows = []
    for g in results[units[0] + ("lora",)]["error_rates"]:
        rows.append([g] + [" / ".join(f"{np.mean([results[u + ('lora',)]['error_rates'][g][k][r] for u in units]):.2f}"
                                      for r in ("fnr", "fpr")) for k in synthetic.FINDINGS])
    return rows


def test_split(results):
    """"2400 decorrelated cases (582-631 per race)", as the runs were scored."""
    sizes = [g["n"] for res in results.values() for g in race_gap(res)["groups"].values()]
    n = {sum(g["n"] for g in race_gap(res)["groups"].values()) for res in results.values()}
    return f"{'/'.join(map(str, sorted(n)))} decorrelated cases per draw ({min(sizes)}-{max(sizes)} per race)"


def write_summary(cfg, root, runs):
    """summary.json: the demo's settings and every run's numbers (summary_of)."""
    summary = {"config": asdict(cfg), "runs": runs}
    write_output(root, "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1, allow_nan=False, default=str)))


def write_report(cfg, root, results, methods, extra_md="", curves=None):
    """results.md, summary.json and curves.png of `methods` over every (draw, seed) they all ran."""
    methods = [m for m in methods if any(k[2] == m for k in results)]
    units = units_of(results, methods)
    one = len(units) == 1
    md = [f"# FairLLaVA demo: {len(units)} run(s) per method ({'; '.join(map(unit_name, units))})\n",
          f"Test split: {test_split({k: v for k, v in results.items() if k[2] in methods})}. "
          "Δ = max_g − min_g over groups, ES = M / (1 + Δ); Finding-F1 = micro-F1 over the three shortcut findings "
          "(the benchmark's labeler), CheXpert-F1 = CheXpert-style micro-F1. " +
          ("One run; Δ [95% stratified bootstrap interval; null = the 95th percentile of Δ with the race labels "
           "shuffled, what no gap looks like at these group sizes]." if one else
           "Mean ± 95% t-interval over the runs (each a draw and a training seed).") + "\n",
          markdown_table([""] + [LABELS[m] for m in methods], key_rows(results, methods, units)),
          "\n## The paper's table (ES-M and Δ per attribute, whole-set scores, probe accuracies)\n",
          markdown_table(["metric"] + [LABELS[m] for m in methods], headline_rows(results, methods, units))]
    if "lora" in methods and len(methods) > 1 and not one:
        md += ["\n## Paired differences, method − LoRA (same draw, seed and stage 1)\n",
               "Mean ± 95% t-interval over the runs; \"no difference shown\" where the interval holds 0; how many "
               "runs are below 0; the range.\n",
               markdown_table(PAIRED_HEADER,
                              paired_rows(results, methods, units)),
               f"\n## Collapse: runs with a whole-set Finding-F1 below {COLLAPSE:g}\n",
               markdown_table(["method", "collapsed", "lowest whole-set Finding-F1",
                               "Δ Finding-F1, race, of the others"], collapse_rows(results, methods, units))]
    if "lora" in methods and len(methods) > 1 and all(predictions_file(root, u, m).is_file()
                                                       for u in units for m in methods):
        md += ["\n## The race gap against LoRA on the same test cases, run by run\n",
               "Change in Δ Finding-F1 (race) [95% paired stratified bootstrap interval over the test cases]; "
               "* where it excludes 0.\n",
               markdown_table(["run"] + [LABELS[m] for m in methods if m != "lora"],
                              paired_bootstrap_rows(root, methods, units))]
    if "lora" in methods:
        md += ["\n## The benchmark's checks on LoRA\n", "False-negative / false-positive rate per race, mean over "
               "the runs (shortcut findings: black patients' findings should be missed more, the others' over-called):\n",
               markdown_table(["race"] + list(synthetic.FINDINGS), benchmark_rows(results, units)),
               "\nTrace swap (same cases, only the race texture changed): share of reported findings lost, "
               "of unreported ones gained, and of all (case, finding) labels changed, mean over the runs:\n",
               markdown_table(["method", "swap", "lost", "gained", "changed"],
                              [[LABELS[m], d] + [ci_cell([results[u + (m,)]["swap"][d][k] for u in units], 3)
                                                 for k in ("lost", "gained", "changed")]
                               for m in methods for d in results[units[0] + (m,)]["swap"]])]
    md.append(extra_md)
    write_output(root, "results.md", lambda p: p.write_text("\n".join(md) + "\n"))
    write_summary(cfg, root, {m: {f"draw{d}/seed{s}": summary_of(results[(d, s, m)])
                                  for d, s, t in sorted(results) if t == m} for m in methods})
    curves = curves or units[:1]
    write_output(root, "curves.png", lambda p: draw_curves(
        {LABELS[m]: [run_dir(root, u, m) / "monitor.jsonl" for u in curves] for m in methods}, p,
        f"The mechanism on the val split ({'; '.join(map(unit_name, curves))}" +
        ("; line: mean, band: range over runs)" if len(curves) > 1 else ")")))
    print("\n".join(md[:3]))  # the key numbers; the paper's table and the rest are in results.md
    say(f"tables in {root / 'results.md'}, numbers in {root / 'summary.json'}, curves in {root / 'curves.png'}")


def _color(k):
    return evaluate.COLORS[k] if k < len(evaluate.COLORS) else ((214, 39, 40), (148, 103, 189), (120, 120, 120))[min(k - 3, 2)]


def draw_lines(panels, path, title, xlabel, xticks=None, colors=None, hollow=()):
    """A grid of line charts with Pillow: panels = [(panel title, {series: [(x, y) or (x, y, lo, hi)]})].
    A point with (lo, hi) gets a band (lines) or an error bar (xticks given: a categorical axis,
    xticks = [(x, label)], evenly spaced). colors: {series: rgb} (default: in legend order); series
    in hollow get open markers. The y axis runs between round values and includes 0."""
    from PIL import Image, ImageDraw
    cols, pw, ph = 3, 420, 300
    names = list(dict.fromkeys(n for _, series in panels for n in series))
    colors = {n: (colors or {}).get(n, _color(k)) for k, n in enumerate(names)}
    font, small = evaluate._font(15), evaluate._font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend, x, y = [], 15, 42  # the legend wraps onto more lines when it is wider than the image
    for n in names:
        w = 22 + measure.textlength(n, font=font)
        if x > 15 and x + w > cols * pw - 15:
            x, y = 15, y + 22
        legend.append((n, x, y))
        x += w + 24
    top = y + 28
    rows = math.ceil(len(panels) / cols)
    img = Image.new("RGB", (cols * pw, top + rows * ph), "white")
    d = ImageDraw.Draw(img, "RGBA")
    d.text((15, 10), title, fill="black", font=evaluate._font(17))
    for n, x, y in legend:
        d.rectangle([x, y, x + 16, y + 14], fill=colors[n], outline=colors[n], width=2)
        if n in hollow:
            d.rectangle([x + 3, y + 3, x + 13, y + 11], fill="white")
        d.text((x + 22, y - 1), n, fill="black", font=font)
    for i, (name, series) in enumerate(panels):
        x0, y0 = (i % cols) * pw + 55, top + (i // cols) * ph + 30
        x1, y1 = x0 + pw - 75, y0 + ph - 75
        pts = [p for s in series.values() for p in s if p[1] == p[1]]
        if not pts:
            continue
        xs = [p[0] for p in pts] + [t for t, _ in xticks or ()]
        ys = [v for p in pts for v in p[1:] if v == v] + [0.0]  # the y axis includes 0
        step = evaluate.round_step(max(max(ys) - min(ys), 1e-9))
        lo, hi = step * math.floor(min(ys) / step + 1e-9), step * math.ceil(max(ys) / step - 1e-9)
        hi = hi if hi > lo else lo + step
        pad = 0.3 if xticks else 0.0  # error bars at the ends stay inside the frame
        xmin, xmax = min(xs) - pad, (max(xs) if max(xs) > min(xs) else min(xs) + 1) + pad
        to = lambda x, y: (x0 + (x1 - x0) * (x - xmin) / (xmax - xmin), y1 - (y1 - y0) * (y - lo) / (hi - lo))
        d.text((x0, y0 - 24), name, fill="black", font=font)
        for t in range(round((hi - lo) / step) + 1):  # grid and labels at round values
            v = lo + t * step
            d.line([x0, to(xmin, v)[1], x1, to(xmin, v)[1]], fill=(235, 235, 235))
            d.text((x0 - 5, to(xmin, v)[1]), f"{round(v, 9):g}", fill="black", font=small, anchor="rm")
        d.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
        xstep = evaluate.round_step(xmax - xmin)
        for t, label in xticks or [(v, f"{v:g}") for k in range(math.ceil(xmin / xstep - 1e-9), math.floor(xmax / xstep + 1e-9) + 1)
                                   for v in [round(k * xstep, 9)]]:
            d.text((to(t, lo)[0], y1 + 8), label, fill="black", font=small, anchor="ma")
        d.text(((x0 + x1) / 2, y1 + 26), xlabel, fill=(90, 90, 90), font=small, anchor="ma")
        for n in names:
            pts = [p for p in series.get(n, []) if p[1] == p[1]]
            if not pts:
                continue
            color = colors[n]
            if len(pts[0]) == 4 and not xticks and len(pts) > 1:  # band
                d.polygon([to(p[0], p[3]) for p in pts] + [to(p[0], p[2]) for p in reversed(pts)], fill=color + (50,))
            line = [to(p[0], p[1]) for p in pts]
            if len(line) > 1:
                d.line(line, fill=color, width=2)
            for p, q in zip(pts, line):
                d.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill="white" if n in hollow else color,
                          outline=color, width=2)
                if len(p) == 4 and xticks:
                    a, b = to(p[0], p[2]), to(p[0], p[3])
                    d.line([a, b], fill=color, width=2)
                    d.line([a[0] - 4, a[1], a[0] + 4, a[1]], fill=color, width=2)
                    d.line([b[0] - 4, b[1], b[0] + 4, b[1]], fill=color, width=2)
    img.save(path)


def _band(runs, key):
    """Monitor logs of several runs -> [(step, mean, min, max)] over the steps they all logged."""
    per = [{r["step"]: r[key] for r in L if key in r} for L in runs]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return [(t, float(np.mean(v)), min(v), max(v)) for t in steps for v in [[p[t] for p in per]]]


def draw_curves(monitors, path, title, colors=None, hollow=()):
    """{series: [monitor.jsonl of each run]} -> curves.png: a fresh probe, phi's accuracy per
    attribute, CLUB(race) and the spread of h, over stage-2 steps (mean and range over the runs)."""
    logs = {n: [[json.loads(line) for line in Path(p).read_text().splitlines()] for p in ps if Path(p).is_file()]
            for n, ps in monitors.items()}
    logs = {n: L for n, L in logs.items() if L}
    panels = [(f"fresh probe: {a} (val accuracy)", {n: _band(L, f"probe/{a}") for n, L in logs.items()})
              for a in ("race", "age", "gender")]
    panels += [(f"phi's accuracy: {a}", {n: _band(L, f"dac_acc/{a}") for n, L in logs.items()})
               for a in ("race", "age", "gender")]
    panels += [("CLUB(race) with the current phi", {n: _band(L, "club/race") for n, L in logs.items()})]
    panels += [("spread of h (rms)", {n: _band(L, "h_rms") for n, L in logs.items()})]
    draw_lines(panels, path, title, "stage-2 step", colors=colors, hollow=hollow)


# ----------------------------------------------------------------------------------------------
# the study and the draws check

DRAWS, SEEDS = (1, 2), tuple(range(10, 16))  # the study's draws and training seeds: no choice was made on them
CONTROL_SEEDS = (10, 11, 12)  # lambda = 0, the benchmark's controls, the dose-response and the curves
ARM_SOURCES = {
    "lora": "LLaVA-Rad's stage 2; rate, rank, epochs scaled to a 1M-parameter model (README, \"The demo\")",
    "fairllava": "the paper's Algorithm 1 (alternating, h raw, one phi step per batch, official lambdas, middle "
                 "layer: its ablation's best; it also says the mean of first, middle and last layers is used in "
                 "practice, not run here); h pooled as a mean over image tokens (the paper says \"pooled\"); phi's lr "
                 "= the backbone's, its N(0, 0.02) init and the smooth penalty: official code (the paper gives none)",
    "fairllava_official": "official code: one optimizer step for phi and the backbone at the same lr, one random "
                          "image token per sample L2-normalised, smooth penalty, N(0, 0.02) init (REFERENCE.md)",
    "fairllava_batch": "this project's variant: h standardised over the batch, phi 5 steps per batch at lr 1e-2 on "
                       "the batch and the last 512 h, lambdas x 0.3: chosen on val (docs/variant_selection.md)",
}


def arms_rows(cfg):
    """Each headline arm's settings, read from the TrainConfig the demo trains it with."""
    rows = []
    for m in HEADLINE_ARMS:
        t = train_config(cfg, {"base": Path("B"), "data": Path("D"), "stage1": Path("S")}, 0, 2, Path("O"),
                         **method_settings(cfg, m))
        f = t.fair
        fair = m != "lora"
        rows.append([LABELS[m], f.protocol if fair else "-", f"{f.pool}, {f.h_norm}" if fair else "-",
                     f"{t.dac_lr:g}" if fair else "-", f"{f.dac_steps} x, memory {f.dac_memory}" if fair else "-",
                     f.dac_init if fair else "-", ("sqrt(CLUB² + eps)" if f.smooth_abs else "CLUB") if fair else "-",
                     " / ".join(f"{f.lambdas[a]:.3g}" for a in ("race", "age", "gender")) if fair else "-",
                     ARM_SOURCES[m]])
    return rows


ARMS_HEADER = ["arm", "protocol", "h: pooling, scaling", "phi lr", "phi steps per batch", "phi init", "penalty",
               "lambda race / age / gender", "source"]


def study(cfg, root, pool):
    """The README's study (docs/study.md): the four headline arms on draws 1 and 2 x seeds 10-15;
    on seeds 10-12 of each draw the lambda = 0 arm of each FairLLaVA arm and the benchmark's
    controls (LoRA without the shortcut, LoRA on decorrelated training data); on draw 1, seeds
    10-12, the batch variant at lambdas x {0.1, 1} (x 0 and x 0.3 are its lambda = 0 arm and the
    variant itself)."""
    paths = {d: prepare(cfg, root, pool, d) for d in DRAWS}
    ctrl = {(d, c): prepare(cfg, root, pool, d, strength=0.0, uniform_train=c == "oracle", name=f"data_{c}")
            for d in DRAWS for c in ("strength0", "oracle")}
    official = FairnessConfig().lambdas
    variant = method_settings(cfg, "fairllava_batch")["fair"]
    scales = sorted({0.0, 0.1, cfg.variant_lambda_scale, 1.0})
    dose_tag = lambda x: ("fairllava_batch_l0" if x == 0 else "fairllava_batch" if x == cfg.variant_lambda_scale
                          else f"fairllava_batch_x{x:g}")
    specs = [Spec(paths[d], d, s, m, monitor=d == DRAWS[0] and s in CONTROL_SEEDS)
             for d in DRAWS for s in SEEDS for m in HEADLINE_ARMS]
    specs += [Spec(paths[d], d, s, m + "_l0", monitor=d == DRAWS[0]) for d in DRAWS for s in CONTROL_SEEDS
              for m in FAIR_ARMS]
    specs += [Spec(ctrl[(d, c)], d, s, "lora", f"lora_{c}") for d in DRAWS for s in CONTROL_SEEDS
              for c in ("strength0", "oracle")]
    specs += [Spec(paths[DRAWS[0]], DRAWS[0], s, "fairllava_batch", dose_tag(x),
                   {"fair": replace(variant, lambdas={a: v * x for a, v in official.items()})})
              for s in CONTROL_SEEDS for x in scales if dose_tag(x).startswith("fairllava_batch_x")]
    say(f"the study: {len(specs)} stage-2 runs on draws {DRAWS}, seeds {SEEDS[0]}-{SEEDS[-1]}")
    results = run_runs(cfg, pool, specs)
    f = lambda r, k: key_numbers(r)[k]
    GAP, WHOLE, PROBE = "Δ Finding-F1, race", "Finding-F1, whole test set", "probe: race from h (chance 25)"
    units = [(d, s) for d in DRAWS for s in SEEDS]
    cunits = [(d, s) for d in DRAWS for s in CONTROL_SEEDS]
    l0 = [m + "_l0" for m in FAIR_ARMS]
    lora_sd = np.std([f(results[u + ("lora",)], GAP) for u in units], ddof=1)
    ctrl_rows = [[f"draw {d}", label] + [gap_cell(race_gap(results[(d, s, tag)]), 1) for s in CONTROL_SEEDS]
                 + [ci_cell([f(results[(d, s, tag)], GAP) for s in CONTROL_SEEDS]),
                    ci_cell([f(results[(d, s, tag)], WHOLE) for s in CONTROL_SEEDS])]
                 for d in DRAWS for tag, label in (("lora", "LoRA, shortcut"), ("lora_strength0", "LoRA, strength 0"),
                                                   ("lora_oracle", "LoRA, decorrelated training data (oracle)"))]
    dunits = [(DRAWS[0], s) for s in CONTROL_SEEDS]
    dose = {x: [results[u + (dose_tag(x),)] for u in dunits] for x in scales}
    dose_rows = [[f"{x:g}"] + [ci_cell([f(r, k) for r in rs]) for k in (PROBE, GAP, f"Finding-F1, {BLACK} patients", WHOLE,
                                                                         "CheXpert-F1, whole test set")]
                 for x, rs in dose.items()]
    lam_keys = (GAP, f"Finding-F1, {BLACK} patients", WHOLE, PROBE)
    extra = ["\n## The arms\n", markdown_table(ARMS_HEADER, arms_rows(cfg)),
             "\nEvery arm: stage 2 from the same stage-1 projector of its draw and seed, lr "
             f"{cfg.lr:g}, {cfg.epochs:g} epochs, batch {cfg.batch_size}, LoRA r {cfg.lora_r}.\n",
             "\n## The race gap against LoRA, draw by draw (does the effect depend on the draw?)\n",
             markdown_table(PAIRED_HEADER, [[f"draw {d}: {row[0]}"] + row[1:] for d in DRAWS for row in paired_rows(
                 results, HEADLINE_ARMS, [u for u in units if u[0] == d], (GAP,))]),
             "\n## The batch variant against the paper protocol (same draw, seed and stage 1)\n",
             markdown_table(PAIRED_HEADER,
                            paired_rows(results, ["fairllava_batch"], units, against="fairllava")),
             "\n## lambda = 0: each FairLLaVA arm with every lambda_a = 0 (phi trains, DIM reaches nothing), "
             f"{len(cunits)} runs (seeds {CONTROL_SEEDS[0]}-{CONTROL_SEEDS[-1]} of each draw)\n",
             "Against LoRA on the same runs (should be no difference: the arm's machinery alone):\n",
             markdown_table(PAIRED_HEADER,
                            paired_rows(results, ["lora"] + l0, cunits, lam_keys)),
             f"\nLoRA's race gap varies over its {len(units)} runs with a standard deviation of {lora_sd:.1f}.\n",
             "\nEach arm against its own lambda = 0 (what DIM does, everything else equal):\n",
             markdown_table(PAIRED_HEADER,
                            [row for m in FAIR_ARMS for row in paired_rows(results, [m + "_l0", m], cunits, lam_keys,
                                                                           against=m + "_l0")]),
             "\n## Controls: is the gap the shortcut's? Δ Finding-F1 (race) per run [95% stratified bootstrap "
             "interval; null = 95th percentile of Δ with the race labels shuffled]\n",
             markdown_table(["draw", "run"] + [f"seed {s}" for s in CONTROL_SEEDS] + ["Δ, mean ± 95% CI",
                                                                                      "whole-set Finding-F1"], ctrl_rows),
             f"\n## Dose-response: the batch variant at lambdas x scale of the official ones (draw {DRAWS[0]}, seeds "
             f"{CONTROL_SEEDS[0]}-{CONTROL_SEEDS[-1]}; x {cfg.variant_lambda_scale:g} is the variant, x 0 its lambda = 0)\n",
             markdown_table(["scale", "probe race", "Δ Finding-F1, race", f"Finding-F1, {BLACK}", "Finding-F1, whole",
                             "CheXpert-F1"], dose_rows)]
    # each arm in its colour of curves.png; its lambda = 0 darker, with open markers
    shade = {LABELS[arm + tail]: tuple(int(c * f) for c in _color(HEADLINE_ARMS.index(arm)))
             for arm in FAIR_ARMS for tail, f in (("", 1.0), ("_l0", 0.55))}
    write_output(root, "curves_lambda0.png", lambda p: draw_curves(
        {LABELS[m]: [run_dir(root, u, m) / "monitor.jsonl" for u in dunits]
         for arm in FAIR_ARMS for m in (arm, arm + "_l0")}, p,
        f"Each FairLLaVA arm with and without DIM ({'; '.join(map(unit_name, dunits))}; mean and range)",
        colors=shade, hollow={LABELS[m + "_l0"] for m in FAIR_ARMS}))
    lora_d = [results[u + ("lora",)] for u in dunits]
    write_output(root, "tradeoff.png", lambda p: draw_lines(
        [(title, {"FairLLaVA, batch-standardised h": [(i, *_ci3([fn(r) for r in dose[x]])) for i, x in enumerate(scales)],
                  "LoRA (same runs)": [(i, *_ci3([fn(r) for r in lora_d])) for i in range(len(scales))]})
         for title, fn in (("fresh probe: race (test, %)", lambda r: f(r, PROBE)), ("gap in Finding-F1 by race", lambda r: f(r, GAP)),
                           ("Finding-F1, black patients", lambda r: f(r, f"Finding-F1, {BLACK} patients")),
                           ("Finding-F1, whole test set", lambda r: f(r, WHOLE)))],
        p, f"Fairness-utility trade-off (draw {DRAWS[0]}, seeds {CONTROL_SEEDS[0]}-{CONTROL_SEEDS[-1]}: mean, 95% CI)",
        "lambdas x scale (official 0.2 / 0.6 / 0.1)", xticks=[(i, f"{x:g}") for i, x in enumerate(scales)]))
    write_report(cfg, root, {k: v for k, v in results.items() if k[2] in HEADLINE_ARMS and k[:2] in units},
                 HEADLINE_ARMS, "\n".join(extra), curves=dunits)


def _ci3(values):
    mu, half = mean_ci(values)
    return (mu, mu - half, mu + half) if len(values) > 1 else (mu, mu, mu)


def check_draws(cfg, root, pool):
    """The benchmark on other draws: LoRA and the same draw's shortcut-free control, one training
    seed each; the shortcut's gap should lie clearly above the control's on every draw."""
    seed, specs = cfg.seeds[0], []
    for d in cfg.check_draws:
        specs += [Spec(prepare(cfg, root, pool, d), d, seed, "lora"),
                  Spec(prepare(cfg, root, pool, d, strength=0.0, name="data_strength0"), d, seed, "lora", "lora_strength0")]
    results = run_runs(cfg, pool, specs)
    rows, lows, highs, whole = [], [], [], []
    for d in cfg.check_draws:
        lora, ctl = results[(d, seed, "lora")], results[(d, seed, "lora_strength0")]
        lows.append(race_gap(lora)["ci"]["gap"][0])
        highs.append(race_gap(ctl)["ci"]["gap"][1])
        whole.append(key_numbers(lora)["Finding-F1, whole test set"])
        fnr = lambda g: " / ".join(f"{lora['error_rates'][g][k]['fnr']:.2f}" for k in synthetic.FINDINGS[:3])
        rows.append([str(d), gap_cell(race_gap(lora), 1), gap_cell(race_gap(ctl), 1),
                     "yes" if lows[-1] > highs[-1] else "NO", f"{whole[-1]:.1f}", fnr(BLACK), fnr("white")])
    md = [f"# The benchmark on draws {', '.join(map(str, cfg.check_draws))} (training seed {seed})\n",
          "LoRA's Δ Finding-F1 (race) against the same draw's shortcut-free control (shortcut_strength 0) "
          "[95% stratified bootstrap interval; null = 95th percentile of Δ with the race labels shuffled].\n",
          markdown_table(["draw", "LoRA Δ", "strength 0 Δ", "LoRA above?", "LoRA whole-set Finding-F1",
                          f"FNR {BLACK} ({'/'.join(synthetic.FINDINGS[:3])})", "FNR white"], rows),
          f"\nLowest LoRA lower bound {min(lows):.1f}; highest control upper bound {max(highs):.1f}; "
          f"LoRA's whole-set Finding-F1 {min(whole):.1f}-{max(whole):.1f}.\n"]
    write_output(root, "results.md", lambda p: p.write_text("\n".join(md)))
    write_summary(cfg, root, {f"draw{d}/seed{s}/{t}": summary_of(r) for (d, s, t), r in results.items()})
    print("\n".join(md))


def main(argv=None):
    cfg = parse_args(argv)
    t0 = time.time()
    root = Path(cfg.dir)
    _not_a_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    outputs.check(root, OUTPUTS, "the demo")  # refuse now, not after the runs, a file the report would replace
    with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"), initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        if cfg.study:
            study(cfg, root, pool)
        elif cfg.check_draws:
            check_draws(cfg, root, pool)
        else:
            paths = prepare(cfg, root, pool, cfg.data_seed)
            results = run_runs(cfg, pool, [Spec(paths, cfg.data_seed, s, m, monitor=True)
                                           for s in cfg.seeds for m in cfg.methods])
            write_report(cfg, root, results, cfg.methods, curves=[(cfg.data_seed, s) for s in cfg.seeds[:3]])
    say(f"done in {(time.time() - t0) / 60:.1f} min; outputs under {root}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # DemoError and outputs.OutputError are ValueErrors
        sys.exit(f"demo.py: error: {data.one_line(e)}")
