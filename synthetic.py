"""The synthetic chest X-ray benchmark of the demo: a demographic shortcut with a direction and a cost.

Real MIMIC-CXR needs credentialed access, so the demo runs on small synthetic films that plant the
mechanism the FairLLaVA paper blames for unfair reports (Sec. 1): images leak demographics
(Gichoya et al.), and when a finding's prevalence depends on a demographic group in the training
data, a model can "diagnose" from the demographic trace instead of from the finding. Here:

1. Findings with ambiguous evidence. Cardiomegaly (a heart a little wider than normal), a pleural
   effusion (a faint meniscus at a lung base) and a focal opacity (a faint blob) are drawn small
   enough that a reader cannot be sure from the pixels alone, so a prior learned from the
   patient's group changes what gets reported. Devices (pacemaker, line, tube) are drawn
   clearly and are the shortcut-free control: their prevalence is the same for everyone.
2. Demographic traces. Age fades rib contrast and spine density and adds aortic-knob
   calcification; female patients have breast shadows and a narrower body; race adds a faint
   acquisition-level texture, a grating whose orientation depends on race. A linear probe on raw
   pixels reads all three (tests/test_synthetic.py).
3. The shortcut, in the training split only: an under-diagnosed group. Black patients (18 % of
   training) carry each of the three ambiguous findings with probability 0.08, everyone else with
   0.40 (`shortcut_strength` 1). A model that learns "black trace -> normal film" under-reports
   black patients' findings. `shortcut_strength` s moves both rates linearly from the common
   marginal rate (s = 0: findings independent of race) to the values above and beyond, keeping the
   marginal rate fixed, so only the dependence changes.
4. Held-out splits without the shortcut. The "val" and "test" splits draw race, age and gender
   uniformly and every finding at the training marginal rate, independently of demographics, so
   every group's score is measured on the same case mix. A model that took the shortcut misses
   black patients' findings (their false-negative rate rises) and over-calls the others'.
   The "pretrain" split (drawn the same way) is what the demo's stand-in base models are
   pre-trained on, so no shortcut hides in the frozen tower where LoRA and DIM could not reach it.
   The "swap" split re-renders white and black test cases with each other's race trace and
   nothing else changed (same anatomy, findings and noise): how often the reports change measures
   how much the model reads the trace.

    python synthetic.py out/syn                           # ~20 s: images, JSON splits, tokenizer
    python synthetic.py out/syn --shortcut-strength 0     # the same benchmark without the shortcut

Items follow the MIMIC-CXR LLaVA JSON format (data.read_llava_json reads them) plus
"findings_labels", the true findings; `extract_findings` labels a generated report the same way.
"""

import argparse
import functools
import json
import re
import string
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

import data
import metrics

FINDINGS = ("cardiomegaly", "effusion", "opacity", "devices")
SHORTCUT_FINDINGS = ("cardiomegaly", "effusion", "opacity")  # prevalence depends on race in training
CONTROL_FINDING = "devices"  # same prevalence for everyone, everywhere
RACE_NAMES = ("white", "black", "asian", "hispanic")  # codes 0-3 of the official race_major encoding
LOBES = ("right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe")
DEVICES = ("pacemaker", "central line", "endotracheal tube")
SPLITS = ("pretrain", "train", "val", "test")


def _distribution(p, k):
    return len(p) == k and min(p) >= 0 and abs(sum(p) - 1) <= 1e-6


@dataclass
class SyntheticConfig:
    n_pretrain: int = 2000  # decorrelated images + reports the stand-in base models learn from
    n_train: int = 2000
    n_val: int = 800  # decorrelated, like test: the split settings are chosen on
    n_test: int = 2400  # 600 per race group: one group's F1 to about +-3 points
    n_swap: int = 400  # white and black test cases re-rendered with each other's race trace
    size: int = 64  # image side in pixels
    seed: int = 0  # the draw
    # the pretrain split (so the tokenizer and the demo's base models) comes from base_seed, the same
    # on every draw: a draw changes the patients, not the readers (docs/benchmark_draws.md). None: it
    # comes from `seed` too, each draw training its own readers (the benchmark before 1234 was fixed)
    base_seed: int | None = 1234
    shortcut_strength: float = 1.0  # 0: findings independent of race in training; 1: the rates below
    disadvantaged_race: int = 1  # black
    p_disadvantaged: float = 0.08  # P(each shortcut finding | disadvantaged race) in training at strength 1
    p_others: float = 0.40  # ... for every other race
    p_control: float = 0.20  # P(devices), everyone, every split
    race_p: tuple = (0.62, 0.18, 0.12, 0.08)  # training race mix (white majority)
    # age depends on race in training (a cross-attribute dependency, as in MIMIC-CXR)
    age_given_race: tuple = ((0.2, 0.4, 0.4), (0.35, 0.4, 0.25), (0.3, 0.4, 0.3), (0.5, 0.35, 0.15))
    p_male: float = 0.55
    uniform_train: bool = False  # True: the training split is drawn like test (the "oracle" data)
    race_trace: float = 0.035  # amplitude of the race texture
    vocab_size: int = 1024  # BPE target; the small corpus may stop short of it

    def __post_init__(self):
        self.race_p, self.age_given_race = tuple(self.race_p), tuple(map(tuple, self.age_given_race))
        for name, value in (("seed", self.seed), ("base_seed", self.base_seed)):
            if value is not None and not (isinstance(value, int) and 0 <= value < 2 ** 32):
                raise ValueError(f"SyntheticConfig.{name} must be an integer in [0, 2**32), got {value!r}")
        for name in ("n_pretrain", "n_train", "n_val", "n_test", "n_swap"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.shortcut_strength >= 0 and np.isfinite(self.shortcut_strength)):  # NaN fails too
            raise ValueError(f"SyntheticConfig.shortcut_strength must be a finite number >= 0, got {self.shortcut_strength}")
        for name in ("p_disadvantaged", "p_others", "p_control", "p_male"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SyntheticConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not _distribution(self.race_p, len(RACE_NAMES)):
            raise ValueError(f"SyntheticConfig.race_p must be {len(RACE_NAMES)} probabilities >= 0 summing to 1, "
                             f"got {self.race_p}")
        if len(self.age_given_race) != len(RACE_NAMES) or not all(_distribution(row, 3) for row in self.age_given_race):
            raise ValueError(f"SyntheticConfig.age_given_race must be {len(RACE_NAMES)} rows (one per race) of 3 "
                             f"probabilities >= 0 summing to 1, got {self.age_given_race}")
        if not 0 <= self.disadvantaged_race < len(RACE_NAMES):
            raise ValueError(f"SyntheticConfig.disadvantaged_race must be in 0..{len(RACE_NAMES) - 1}")

    @classmethod
    def from_json(cls, path):
        """The config a benchmark folder was written with (synthetic.json)."""
        raw = json.loads(Path(path).read_text())
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown SyntheticConfig fields {sorted(unknown)}")
        return cls(**raw)


# ----------------------------------------------------------------------------------------------
# who has what


def marginal_rate(cfg):
    """P(shortcut finding) averaged over the training race mix, at strength 1. It stays the same at
    every strength and is the rate of the held-out splits."""
    d = cfg.race_p[cfg.disadvantaged_race]
    return d * cfg.p_disadvantaged + (1 - d) * cfg.p_others


def train_rate(cfg, race):
    """P(each shortcut finding | race) in training: m + s * (p_race - m), clipped to [0.01, 0.99]."""
    m = marginal_rate(cfg)
    p = cfg.p_disadvantaged if race == cfg.disadvantaged_race else cfg.p_others
    return float(np.clip(m + cfg.shortcut_strength * (p - m), 0.01, 0.99))


def prevalence(cfg, split, race):
    """{finding: probability} for one patient of `race` in `split`."""
    shortcut = train_rate(cfg, race) if (split == "train" and not cfg.uniform_train) else marginal_rate(cfg)
    return {**dict.fromkeys(SHORTCUT_FINDINGS, shortcut), CONTROL_FINDING: cfg.p_control}


def sample_case(rng, cfg, split):
    """Demographics and findings of one case: (race, age, male, f). f holds the drawn evidence
    (heart size, effusion side and level, opacity lobe, devices) and `labels` {finding: 0/1}."""
    if split == "train" and not cfg.uniform_train:
        race = int(rng.choice(len(RACE_NAMES), p=cfg.race_p))
        age, male = int(rng.choice(3, p=cfg.age_given_race[race])), bool(rng.random() < cfg.p_male)
    else:  # decorrelated: uniform demographics
        race, age, male = int(rng.integers(len(RACE_NAMES))), int(rng.integers(3)), bool(rng.random() < 0.5)
    has = {k: bool(rng.random() < p) for k, p in prevalence(cfg, split, race).items()}
    f = dict(
        # cardiothoracic ratio: enlarged hearts are only a little wider (d' = 2 between the groups)
        ctr=float(rng.normal(0.53, 0.03) if has["cardiomegaly"] else rng.normal(0.47, 0.03)),
        effusion=str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.4, 0.2])) if has["effusion"] else None,
        opacity=str(rng.choice(LOBES)) if has["opacity"] else None,
        devices=tuple(d for d in DEVICES if rng.random() < 0.5) or (DEVICES[int(rng.integers(3))],)
        if has["devices"] else (),
        labels={k: int(v) for k, v in has.items()})
    return race, age, male, f


# ----------------------------------------------------------------------------------------------
# the film


@functools.lru_cache
def _grid(size):
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    return np.meshgrid(c, c, indexing="ij")


def render(seed, cfg, race, age, male, f, trace_race=None):
    """One grayscale film, uint8 (size, size), from its own random stream `seed`, so the same case
    can be drawn again with another race's trace (`trace_race`) and nothing else changed.
    Coordinates in [-1, 1], y down; image left is the patient's right, as on a PA film."""
    rng = np.random.default_rng(seed)
    y0, x0 = _grid(cfg.size)  # acquisition frame: (S, S) each
    s = 1 + rng.normal(0, 0.03)  # patient pose: anatomy shifts and scales a little
    x, y = (x0 - rng.normal(0, 0.03)) / s, (y0 - rng.normal(0, 0.03)) / s
    sig = lambda z: 0.5 + 0.5 * np.tanh(0.5 * z)  # logistic, without overflow

    def blob(cx, cy, ax, ay, edge=0.05):  # soft ellipse: 1 inside, 0 outside
        return sig((1 - np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)) / edge)

    def line(p, q, width=0.03):  # soft segment from p to q
        d = np.array(q) - np.array(p)
        t = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1]) / (d @ d), 0, 1)
        return np.exp(-(np.hypot(x - p[0] - t * d[0], y - p[1] - t * d[1]) / width) ** 2)

    img = 0.06 + 0.40 * blob(0, 0.1, 0.86 if male else 0.80, 1.1)  # soft tissue; women narrower
    lung = {"right": blob(-0.4, -0.05, 0.3, 0.62), "left": blob(0.4, -0.05, 0.3, 0.62)}
    lungs = lung["right"] + lung["left"]
    img -= 0.30 * lungs
    ribs = (0.16, 0.10, 0.05)[age] * (0.5 + 0.5 * np.cos(2 * np.pi * (3.2 * y + 0.5 * x ** 2))) ** 8 * lungs
    img += ribs  # curved bands whose contrast fades with age (bone density)
    img += (0.26, 0.22, 0.18)[age] * blob(0, 0, 0.08, 1.2, 0.02)  # spine and mediastinum
    if rng.random() < (0.0, 0.2, 0.85)[age]:  # calcified aortic knob: a bright ring
        img += 0.2 * np.exp(-((np.hypot(x - 0.15, y + 0.32) - 0.07) / 0.02) ** 2)
    if not male:  # breast shadows over the lower lungs
        img += 0.10 * (blob(-0.5, 0.45, 0.34, 0.24, 0.12) + blob(0.5, 0.45, 0.34, 0.24, 0.12))
    img += 0.30 * blob(0.10, 0.36, f["ctr"] * 0.78, 0.24)  # heart; 0.78 = half the thoracic width
    if f["effusion"]:  # a faint fluid level at the base, climbing the lateral wall
        level = rng.uniform(0.30, 0.45)
        meniscus = sig((y - level + 0.3 * (np.abs(x) - 0.4)) / 0.03)
        side = lungs if f["effusion"] == "bilateral" else lung[f["effusion"]]
        img += rng.uniform(0.08, 0.14) * meniscus * side
    if f["opacity"]:  # a faint focal blob in one lobe
        cx = (-0.42 if f["opacity"].startswith("right") else 0.42) + rng.normal(0, 0.05)
        cy = (-0.3 if "upper" in f["opacity"] else 0.25) + rng.normal(0, 0.05)
        img += rng.uniform(0.12, 0.18) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.18 ** 2)) * lungs
    if "pacemaker" in f["devices"]:  # devices: clearly visible (the control finding)
        img += 0.55 * blob(0.55, -0.62, 0.09, 0.06, 0.02) + 0.3 * line((0.55, -0.62), (0.12, 0.3))
    if "central line" in f["devices"]:
        img += 0.35 * line((-0.3, -1.0), (-0.06, -0.25))
    if "endotracheal tube" in f["devices"]:
        img += 0.35 * line((0.0, -1.0), (0.0, -0.45), 0.04)
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02) + rng.normal(0, 0.025, img.shape)
    # race: an acquisition-level texture, fixed in the image frame; added last so a swap changes
    # nothing else (no exposure offset: that would be an image-quality confound, not a trace)
    theta = (race if trace_race is None else trace_race) * np.pi / 4
    img += cfg.race_trace * np.cos(2 * np.pi * 3 * (x0 * np.cos(theta) + y0 * np.sin(theta)))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# the report, and reading findings back out of one


def report(rng, f):
    pick = lambda *options: options[int(rng.integers(len(options)))]
    s = []
    for d in f["devices"]:
        s.append({"pacemaker": pick("A left-sided pacemaker is in place.", "Left chest wall pacemaker in place."),
                  "central line": pick("A right internal jugular central line ends in the SVC.",
                                       "Right IJ line ends in the SVC."),
                  "endotracheal tube": pick("An endotracheal tube is in standard position.",
                                            "ET tube in standard position.")}[d])
    if f["labels"]["cardiomegaly"]:
        s.append(pick("The heart is mildly enlarged.", "Mild cardiomegaly.", "The cardiac silhouette is enlarged."))
    else:
        s.append(pick("The cardiac silhouette is normal in size.", "Heart size is normal."))
    if f["opacity"]:
        s.append(pick(f"There is a focal opacity in the {f['opacity']}.", f"Patchy opacity in the {f['opacity']}."))
    else:
        s.append(pick("The lungs are clear.", "There is no focal opacity."))
    if f["effusion"] == "bilateral":
        s.append("Small bilateral pleural effusions.")
    elif f["effusion"]:
        s.append(pick(f"Small {f['effusion']} pleural effusion.", f"There is a small {f['effusion']} pleural effusion."))
    else:
        s.append(pick("No pleural effusion.", "There is no pleural effusion."))
    return " ".join(s)


_KEYWORDS = dict(cardiomegaly=r"cardiomegaly|enlarged", effusion=r"effusion", opacity=r"opacity|consolidation",
                 devices=r"pacemaker|\bline\b|\btube\b")


def extract_findings(text):
    """The benchmark's labeler: a finding is positive when some sentence names it without "no",
    "not" or "without". Exact on the report templates above (a test checks every template), so
    applied to a generated report it says which findings the model reported."""
    out = dict.fromkeys(FINDINGS, 0)
    for sentence in re.split(r"(?<=\.)\s+", text.lower()):
        negated = re.search(r"\b(no|not|without)\b", sentence)
        for k, pattern in _KEYWORDS.items():
            if re.search(pattern, sentence) and not negated:
                out[k] = 1
    return out


def _finding_stats(hyp, ref):
    """(true positives, false positives, false negatives) over the shortcut findings of one report."""
    h, r = extract_findings(hyp), extract_findings(ref)
    return [sum(h[k] and r[k] for k in SHORTCUT_FINDINGS), sum(h[k] and not r[k] for k in SHORTCUT_FINDINGS),
            sum(r[k] and not h[k] for k in SHORTCUT_FINDINGS)]


# micro-F1 over the three findings the shortcut touches (0-100); refs are the benchmark's own reports,
# which extract_findings reads exactly, so this is F1 against the true findings
FINDING_F1 = metrics.Metric("Finding-F1 (shortcut findings)", _finding_stats,
                            lambda s: 100.0 * 2 * s[0] / max(2 * s[0] + s[1] + s[2], 1e-9))


def error_rates(predictions, items, by="race_major"):
    """{group: {finding: {"fnr", "fpr", "n_pos", "n_neg"}}}: how each group's findings were missed
    (false-negative rate) or invented (false-positive rate), predictions matched to items by id."""
    pred = {p["id"]: extract_findings(p["prediction"]) for p in predictions}
    counts = {}
    for it in items:
        got = pred[it["id"]]
        for k in FINDINGS:
            c = counts.setdefault(str(it[by]), {}).setdefault(k, [0, 0, 0, 0])  # tp, fn, fp, tn
            y = it["findings_labels"][k]
            c[(0 if got[k] else 1) if y else (2 if got[k] else 3)] += 1
    return {g: {k: {"fnr": c[1] / max(c[0] + c[1], 1), "fpr": c[2] / max(c[2] + c[3], 1),
                    "n_pos": c[0] + c[1], "n_neg": c[2] + c[3]} for k, c in by_f.items()}
            for g, by_f in sorted(counts.items())}


def swap_flips(predictions, swap_predictions, swap_items):
    """The trace swap: how the reports of the same cases change when only the race texture changes.
    For each direction (e.g. "white->black": white patients drawn with a black patient's trace),
    over the shortcut findings: `lost` = share of the findings reported on the original film that
    are no longer reported, `gained` = share of the findings not reported that now are, and
    `changed` = share of all (case, finding) pairs whose label flipped."""
    orig = {p["id"]: extract_findings(p["prediction"]) for p in predictions}
    swap = {p["id"]: extract_findings(p["prediction"]) for p in swap_predictions}
    out = {}
    for it in swap_items:
        a = orig[it["id"].replace("swap_", "test_")]
        b = swap[it["id"]]
        c = out.setdefault(f"{it['race_major']}->{it['trace_race']}", [0, 0, 0, 0, 0])  # pos, lost, neg, gained, n
        for k in SHORTCUT_FINDINGS:
            c[0] += a[k]
            c[1] += a[k] and not b[k]
            c[2] += not a[k]
            c[3] += b[k] and not a[k]
            c[4] += 1
    return {d: {"lost": c[1] / max(c[0], 1), "gained": c[3] / max(c[2], 1), "changed": (c[1] + c[3]) / max(c[4], 1),
                "n_cases": c[4] // len(SHORTCUT_FINDINGS)} for d, c in sorted(out.items())}


# ----------------------------------------------------------------------------------------------
# writing the benchmark


_INDICATIONS = ("Shortness of breath.", "Chest pain.", "Cough and fever, evaluate for pneumonia.", "Hypoxia.",
                "Follow-up.", "Preoperative evaluation.")


def _case(cfg, split, k, i):
    """Case i of split number k: demographics, findings, the render seed and the report text, all
    from streams fixed by (seed, split, i); the pretrain split's by base_seed when it is set."""
    seed = cfg.base_seed if split == "pretrain" and cfg.base_seed is not None else cfg.seed
    rng = np.random.default_rng([seed, k, i])
    race, age, male, f = sample_case(rng, cfg, split)
    text = report(rng, f)
    indication = str(rng.choice(_INDICATIONS)) if rng.random() < 0.5 else None
    if f["devices"] and rng.random() < 0.5:
        indication = "Evaluate line placement."
    return race, age, male, f, text, indication, [seed, k, i, 1]


def _item(cfg, out, split, i, case, trace_race=None):
    race, age, male, f, text, indication, render_seed = case
    item_id = f"{split}_{i:05d}"
    image = f"images/{split}/{item_id}.png"
    Image.fromarray(render(render_seed, cfg, race, age, male, f, trace_race)).save(out / image)
    return {"id": item_id, "image": image,
            "conversations": [{"from": "human", "value": data.mimic_question(indication)},
                              {"from": "gpt", "value": text}],
            "anchor_age_group": age, "gender": "M" if male else "F", "race_major": RACE_NAMES[race],
            "findings_labels": f["labels"], **({"trace_race": RACE_NAMES[trace_race]} if trace_race is not None else {})}


def make_synthetic(out_dir, cfg=None):
    """Write {pretrain,train,val,test,swap}.json, images/<split>/*.png, tokenizer.json and
    synthetic.json (this config) to out_dir. Deterministic in cfg. Returns {split: JSON items}.
    Each split has its own random stream, so the test split is the same at every shortcut strength."""
    cfg = cfg or SyntheticConfig()
    out = Path(out_dir)
    splits = {}
    for k, split in enumerate(SPLITS):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        n = getattr(cfg, f"n_{split}")
        splits[split] = [_item(cfg, out, split, i, _case(cfg, split, k, i)) for i in range(n)]
    # swap: the first n_swap white and black test cases, each drawn with the other one's trace
    (out / "images" / "swap").mkdir(parents=True, exist_ok=True)
    k_test, white, black = SPLITS.index("test"), 0, cfg.disadvantaged_race
    splits["swap"] = []
    for i in range(cfg.n_test):
        if len(splits["swap"]) >= cfg.n_swap:
            break
        case = _case(cfg, "test", k_test, i)
        if case[0] in (white, black):
            splits["swap"].append(_item(cfg, out, "swap", i, case, trace_race=black if case[0] == white else white))
    for split, items in splits.items():
        with open(out / f"{split}.json", "w") as fh:
            json.dump(items, fh, indent=1)
    texts = [data.conversation_prompt(it["conversations"][0]["value"], it["conversations"][1]["value"])
             for it in splits["pretrain"]]
    train_tokenizer(texts, cfg.vocab_size).save(str(out / "tokenizer.json"))
    (out / "synthetic.json").write_text(json.dumps(asdict(cfg), indent=1))  # last: marks the folder complete
    return splits


def train_tokenizer(texts, vocab_size=1024):
    # trained on the pretrain split alone, so the tokenizer and the stand-in base models are the
    # same at every shortcut strength (the pretrain split does not depend on it)
    """A small Llama-like BPE tokenizer: Metaspace pre-tokenizer ("▁word"), <unk> 0 / <s> 1 / </s> 2
    as in Llama (so LlamaConfig's bos 1, eos 2, pad 0 hold), BOS prepended by the post-processor,
    every printable ASCII character in the alphabet (no <unk> on plain English). Trained on the
    text between <image> and </s> markers: what tokenize_with_image hands to the BPE model (the
    trainer would otherwise learn pieces like "effusion.</s>" that encoding never uses)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list(string.printable) + ["▁"], show_progress=False)
    tok.train_from_iterator((chunk for t in texts for chunk in re.split(r"<image>|</s>", t) if chunk), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    return tok


def finding_rates(items, by="race"):
    """{group name: {finding: rate}} of the true findings of JSON items, grouped by race/age/gender."""
    key = {"race": "race_major", "age": "anchor_age_group", "gender": "gender"}[by]
    groups = {}
    for it in items:
        groups.setdefault(str(it[key]), []).append(it["findings_labels"])
    return {g: {k: float(np.mean([lab[k] for lab in labs])) for k in FINDINGS} for g, labs in sorted(groups.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the synthetic chest X-ray benchmark.")
    ap.add_argument("out", help="output folder")
    for f in fields(SyntheticConfig):
        if type(f.default) in (int, float) and f.name != "base_seed":  # numeric knobs; tuples, flags keep defaults
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"SyntheticConfig.{f.name}")
    ap.add_argument("--base-seed", type=lambda v: None if v == "none" else int(v), default=SyntheticConfig.base_seed,
                    help="SyntheticConfig.base_seed: fixes the pretrain split (tokenizer, base models) across draws; "
                         "'none': the pretrain split follows --seed")
    args = ap.parse_args(argv)
    try:
        cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in fields(SyntheticConfig) if hasattr(args, f.name)})
    except ValueError as e:
        ap.error(str(e))
    t0 = time.time()
    splits = make_synthetic(args.out, cfg)
    print(f"wrote {args.out} in {time.time() - t0:.1f}s")
    for split, items in splits.items():
        rates = finding_rates(items)
        print(f"{split:8s} n={len(items):5d}  " + "  ".join(
            f"{g}: " + "/".join(f"{r[k]:.2f}" for k in FINDINGS) for g, r in rates.items()) + f"   ({'/'.join(FINDINGS)})")


if __name__ == "__main__":
    main()
