"""The files of a training run, next door to train.py: what --out holds and when it may be written,
the pickle-free checkpoint that --resume continues from exactly, the exports evaluate.py reads, and
the held-out monitor of the mechanism (monitor.jsonl).

Outputs in --out: `config.json` (the settings), `mm_projector.bin` (LLaVA key names), `adapter/`
(PEFT format), `log.jsonl` (one line per optimizer step), `monitor.jsonl` (with --monitor-json),
`tensorboard/` (with --report-to tensorboard: the same numbers as TensorBoard events) and
`checkpoint.pt` (trainable tensors, phi included + optimizers + step + RNG state, written
atomically, loadable with weights_only=True). A fresh run needs an empty --out (--overwrite clears
train.py's files first, and only those; an input of the run inside --out is refused); --resume
refuses changed settings (RESUMABLE lists the flags that may change) and cuts the logs back to
the checkpoint's step, so that after a kill each step is logged once.
"""

import json
import numbers
import os
import random
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
from config import NESTED
from lora import lora_state_dict, save_peft_adapter
from checkpoint import check_state_dict


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


# Settings that may differ on --resume: they decide what is logged and saved, and when, but not the
# numbers, so the resumed run stays the uninterrupted one. Every other setting is fixed by the
# checkpoint: --max-steps and --epochs too, as the learning-rate schedule is a function of the total.
RESUMABLE = ("out", "resume", "save_every", "log_every", "report_to", "max_bad_steps", "monitor_json",
             "monitor_every", "monitor_n", "num_workers", "stop_after", "dump_grads")


# What train.py writes in --out (plus NAME.tmp while writing): what --overwrite may delete.
OUTPUTS = ("config.json", "log.jsonl", "monitor.jsonl", "checkpoint.pt", "mm_projector.bin", "adapter", "tensorboard")


def check_out(cfg, overwrite):
    """Before anything is built: a fresh run needs an empty --out (or --overwrite, which may only
    delete what train.py writes); a resumed one its checkpoint, made with the same settings.
    -> the checkpoint's dict, or None."""
    out = Path(cfg.out)
    blocker = data.nearest_existing(out)
    if not blocker.is_dir():
        raise ValueError(f"--out {out}: {'' if blocker == out.absolute() else f'{blocker} '}is a file, not a folder")
    for flag, path in run_inputs(cfg).items():  # an input in --out would be cleared (--overwrite) or written over
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


# The inputs of a training run, by flag, and what each must be (the preflight checks them so).
INPUT_KINDS = {"--llm": "model", "--vision": "model", "--projector": "file", "--adapter": "folder",
               "--tokenizer": "file or folder", "--train-json": "file", "--image-root": "folder",
               "--monitor-json": "file"}


def run_inputs(cfg):
    """{flag: path} of every input of the run ("" where not given; hub ids never lie inside --out)."""
    return {flag: getattr(cfg, flag[2:].replace("-", "_")) for flag in INPUT_KINDS}


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
# --report-to tensorboard: the numbers of log.jsonl and monitor.jsonl, also as TensorBoard events


def summary_writer():
    """torch's SummaryWriter class, or a one-line refusal saying what to install: it needs the
    tensorboard package, which nothing else in the project needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--report-to tensorboard needs the tensorboard package, which is not installed: "
                         "pip install tensorboard (or leave --report-to at none)") from None
    return SummaryWriter


class Board:
    """--out/tensorboard/ (rank 0 only): each number of a log.jsonl line as the scalar train/NAME,
    and of a monitor.jsonl point as monitor/NAME, at the line's step. log.jsonl stays the record;
    this is a view of it."""

    def __init__(self, out, step):
        # A resumed run (step > 0) hides what the killed run logged after its checkpoint, as
        # log.jsonl is cut back to it: TensorBoard drops the events from purge_step on. Events are
        # flushed every 10 s, so the view follows the run (log.jsonl is flushed every step).
        self.writer = summary_writer()(str(Path(out) / "tensorboard"), purge_step=step + 1 if step else None,
                                       flush_secs=10)

    def write(self, section, record):
        for name, value in record.items():
            # bools count too ("skipped" as 0 / 1); numpy's floats are numbers.Real as well
            if name != "step" and isinstance(value, numbers.Real):
                self.writer.add_scalar(f"{section}/{name}", float(value), record["step"])

    def close(self):
        self.writer.close()
