"""The mechanism on held-out data, logged while training runs (train.py --monitor-json): a fresh
linear probe's accuracy at reading each attribute from h, phi's accuracy and CLUB, the spread of h
(fairness.leak_report), every --monitor-every steps, one JSON line per point in monitor.jsonl.
It draws nothing from the random streams, so a monitored run trains exactly as an unmonitored one.
"""

import json
from pathlib import Path

import torch

import data
import evaluate
from fairness import leak_report


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
        """Measure and write the point of `step` -> the point, as written."""
        if self.file is None:
            self.file = open(self.path, self.mode)
        was_training = model.training
        h = evaluate.pooled_features(model, self.tokenizer, self.processor, self.records, self.fcfg.layer,
                                     self.fcfg.tokens, batch_size=32)
        model.train(was_training)
        point = {"step": step, **leak_report(h, self.attrs, fair)}
        self.file.write(json.dumps(point) + "\n")
        self.file.flush()
        return point
