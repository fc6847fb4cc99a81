"""The built-in demo: FairLLaVA on a synthetic chest X-ray benchmark with a real shortcut, on a CPU.

    python3 demo.py                       # one seed, three methods, about 7 minutes on 2 CPU cores
    python3 demo.py --seeds 0 1 2         # with 95% intervals over seeds and paired differences
    python3 demo.py --study               # the README's study: seeds, lambda = 0, dose-response, controls (~28 min)
    python3 demo.py --lr 1e-3 --dir runs/slow   # any setting below can be changed from the command line

What it does, through the same code and file formats as a real run:
1. synthetic.make_synthetic writes the benchmark (synthetic.py: black patients are under-diagnosed
   in training; the held-out splits are decorrelated).
2. Stand-ins for the public base models, pre-trained on the decorrelated "pretrain" split, so no
   shortcut hides in them: a tiny Llama on the report text ("Vicuna", HF layout) and a tiny ViT
   on the findings and the demographics ("BiomedCLIP", open_clip layout with open_clip_config.json).
3. Per seed: stage 1 (projector), then stage 2 from that projector once per method:
     lora             plain LoRA (the LLaVA-Rad baseline)
     fairllava        FairLLaVA, the paper's protocol: h raw, one AdamW step of phi per batch
     fairllava_batch  FairLLaVA with h standardised over the batch for phi and DIM (scale-blind),
                      phi fitted 5 times per batch at lr 1e-2 on the batch and the last 512 h,
                      lambdas x 0.3: settings chosen on the val split (docs/variant_selection.md)
   Each logs the mechanism on the val split (monitor.jsonl: a fresh probe, phi's accuracy, CLUB,
   the spread of h) and is evaluated on the test split: BLEU, CheXpert-F1 and the benchmark's
   Finding-F1 per group with gaps, ES-M and bootstrap intervals, per-group error rates, the
   trace-swap flip rate, and a fresh probe's accuracy at reading each attribute from h.
4. results.md (the tables), curves.png (the mechanism), summary.json (every number) in --dir.

Every unit of work (data, base models, stage 1, each run, each evaluation) records the settings
it was made with; a folder is reused only when they equal the requested ones, refused otherwise
(--overwrite redoes it). Two worker processes train side by side (--workers), one thread each.
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
LABELS = {"lora": "LoRA (LLaVA-Rad baseline)", "fairllava": "FairLLaVA (paper protocol)",
          "fairllava_official": "FairLLaVA (official code)",
          "fairllava_batch": "FairLLaVA (batch-standardised h)", "resample": "Resampling", "reweight": "Reweighting"}


class DemoError(ValueError):
    pass


@dataclass
class DemoConfig:
    dir: str = field(default="runs/demo", metadata=dict(help="where data, models and results go"))
    seeds: tuple = field(default=(0,), metadata=dict(help="seeds to run (intervals need 2 or more)"))
    methods: tuple = field(default=("lora", "fairllava", "fairllava_batch"),
                           metadata=dict(help=f"methods to compare: {', '.join(LABELS)}"))
    workers: int = field(default=2, metadata=dict(help="training processes side by side (one thread each)"))
    overwrite: bool = field(default=False, metadata=dict(help="redo a folder whose recorded settings differ"))
    # the benchmark
    shortcut_strength: float = field(default=1.0, metadata=dict(help="0: no shortcut; 1: black 0.08 vs 0.40"))
    n_test: int = field(default=2400, metadata=dict(help="test cases (race drawn uniformly: about a quarter each)"))
    data_seed: int = field(default=0, metadata=dict(help="seed of the synthetic data"))
    # training: the 7B recipe at the scale of a 1M-parameter model (higher rates, smaller rank)
    stage1_lr: float = field(default=5e-3, metadata=dict(help="stage 1 learning rate"))
    stage1_epochs: float = field(default=3.0, metadata=dict(help="stage 1 epochs"))
    lr: float = field(default=3e-3, metadata=dict(help="stage 2 learning rate (LoRA + projector)"))
    epochs: float = field(default=3.0, metadata=dict(help="stage 2 epochs"))
    batch_size: int = field(default=16, metadata=dict(help="samples per step"))
    lora_r: int = field(default=16, metadata=dict(help="LoRA rank (alpha = 2 r)"))
    dac_lr: float = field(default=1e-3, metadata=dict(help="phi's learning rate, paper protocol"))
    lambda_scale: float = field(default=1.0, metadata=dict(help="paper protocol: lambdas x this"))
    variant_dac_lr: float = field(default=1e-2, metadata=dict(help="fairllava_batch: phi's learning rate"))
    variant_dac_steps: int = field(default=5, metadata=dict(help="fairllava_batch: phi steps per batch"))
    variant_dac_memory: int = field(default=512, metadata=dict(help="fairllava_batch: earlier h phi also fits"))
    variant_lambda_scale: float = field(default=0.3, metadata=dict(help="fairllava_batch: lambdas x this"))
    study: bool = field(default=False, metadata=dict(help="run the whole study (about 28 minutes on 2 cores)"))


def parse_args(argv=None):
    p = data.OneLineParser(prog="demo.py", description=__doc__.split("\n")[0], formatter_class=data.HelpFormatter)
    for f in fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif isinstance(f.default, tuple):
            p.add_argument(flag, nargs="+", type=type(f.default[0]), default=list(f.default), help=f.metadata["help"])
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
    bad = [v for v in cfg.seeds + (cfg.data_seed,) if not 0 <= v < 2 ** 32]
    if bad:
        p.error(f"--seeds and --data-seed must be in [0, 2**32) (numpy's seeds), got {bad[0]}")
    if len(set(cfg.seeds)) < len(cfg.seeds):
        p.error(f"--seeds lists a seed twice: {' '.join(map(str, cfg.seeds))}")
    if cfg.variant_dac_memory < 0:
        p.error(f"--variant-dac-memory must be >= 0, got {cfg.variant_dac_memory}")
    for name in ("stage1_lr", "stage1_epochs", "lr", "epochs", "dac_lr", "variant_dac_lr"):
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
OUTPUTS = ("results.md", "summary.json", "curves.png", "tradeoff.png")


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
    """TrainConfig fields of a demo method."""
    lam = FairnessConfig().lambdas  # the official 0.2 / 0.6 / 0.1
    if method == "fairllava":
        return dict(method="fairllava", dac_lr=cfg.dac_lr,
                    fair=FairnessConfig(lambdas={a: v * cfg.lambda_scale for a, v in lam.items()}))
    if method == "fairllava_official":  # as the official code trains: REFERENCE.md, "How the official code trains phi"
        return dict(method="fairllava", dac_lr=cfg.lr, fair=FairnessConfig(
            protocol="single_step", pool="random_token", h_norm="l2", smooth_abs=True, dac_init="normal",
            lambdas={a: v * cfg.lambda_scale for a, v in lam.items()}))
    if method == "fairllava_batch":
        return dict(method="fairllava", dac_lr=cfg.variant_dac_lr, fair=FairnessConfig(
            h_norm="batch", dac_steps=cfg.variant_dac_steps, dac_memory=cfg.variant_dac_memory,
            lambdas={a: v * cfg.variant_lambda_scale for a, v in lam.items()}))
    return dict(method=method)


def train_config(cfg, paths, seed, stage, out, **kw):
    base = dict(llm=str(paths["base"] / "llm"), vision=str(paths["base"] / "vision"),
                tokenizer=str(paths["base"] / "llm"), train_json=str(paths["data"] / "train.json"), dataset="mimic",
                seed=seed, batch_size=cfg.batch_size, grad_accum=1, num_workers=0, max_length=256, dtype="fp32",
                grad_checkpointing=False, save_every=10 ** 9, log_every=25, stage=stage, out=str(out),
                lora=LoRAConfig(r=cfg.lora_r, alpha=2.0 * cfg.lora_r, dropout=0.05))
    if stage == 1:
        base.update(method="lora", lr=cfg.stage1_lr, epochs=cfg.stage1_epochs)
    else:
        base.update(lr=cfg.lr, epochs=cfg.epochs, projector=str(Path(paths["stage1"]) / "mm_projector.bin"),
                    monitor_json=str(paths["data"] / "val.json"), monitor_every=25, monitor_n=400)
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
    return {**asdict(tcfg), "inputs": contents(*dict.fromkeys(p for p in run_inputs(tcfg).values() if p))}


def run_unit(tcfg, name, overwrite):
    """Train one stage (in a worker): skipped when the folder holds a finished run of the same settings."""
    torch.set_num_threads(1)  # tiny tensors: one thread each, two processes side by side
    out = Path(tcfg.out)
    key, root = run_key(tcfg), out.parent.parent  # out = DIR/seedS/NAME
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
    root = run.parent.parent
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


def prepare(cfg, root, pool, strength=None, uniform_train=False, name="data"):
    """The benchmark (one folder per shortcut setting) and the base models (shared: they depend
    on the pretrain split only, which no shortcut setting changes)."""
    scfg = synthetic.SyntheticConfig(n_test=cfg.n_test, seed=cfg.data_seed, uniform_train=uniform_train,
                                     shortcut_strength=cfg.shortcut_strength if strength is None else strength)
    data_dir = root / name
    if not unit(data_dir, asdict(scfg), cfg.overwrite):
        t = time.time()
        synthetic.make_synthetic(data_dir, scfg)
        done(data_dir, asdict(scfg))
        say(f"benchmark written to {data_dir} ({time.time() - t:.0f}s)")
    base = root / "base"
    pre = {k: v for k, v in asdict(scfg).items() if k not in ("n_train", "n_val", "n_test", "n_swap",
                                                              "shortcut_strength", "uniform_train")}
    if pool is not None and not unit(base, pre, cfg.overwrite):
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


def _pretrain(which, data_dir, out):
    torch.set_num_threads(1)
    (pretrain_llm if which == "llm" else pretrain_vit)(data_dir, out)


def run_runs(cfg, pool, specs):
    """specs: [(paths, seed, method, tag, extra TrainConfig fields)] -> {tag: results}. Stage 1 of
    each (data, seed) first, then every stage 2 + evaluation, two at a time."""
    stage1 = {}
    for paths, seed, *_ in specs:
        s1 = paths["data"].parent / f"seed{seed}" / f"stage1_{paths['data'].name}"
        stage1.setdefault(str(s1), (train_config(cfg, paths, seed, 1, s1), f"seed {seed} stage 1 ({paths['data'].name})"))
    [j.result() for j in [pool.submit(run_unit, t, n, cfg.overwrite) for t, n in stage1.values()]]
    jobs = {}
    for paths, seed, method, tag, extra in specs:
        s1 = paths["data"].parent / f"seed{seed}" / f"stage1_{paths['data'].name}"
        p = {**paths, "stage1": s1}
        out = paths["data"].parent / f"seed{seed}" / tag
        tcfg = train_config(cfg, p, seed, 2, out, **{**method_settings(cfg, method), **extra})
        jobs[(seed, tag)] = pool.submit(stage2_and_eval, tcfg, p, f"seed {seed} {tag}", cfg.overwrite)
    return {k: j.result() for k, j in jobs.items()}


# ----------------------------------------------------------------------------------------------
# tables, figures, summary.json

def mean_ci(values):
    """Mean and the half-width of its 95% t-interval (NaN for one value)."""
    v = np.asarray(values, dtype=float)
    half = metrics.t_quantile(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(half)


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


def key_numbers(res):
    """The few numbers that tell the story of one run (the README's table), all 0-100."""
    find = res["fairness"]["race"][synthetic.FINDING_F1.name]
    chex = res["fairness"]["race"]["CheXpert-F1 (micro)"]
    black = synthetic.RACE_NAMES[synthetic.SyntheticConfig.disadvantaged_race]
    others = [g["score"] for name, g in find["groups"].items() if name != black]
    swap = res["swap"]
    n = sum(v["n_cases"] for v in swap.values())
    return {"Δ Finding-F1, race": find["gap"], f"Finding-F1, {black} patients": find["groups"][black]["score"],
            "Finding-F1, other races (mean)": sum(others) / len(others), "ES-Finding-F1, race": find["es"],
            "Δ CheXpert-F1, race": chex["gap"], "ES-CheXpert-F1, race": chex["es"],
            "Finding-F1, whole test set": res["overall"][synthetic.FINDING_F1.name]["score"],
            "CheXpert-F1, whole test set": res["overall"]["CheXpert-F1 (micro)"]["score"],
            "BLEU-4, whole test set": res["overall"]["BLEU-4"]["score"],
            "probe: race from h (chance 25)": res["probe"]["race"]["accuracy"],
            f"trace swap: findings lost, white→{black}": 100 * swap[f"white->{black}"]["lost"],
            "trace swap: labels changed, all": 100 * sum(v["changed"] * v["n_cases"] for v in swap.values()) / n}


def key_rows(results, methods, seeds):
    """The README's table: one seed -> the value (with its bootstrap interval for the race gap);
    several -> mean +- 95% t-interval over seeds."""
    rows = []
    for k in key_numbers(results[(seeds[0], methods[0])]):
        cells = []
        for m in methods:
            vals = [key_numbers(results[(s, m)])[k] for s in seeds]
            mu, half = mean_ci(vals)
            if len(vals) > 1:
                cells.append(f"{mu:.1f} ± {half:.1f}")
            elif k == "Δ Finding-F1, race":
                cells.append(gap_cell(results[(seeds[0], m)]["fairness"]["race"][synthetic.FINDING_F1.name], 1))
            else:
                cells.append(f"{mu:.1f}")
        rows.append([k] + cells)
    return rows


def gap_cell(rep, digits=2):
    """A gap with its stratified-bootstrap interval and, beside it, its null: what max - min comes
    to at these group sizes when the groups do not differ (labels shuffled; 95th percentile)."""
    lo, hi = rep["ci"]["gap"]
    null = f"; null {rep['gap_null']['q95']:.{digits}f}" if "gap_null" in rep else ""
    return f"{rep['gap']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}{null}]"


def headline_rows(results, methods, seeds):
    """Rows of the main table: each headline number as mean +- 95% CI over seeds (one seed: the
    value and its bootstrap interval)."""
    keys = list(evaluate.headline(results[(seeds[0], methods[0])]))
    rows = []
    for k in keys:
        cells = []
        for m in methods:
            vals = [evaluate.headline(results[(s, m)])[k] for s in seeds]
            mu, half = mean_ci(vals)
            cells.append(f"{mu:.2f}" + (f" ± {half:.2f}" if len(vals) > 1 else ""))
        rows.append([k] + cells)
    return rows


def paired_rows(results, methods, seeds, keys):
    """Per-seed differences method - LoRA, mean +- 95% CI: the paired comparison."""
    flat = lambda r: evaluate.headline(r) | key_numbers(r)
    rows = []
    for m in methods:
        if m == "lora":
            continue
        for k in keys:
            d = [flat(results[(s, m)])[k] - flat(results[(s, "lora")])[k] for s in seeds]
            mu, half = mean_ci(d)
            rows.append([LABELS[m], k, f"{mu:+.2f} ± {half:.2f}", " ".join(f"{x:+.2f}" for x in d)])
    return rows


PAIRED_KEYS = ("Δ-FindF1(R)", "ES-FindF1(R)", "Finding-F1, black patients", "Finding-F1, other races (mean)",
               "Finding-F1 (shortcut findings)", "CheXpert-F1 (micro)", "BLEU-4", "probe race")


def benchmark_rows(results, seeds):
    """The benchmark's checks on the baseline: per-race error rates and the trace swap."""
    rows = []
    for s in seeds:
        er = results[(s, "lora")]["error_rates"]
        for g, by_f in er.items():
            rows.append([str(s), g] + [f"{by_f[k]['fnr']:.2f} / {by_f[k]['fpr']:.2f}" for k in synthetic.FINDINGS])
    return rows


def test_split(results):
    """"2400 decorrelated cases (582-631 per race)", as the runs were scored."""
    res = next(iter(results.values()))
    sizes = [g["n"] for g in res["fairness"]["race"][synthetic.FINDING_F1.name]["groups"].values()]
    return f"{sum(sizes)} decorrelated cases ({min(sizes)}-{max(sizes)} per race)"


def write_report(cfg, root, results, methods, extra_md=""):
    seeds = sorted({s for s, _ in results})
    methods = [m for m in methods if all((s, m) in results for s in seeds)]
    md = [f"# FairLLaVA demo: {len(seeds)} seed(s) {seeds}\n",
          f"Test split: {test_split(results)}. Δ = max_g − min_g over groups, ES = M / (1 + Δ); "
          "FindF1 = micro-F1 over the three shortcut findings (the benchmark's labeler), F1 = CheXpert-style "
          "micro-F1. " + ("Mean ± 95% t-interval over seeds." if len(seeds) > 1 else
                          "One seed; Δ [95% stratified bootstrap interval; null = the 95th percentile of Δ with the "
                          "race labels shuffled, what no gap looks like at these group sizes].") + "\n",
          markdown_table([""] + [LABELS[m] for m in methods], key_rows(results, methods, seeds)),
          "\n## The paper's table (ES-M and Δ per attribute, whole-set scores, probe accuracies)\n",
          markdown_table(["metric"] + [LABELS[m] for m in methods], headline_rows(results, methods, seeds))]
    if "lora" in methods and len(methods) > 1 and len(seeds) > 1:
        md += ["\n## Paired differences, method − LoRA (same seed, same stage 1)\n",
               markdown_table(["method", "metric", "mean ± 95% CI", "per seed"],
                              paired_rows(results, methods, seeds, PAIRED_KEYS))]
    if "lora" in methods:
        md += ["\n## The benchmark's checks on LoRA\n", "False-negative / false-positive rate per race "
               "(shortcut findings: black patients' findings should be missed more, the others' over-called):\n",
               markdown_table(["seed", "race"] + list(synthetic.FINDINGS), benchmark_rows(results, seeds)),
               "\nTrace swap (same cases, only the race texture changed): share of reported findings lost, "
               "of unreported ones gained, and of all (case, finding) labels changed:\n",
               markdown_table(["method", "seed", "swap", "lost", "gained", "changed"],
                              [[LABELS[m], str(s), d, f"{v['lost']:.3f}", f"{v['gained']:.3f}", f"{v['changed']:.3f}"]
                               for m in methods for s in seeds for d, v in results[(s, m)]["swap"].items()])]
    md.append(extra_md)
    write_output(root, "results.md", lambda p: p.write_text("\n".join(md) + "\n"))
    summary = {"config": asdict(cfg), "seeds": seeds,
               "runs": {m: {str(s): summary_of(results[(s, m)]) for s in seeds} for m in methods}}
    write_output(root, "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1, allow_nan=False, default=str)))
    write_output(root, "curves.png", lambda p: draw_curves(
        {LABELS[m]: root / f"seed{seeds[0]}" / m / "monitor.jsonl" for m in methods}, p,
        f"The mechanism on the val split (seed {seeds[0]})"))
    print("\n".join(md[:3]))  # the key numbers; the paper's table and the rest are in results.md
    say(f"tables in {root / 'results.md'}, numbers in {root / 'summary.json'}, curves in {root / 'curves.png'}")


def draw_lines(panels, path, title, xlabel):
    """A grid of line charts with Pillow: panels = [(panel title, {series: [(x, y), ...]})]."""
    from PIL import Image, ImageDraw
    cols, pw, ph, top = 3, 420, 300, 70
    rows = math.ceil(len(panels) / cols)
    img = Image.new("RGB", (cols * pw, top + rows * ph), "white")
    d = ImageDraw.Draw(img)
    font, small = evaluate._font(15), evaluate._font(12)
    d.text((15, 10), title, fill="black", font=evaluate._font(19))
    names = list(dict.fromkeys(n for _, series in panels for n in series))
    x = 15
    for k, n in enumerate(names):
        color = evaluate.COLORS[k % 3] if k < 3 else (120, 120, 120)
        d.rectangle([x, 42, x + 16, 56], fill=color)
        d.text((x + 22, 41), n, fill="black", font=font)
        x += 22 + d.textlength(n, font=font) + 24
    for i, (name, series) in enumerate(panels):
        x0, y0 = (i % cols) * pw + 55, top + (i // cols) * ph + 30
        x1, y1 = x0 + pw - 75, y0 + ph - 75
        pts = [p for s in series.values() for p in s if p[1] == p[1]]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        lo, hi = min(ys + [0.0]), max(ys)
        hi = hi if hi > lo else lo + 1
        xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        to = lambda p: (x0 + (x1 - x0) * (p[0] - xmin) / (xmax - xmin), y1 - (y1 - y0) * (p[1] - lo) / (hi - lo))
        d.text((x0, y0 - 24), name, fill="black", font=font)
        d.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
        for t in range(5):
            v = lo + (hi - lo) * t / 4
            d.text((x0 - 5, to((xmin, v))[1]), f"{v:.2g}", fill="black", font=small, anchor="rm")
        d.text((x0, y1 + 8), f"{xmin:g}", fill="black", font=small)
        d.text((x1, y1 + 8), f"{xmax:g}", fill="black", font=small, anchor="ra")
        d.text(((x0 + x1) / 2, y1 + 22), xlabel, fill=(90, 90, 90), font=small, anchor="ma")
        for k, n in enumerate(names):
            if n in series and series[n]:
                color = evaluate.COLORS[k % 3] if k < 3 else (120, 120, 120)
                line = [to(p) for p in series[n] if p[1] == p[1]]
                d.line(line, fill=color, width=2) if len(line) > 1 else None
                for p in line:
                    d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
    img.save(path)


def draw_curves(monitors, path, title):
    """monitor.jsonl of each run -> curves.png: probe, phi's accuracy and CLUB per attribute, spread of h."""
    logs = {n: [json.loads(line) for line in Path(p).read_text().splitlines()] for n, p in monitors.items()
            if Path(p).is_file()}
    panels = [(f"fresh probe: {a} (val accuracy)", {n: [(r["step"], r[f"probe/{a}"]) for r in L if f"probe/{a}" in r]
                                                   for n, L in logs.items()}) for a in ("race", "age", "gender")]
    panels += [(f"phi's accuracy: {a}", {n: [(r["step"], r[f"dac_acc/{a}"]) for r in L if f"dac_acc/{a}" in r]
                                        for n, L in logs.items()}) for a in ("race", "gender")]
    panels += [("CLUB(race) with the current phi", {n: [(r["step"], r["club/race"]) for r in L if "club/race" in r]
                                                   for n, L in logs.items()})]
    panels += [("spread of h (rms, log10)", {n: [(r["step"], math.log10(r["h_rms"])) for r in L] for n, L in logs.items()})]
    draw_lines(panels, path, title, "stage-2 step")


def study(cfg, root, pool, paths):
    """Seeds 0-2 x three methods; the batch variant at lambdas x {0, 0.1, 1} of the official ones
    on seed 0 (x 0.3 is the variant itself; x 0 the lambda = 0 control); on every seed, LoRA
    without the shortcut (strength 0) and LoRA trained on decorrelated data (the oracle)."""
    seeds, methods = (0, 1, 2), ("lora", "fairllava", "fairllava_batch")
    no_shortcut = prepare(cfg, root, None, strength=0.0, name="data_strength0")
    oracle = prepare(cfg, root, None, strength=0.0, uniform_train=True, name="data_oracle")
    no_shortcut["base"] = oracle["base"] = paths["base"]
    variant = method_settings(cfg, "fairllava_batch")["fair"]
    official = FairnessConfig().lambdas
    scaled = lambda s: {"fair": replace(variant, lambdas={a: v * s for a, v in official.items()})}
    scales = (0.0, 0.1, 1.0)
    specs = [(paths, s, m, m, {}) for s in seeds for m in methods]
    specs += [(paths, 0, "fairllava_batch", f"fairllava_batch_x{s:g}", scaled(s)) for s in scales]
    specs += [(d, s, "lora", name, {}) for s in seeds
              for d, name in ((no_shortcut, "lora_strength0"), (oracle, "lora_oracle"))]
    results = run_runs(cfg, pool, specs)
    dose = {**{s: results[(0, f"fairllava_batch_x{s:g}")] for s in scales},
            cfg.variant_lambda_scale: results[(0, "fairllava_batch")]}
    dose = dict(sorted(dose.items()))
    f = lambda r, k: evaluate.headline(r)[k]
    gap = lambda r: r["fairness"]["race"][synthetic.FINDING_F1.name]
    interval = lambda r: gap_cell(gap(r))
    controls = (("lora", "LoRA, shortcut"), ("lora_strength0", "LoRA, shortcut_strength 0"),
                ("lora_oracle", "LoRA, oracle: decorrelated training data"))
    ctrl = [[f"{label}, seed {s}", interval(r), f"{f(r, synthetic.FINDING_F1.name):.2f}", f"{f(r, 'probe race'):.1f}"]
            for run, label in controls for s in seeds for r in [results[(s, run)]]]
    dose_rows = [[f"{s:g}", f"{f(r, 'probe race'):.1f}", interval(r), f"{f(r, synthetic.FINDING_F1.name):.2f}",
                  f"{f(r, 'CheXpert-F1 (micro)'):.2f}"] for s, r in dose.items()]
    lora_spread = [f(results[(s, "lora")], k) for s in seeds for k in ("Δ-FindF1(R)",)]
    extra = ["\n## Controls: is the gap the shortcut's? (Δ-FindF1 by race [95% stratified bootstrap CI; the 95th "
             "percentile of the gap with the race labels shuffled])\n",
             markdown_table(["run", "Δ-FindF1(R) [95% CI; null]", "FindF1, whole set", "probe race"], ctrl),
             "\n## Dose-response: FairLLaVA (batch-standardised h), lambdas x scale of the official ones (seed 0)\n",
             markdown_table(["scale", "probe race", "Δ-FindF1(R) [95% CI; null]", "FindF1", "CheXpert-F1"], dose_rows),
             f"\nScale {cfg.variant_lambda_scale:g} is the variant of the main table; scale 0 is the lambda = 0 control "
             "(phi trains, nothing reaches the backbone).\n",
             "lambda = 0 vs LoRA (seed 0): " + ", ".join(
                 f"{k} {f(dose[0.0], k):.2f} vs {f(results[(0, 'lora')], k):.2f}"
                 for k in ("Δ-FindF1(R)", synthetic.FINDING_F1.name, "CheXpert-F1 (micro)", "probe race"))
             + f"; LoRA's Δ-FindF1(R) over seeds 0-2: {', '.join(f'{v:.2f}' for v in lora_spread)}.\n"]
    write_output(root, "tradeoff.png", lambda p: draw_lines([(title, {"FairLLaVA, batch-standardised h": [(s, fn(r)) for s, r in dose.items()],
                         "LoRA (seed 0)": [(s, fn(results[(0, "lora")])) for s in dose]})
                for title, fn in (("fresh probe: race (test, %)", lambda r: f(r, "probe race")),
                                  ("gap in Finding-F1 by race", lambda r: gap(r)["gap"]),
                                  ("Finding-F1, whole test set", lambda r: f(r, synthetic.FINDING_F1.name)))],
               p, "Fairness-utility trade-off (seed 0)", "lambdas x scale (official 0.2 / 0.6 / 0.1)"))
    write_report(cfg, root, {k: v for k, v in results.items() if k[1] in methods}, methods, "\n".join(extra))


def main(argv=None):
    cfg = parse_args(argv)
    t0 = time.time()
    root = Path(cfg.dir)
    _not_a_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    outputs.check(root, OUTPUTS, "the demo")  # refuse now, not after the runs, a file the report would replace
    with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"), initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        paths = prepare(cfg, root, pool)
        if cfg.study:
            study(cfg, root, pool, paths)
        else:
            results = run_runs(cfg, pool, [(paths, s, m, m, {}) for s in cfg.seeds for m in cfg.methods])
            write_report(cfg, root, results, cfg.methods)
    say(f"done in {(time.time() - t0) / 60:.1f} min; outputs under {root}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # DemoError and outputs.OutputError are ValueErrors
        sys.exit(f"demo.py: error: {data.one_line(e)}")
