"""Data for FairLLaVA: records, images, the tokenizer and prompt template, labels, batches, the
baselines, a demo data set.

FairLLaVA (CVPR 2026, arXiv 2603.26008) fine-tunes a LLaVA-style model for chest X-ray report
generation (MIMIC-CXR, PadChest) and dermoscopy QA (HAM10000), and reports every metric per group of
race, age and gender (Sec. 4). This file turns those data sets into training batches:

    LLaVA JSON -> records {id, image, question, answer, attrs} -> ReportDataset item -> collate -> batch

- `ATTRIBUTES` and the encoders below are the one place where demographic codes and age bins live.
- `read_llava_json` validates every item up front (image file, demographics, answer), so a bad item
  stops the run before training with an error naming the file, the item id and the field, or, with
  on_error="skip", is dropped and counted in one summary line. Nothing fails on item 50,000.
- `GroupBalancedSampler` (resampling) and `inverse_frequency_weights` (reweighting) are the two
  baselines of the paper's tables.
- `make_synthetic` writes a small synthetic chest X-ray benchmark, in the MIMIC JSON format, that
  plants the mechanism the paper blames for unfair reports (see "Synthetic benchmark" below), and a
  BPE tokenizer trained on it, because real MIMIC-CXR needs credentialed access. Items also carry
  their true `findings_labels`; `extract_findings` labels a generated report the same way.

    python data.py --make-demo data/demo                  # ~5-10 s: images, JSON splits, tokenizer
    python data.py --check data/demo/train.json --dataset mimic   # validate, print group counts
    python data.py --convert ham HAM10000_metadata.csv ham.json   # metadata CSV -> LLaVA JSON
"""

import argparse
import csv
import functools
import json
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VisionConfig

# ----------------------------------------------------------------------------------------------
# Demographic attributes: codes, bins and names, declared once


@dataclass(frozen=True)
class Attribute:
    name: str
    classes: tuple  # code i means classes[i]
    num_classes: int  # size of the DAC head for this attribute (official)


RACES = ("white", "black", "asian", "hispanic", "other", "american indian/alaska native",
         "native hawaiian/pacific islander", "unknown")  # official race_major codes 0..7
RACE_UNKNOWN = 7  # "unknown", "declined" and "" all map here in the official encoding
ATTRIBUTES = {
    # The official DAC head has 9 race outputs although the codes stop at 7 (race 9 + age 3 +
    # gender 2 = the 14 classes of the paper's "~57K" parameters); we keep both as they are.
    "race": Attribute("race", RACES, 9),
    "age": Attribute("age", ("0-44", "45-65", "66+"), 3),
    "gender": Attribute("gender", ("M", "F"), 2),  # M 0, F 1: the order of the official "gender" field
}
UNKNOWN = -1  # attribute value in a batch that the fairness losses leave out


def encode_race(value, unknown_race="class"):
    """race_major string -> code. Unknown/declined/"" is a real category (7) in the official
    encoding, kept with unknown_race="class"; unknown_race="mask" turns it into -1 instead, so the
    DAC is not taught to recognise "race not recorded" (a hospital-process signal, not a race)."""
    key = str(value).strip().lower()
    if key in ("unknown", "declined", ""):
        return RACE_UNKNOWN if unknown_race == "class" else UNKNOWN
    if key not in RACES:
        raise ValueError(f"unknown race {value!r}; expected one of {RACES[:7]} or unknown/declined/''")
    return RACES.index(key)


def encode_gender(value):
    key = str(value).strip().lower()
    if key in ("m", "male"):
        return 0
    if key in ("f", "female"):
        return 1
    raise ValueError(f"unknown gender {value!r}; expected M/F or male/female")


def age_group(years, cutoffs="mimic"):
    """Age in years -> 0/1/2. MIMIC-CXR bins are [0,44], (44,65], (65,inf); the HAM10000 script
    cuts at 45 and 66 (age < 45, 45 <= age < 66, age >= 66). They agree on whole years."""
    try:
        age = float(years)
    except (TypeError, ValueError):
        raise ValueError(f"age {years!r} is not a number") from None
    if not 0 <= age < 150:  # also catches NaN, which pandas writes for an empty cell
        raise ValueError(f"age {years!r} is out of range")
    if cutoffs == "ham":
        return 0 if age < 45 else 1 if age < 66 else 2
    return 0 if age <= 44 else 1 if age <= 65 else 2


def encode_age_group(value):
    """MIMIC's precomputed anchor_age_group (0, 1 or 2)."""
    if str(value).strip() not in ("0", "1", "2"):
        raise ValueError(f"age group {value!r} is not 0, 1 or 2")
    return int(value)


def race_major(raw):
    """Collapse a MIMIC-IV race string ("WHITE - RUSSIAN", "BLACK/AFRICAN AMERICAN", "UNABLE TO
    OBTAIN", ...) to a race_major name. A prefix rule of ours, written down so it can be checked."""
    r = str(raw or "").strip().upper()
    for prefixes, name in ((("WHITE", "PORTUGUESE"), "white"), (("BLACK",), "black"), (("ASIAN",), "asian"),
                           (("HISPANIC", "SOUTH AMERICAN"), "hispanic"),
                           (("AMERICAN INDIAN",), "american indian/alaska native"),
                           (("NATIVE HAWAIIAN",), "native hawaiian/pacific islander"),
                           (("UNKNOWN", "UNABLE", "PATIENT DECLINED", "DECLINED"), "unknown")):
        if r.startswith(prefixes):
            return name
    return "unknown" if not r else "other"


# ----------------------------------------------------------------------------------------------
# Reading the official JSON formats into dataset-agnostic records

MIMIC_PROMPT = "Provide a description of the findings in the radiology image given the following indication: {}"
MIMIC_PROMPT_NO_INDICATION = "Provide a description of the findings in the radiology image."
HAM_QUESTION = "What is the diagnosis of the skin lesion in this dermoscopy image?"  # our wording
HAM_DIAGNOSES = {"akiec": "actinic keratosis", "bcc": "basal cell carcinoma", "bkl": "benign keratosis",
                 "df": "dermatofibroma", "mel": "melanoma", "nv": "melanocytic nevus", "vasc": "vascular lesion"}

# JSON field of each attribute (None: the data set does not record it -> -1) and how ages are given
DATASETS = {
    "mimic": dict(race="race_major", age="anchor_age_group", gender="gender", ages="group"),
    "padchest": dict(race=None, age="Age", gender="gender", ages="mimic"),  # years, MIMIC bins
    "ham": dict(race=None, age="age", gender="sex", ages="ham"),  # years, HAM cut-offs
}


class DataError(ValueError):
    """A bad data item; the message names the file, the item id and the field."""


class _Bad(Exception):
    def __init__(self, field, problem):
        super().__init__(problem)
        self.field, self.problem = field, problem


def mimic_question(indication=None):
    indication = (indication or "").strip()
    return "<image>\n" + (MIMIC_PROMPT.format(indication) if indication else MIMIC_PROMPT_NO_INDICATION)


def _question_answer(item, dataset):
    conv = item.get("conversations")
    if conv is None and dataset == "padchest":  # raw PadChest items: FINDINGS + INDICATION
        question, answer, field = mimic_question(item.get("INDICATION")), item.get("FINDINGS"), "FINDINGS"
    elif conv is None and dataset == "ham":  # raw HAM10000 items: the diagnosis is the answer
        question, answer, field = "<image>\n" + HAM_QUESTION, item.get("diagnosis"), "diagnosis"
    else:
        if not isinstance(conv, list):
            raise _Bad("conversations", "missing or not a list")
        turns = {t.get("from"): t.get("value") for t in reversed(conv) if isinstance(t, dict)}
        if not isinstance(turns.get("human"), str):  # first round only: the official sets are single-turn
            raise _Bad("conversations", "no 'human' turn")
        question, answer, field = turns["human"], turns.get("gpt"), "conversations"
    if not isinstance(answer, str) or not answer.strip():
        raise _Bad(field, "empty answer")
    if "<image>" not in question:  # LLaVA puts the image first when the text does not place it
        question = "<image>\n" + question
    return question, answer.strip()


def _attrs(item, dataset, unknown_race):
    spec, attrs = DATASETS[dataset], {}
    encoders = dict(race=lambda v: encode_race(v, unknown_race), gender=encode_gender,
                    age=encode_age_group if spec["ages"] == "group" else lambda v: age_group(v, spec["ages"]))
    for name, encode in encoders.items():
        field = spec[name]
        if field is None:
            attrs[name] = UNKNOWN
        elif item.get(field) is None:
            raise _Bad(field, "missing")
        else:
            try:
                attrs[name] = encode(item[field])
            except ValueError as e:
                raise _Bad(field, str(e)) from None
    return attrs


def _open_image(path, decode=True):
    if not Path(path).is_file():
        raise _Bad("image", f"no such file {path}")
    try:
        with Image.open(path) as im:  # reads the header only, unless decode
            if decode:
                im.load()
            return im
    except Exception as e:
        raise _Bad("image", f"unreadable image {path}: {e}") from None


def read_llava_json(path, dataset="mimic", image_root=None, on_error="raise", check_images=True,
                    decode_images=False, unknown_race="class"):
    """LLaVA-style JSON list -> list of records {id, image (path), question, answer, attrs}.

    Every item is checked here: the image file exists and has an image header (decode_images=True
    decodes it fully: slow, thorough), the demographics are present and known, the answer is not
    empty, ids are unique. on_error="raise" stops at the first bad item; "skip" drops bad items and
    prints one summary line. image_root defaults to the JSON file's folder."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    if on_error not in ("raise", "skip") or unknown_race not in ("class", "mask"):
        raise ValueError(f"on_error must be raise|skip and unknown_race class|mask, got {on_error!r}, {unknown_race!r}")
    with open(path) as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
    root = Path(image_root) if image_root is not None else Path(path).parent
    records, seen, skipped, first = [], set(), Counter(), None
    for n, item in enumerate(items):
        item_id = str(item.get("id", f"#{n}")) if isinstance(item, dict) else f"#{n}"
        try:
            if not isinstance(item, dict) or item.get("id") in (None, ""):
                raise _Bad("id", "item is not an object with an id")
            if item_id in seen:
                raise _Bad("id", "duplicate id")
            if not item.get("image"):
                raise _Bad("image", "missing")
            question, answer = _question_answer(item, dataset)
            attrs = _attrs(item, dataset, unknown_race)
            image = str(root / item["image"])
            if check_images:
                _open_image(image, decode_images)
        except _Bad as e:
            msg = f"{path}: item {item_id!r}: field {e.field!r}: {e.problem}"
            if on_error == "raise":
                raise DataError(msg) from None
            skipped[e.field] += 1
            first = first or msg
            continue
        seen.add(item_id)
        records.append(dict(id=item_id, image=image, question=question, answer=answer, attrs=attrs))
    if skipped:
        why = ", ".join(f"{k} {v}" for k, v in skipped.most_common())
        print(f"{path}: skipped {sum(skipped.values())} of {len(items)} items ({why}); first: {first}")
    return records


# ----------------------------------------------------------------------------------------------
# Converters: metadata CSV -> LLaVA JSON (filters as the official data: usable views, non-empty
# findings, all demographics present)


def _convert(csv_path, out_path, make_item):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    items, dropped = [], Counter()
    for row in rows:
        item = make_item({k: (v or "").strip() for k, v in row.items() if k is not None})
        if isinstance(item, str):
            dropped[item] += 1
        else:
            items.append(item)
    with open(out_path, "w") as f:
        json.dump(items, f, indent=1)
    why = ", ".join(f"{k} {v}" for k, v in dropped.most_common()) or "none"
    print(f"{csv_path}: wrote {len(items)} of {len(rows)} rows to {out_path} (dropped: {why})")
    return items


def _item(item_id, image, question, answer, **fields):
    return dict(id=item_id, image=image, conversations=[{"from": "human", "value": question},
                                                        {"from": "gpt", "value": answer}], **fields)


def mimic_csv_to_json(csv_path, out_path):
    """One row per image, joined beforehand from mimic-cxr-2.0.0-metadata.csv (dicom_id, subject_id,
    study_id, ViewPosition), the sectioned reports (findings, indication) and MIMIC-IV patients /
    admissions (anchor_age, gender, race). Optional column `path` overrides the MIMIC-CXR-JPG layout."""
    def make(r):
        if r.get("ViewPosition") not in ("AP", "PA"):
            return "view"
        if not r.get("findings"):
            return "empty findings"
        try:
            age, _ = age_group(r.get("anchor_age")), encode_gender(r.get("gender"))
        except ValueError:
            return "demographics"
        sid = r["subject_id"]
        path = r.get("path") or f"files/p{sid[:2]}/p{sid}/s{r['study_id']}/{r['dicom_id']}.jpg"
        return _item(r["dicom_id"], path, mimic_question(r.get("indication")), r["findings"],
                     anchor_age_group=age, gender=r["gender"].upper()[0], race_major=race_major(r.get("race")))
    return _convert(csv_path, out_path, make)


def padchest_csv_to_json(csv_path, out_path):
    """Columns ImageID, FINDINGS, INDICATION (optional), Age or PatientBirth + StudyDate_DICOM,
    gender or PatientSex_DICOM, Projection (optional: PA/AP/AP_horizontal kept), ImageDir (optional)."""
    def make(r):
        if r.get("Projection") and r["Projection"] not in ("PA", "AP", "AP_horizontal"):
            return "view"
        if not r.get("FINDINGS"):
            return "empty findings"
        try:
            age = r.get("Age") or int(r["StudyDate_DICOM"][:4]) - int(float(r["PatientBirth"]))
            gender = "MF"[encode_gender(r.get("gender") or r.get("PatientSex_DICOM"))]
            age_group(age)
        except (ValueError, KeyError):
            return "demographics"
        image = f"{r['ImageDir']}/{r['ImageID']}" if r.get("ImageDir") else r["ImageID"]
        return _item(r["ImageID"], image, mimic_question(r.get("INDICATION")), r["FINDINGS"],
                     Age=float(age), gender=gender, FINDINGS=r["FINDINGS"], INDICATION=r.get("INDICATION", ""))
    return _convert(csv_path, out_path, make)


def ham_csv_to_json(csv_path, out_path):
    """HAM10000_metadata.csv (lesion_id, image_id, dx, dx_type, age, sex, localization); images are
    {image_id}.jpg. Rows with sex "unknown" or no age are dropped."""
    def make(r):
        if r.get("dx") not in HAM_DIAGNOSES:
            return "unknown dx"
        try:
            age_group(r.get("age"), "ham"), encode_gender(r.get("sex"))
        except ValueError:
            return "demographics"
        dx = HAM_DIAGNOSES[r["dx"]]
        return _item(r["image_id"], r["image_id"] + ".jpg", "<image>\n" + HAM_QUESTION, dx,
                     age=float(r["age"]), sex=r["sex"], diagnosis=dx)
    return _convert(csv_path, out_path, make)


# ----------------------------------------------------------------------------------------------
# Images, prompts + labels, the dataset and the batch

@dataclass
class ImageProcessor:
    """BiomedCLIP/CLIP preprocessing: resize the shortest side to `size` (bicubic), center crop,
    RGB, scale to [0, 1], normalise per channel. Grayscale X-rays become three equal channels;
    16-bit PNGs (PadChest) are scaled by their own maximum first."""
    # defaults: the vision tower's own (VisionConfig); a loaded tower passes its config's values
    size: int = VisionConfig.image_size
    mean: tuple = VisionConfig.mean
    std: tuple = VisionConfig.std

    def __call__(self, image):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(image, dtype=np.float32)
            image = Image.fromarray((a * (255.0 / max(float(a.max()), 1.0))).round().astype(np.uint8))
        image = image.convert("RGB")
        w, h = image.size
        s = self.size
        w, h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # shortest side -> s
        image = image.resize((w, h), Image.BICUBIC)
        left, top = round((w - s) / 2), round((h - s) / 2)
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)


# The tokenizer and the Vicuna "v1" conversation template

DEFAULT_IMAGE_TOKEN = "<image>"  # in the question text; becomes IMAGE_TOKEN_INDEX in the ids
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def load_tokenizer(path):
    """A `tokenizers` tokenizer.json (file or folder). Vicuna ships only the SentencePiece
    tokenizer.model; its vocabulary is Llama-2's, whose tokenizer.json is published e.g. in
    hf-internal-testing/llama-tokenizer — put that file next to the weights."""
    from tokenizers import Tokenizer
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            hint = " (only tokenizer.model found: use Llama-2's tokenizer.json, see README)" \
                if (p / "tokenizer.model").is_file() else ""
            raise FileNotFoundError(f"{p}: no tokenizer.json{hint}")
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer file not found")
    return Tokenizer.from_file(str(p))


def conversation_prompt(question, answer=None, system=SYSTEM_PROMPT):
    """LLaVA's "v1" template (sep " ", sep2 "</s>"): `{system} USER: {question} ASSISTANT:`,
    followed by ` {answer}</s>` for a training example."""
    prompt = f"{system} USER: {question} ASSISTANT:"
    return prompt if answer is None else f"{prompt} {answer}</s>"


def tokenize_with_image(tokenizer, text):
    """Token ids with `<image>` -> IMAGE_TOKEN_INDEX. As LLaVA does: encode each chunk between
    `<image>` markers on its own (with special tokens), keep the BOS of the first chunk only."""
    bos = tokenizer.token_to_id("<s>")
    ids = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        enc = tokenizer.encode(chunk).ids
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            if enc and enc[0] == bos:
                enc = enc[1:]
        ids.extend(enc)
    return ids


def encode_example(tokenizer, question, answer, max_length=2048, item_id="?"):
    """input_ids and labels for one round of the "v1" template:

        <s> {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>
        -100 ...................................... -100  answer ids  </s>

    input_ids = the ids of the full conversation. Its first part must equal the prompt
    tokenize_with_image(conversation_prompt(question)), i.e. exactly what `generate` is given at
    inference, and we check that rather than subtract token counts as the official code does
    (its "instruction_len - 2" fix-up for Llama). Everything up to and including "ASSISTANT:" is
    -100 (BOS, system, question, image sentinel); the answer and its </s> are supervised.
    Truncated to max_length ids (the sentinel counts as one and must survive)."""
    prompt = tokenize_with_image(tokenizer, conversation_prompt(question))
    full = tokenize_with_image(tokenizer, conversation_prompt(question, answer))
    eos = tokenizer.token_to_id("</s>")
    if full[:len(prompt)] != prompt or len(full) <= len(prompt) or full[-1] != eos:
        raise DataError(f"item {item_id!r}: the tokenizer merges across 'ASSISTANT:' and the answer, "
                        f"or does not map '</s>' to one eos id; prompt and labels would disagree")
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
    if IMAGE_TOKEN_INDEX in prompt and IMAGE_TOKEN_INDEX not in full[:max_length]:
        raise DataError(f"item {item_id!r}: max_length {max_length} cuts off the image sentinel")
    return full[:max_length], labels[:max_length]


def load_image(path, item_id="?"):
    try:
        return _open_image(path)
    except _Bad as e:  # the file changed since read_llava_json checked it
        raise DataError(f"item {item_id!r}: field 'image': {e.problem}") from None


class ReportDataset(torch.utils.data.Dataset):
    """records -> items {id, input_ids, labels, pixel_values, attrs[, weight]}. Tokenised lazily:
    cheap, and the records were already validated by read_llava_json."""

    def __init__(self, records, tokenizer, image_processor=None, max_length=2048, sample_weights=None):
        if sample_weights is not None and len(sample_weights) != len(records):
            raise ValueError(f"{len(sample_weights)} sample weights for {len(records)} records")
        self.records, self.tokenizer, self.max_length = records, tokenizer, max_length
        self.image_processor = image_processor or ImageProcessor()
        self.sample_weights = sample_weights

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        input_ids, labels = encode_example(self.tokenizer, r["question"], r["answer"], self.max_length, r["id"])
        item = dict(id=r["id"], input_ids=torch.tensor(input_ids), labels=torch.tensor(labels),
                    pixel_values=self.image_processor(load_image(r["image"], r["id"])), attrs=r["attrs"])
        if self.sample_weights is not None:
            item["weight"] = float(self.sample_weights[i])
        return item


def collate(batch, pad_id=0):
    """Items -> the batch dict of the model/train/evaluate interface: right padding with pad_id,
    attention_mask 1 real / 0 pad, labels -100 on padding, attrs {name: (B,) long, -1 unknown}.
    "sample_weight" (B,) is added only when the items carry weights (reweighting baseline)."""
    B, T = len(batch), max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = b["input_ids"], b["labels"], 1
    out = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
               pixel_values=torch.stack([b["pixel_values"] for b in batch]),  # (B, 3, S, S)
               attrs={a: torch.tensor([b["attrs"][a] for b in batch], dtype=torch.long) for a in ATTRIBUTES},
               ids=[b["id"] for b in batch])
    if "weight" in batch[0]:
        out["sample_weight"] = torch.tensor([b["weight"] for b in batch], dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------------------------
# Baselines: resampling and reweighting (the paper's "Resampling" / "Reweighting" rows)


def group_labels(records, attributes=("race",)):
    """Group key of every record: a tuple of attribute codes, e.g. ("race", "gender") -> (1, 0).
    One attribute gives 1-tuples; unknown (-1) is a group of its own."""
    attributes = (attributes,) if isinstance(attributes, str) else tuple(attributes)
    for a in attributes:
        if a not in ATTRIBUTES:
            raise KeyError(f"unknown attribute {a!r}; choose from {tuple(ATTRIBUTES)}")
    return [tuple(r["attrs"][a] for a in attributes) for r in records]


def inverse_frequency_weights(groups):
    """Reweighting: w_i = N / (G * n_g(i)), so every group carries the same total weight N / G and
    the weights average to exactly 1 (the loss keeps its scale)."""
    counts = Counter(groups)
    n, g = len(groups), len(counts)
    return torch.tensor([n / (g * counts[k]) for k in groups], dtype=torch.float32)


class GroupBalancedSampler(torch.utils.data.Sampler):
    """Resampling: draw indices with replacement, each group equally likely (p_i ∝ 1 / n_g(i)).

    DistributedSampler semantics: every rank makes the same draw of num_samples indices (padded to a
    multiple of world_size) from seed + epoch, and keeps positions rank, rank + world_size, ...; so
    the ranks' shares are disjoint and together are one draw. Call set_epoch(e) each epoch."""

    def __init__(self, groups, num_samples=None, rank=0, world_size=1, seed=0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        counts = Counter(groups)
        self.p = torch.tensor([1.0 / counts[k] for k in groups], dtype=torch.float64)
        self.total = math.ceil((num_samples or len(groups)) / world_size) * world_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.p, self.total, replacement=True, generator=g)
        return iter(idx[self.rank::self.world_size].tolist())

    def __len__(self):
        return self.total // self.world_size


# ----------------------------------------------------------------------------------------------
# Synthetic benchmark: the built-in demo data
#
# What is planted, and why (the paper's diagnosis of unfair reports, Sec. 1 and 4):
# 1. Findings that decide the report. Each image is a frontal chest film drawn from shapes: body,
#    lungs, ribs, spine, heart, and five findings: cardiomegaly (cardiothoracic ratio 0.51-0.62 vs a
#    normal 0.38-0.50: a subtle boundary), pleural effusion (side, size, meniscus),
#    focal opacity (lobe), pneumothorax (side, size: dark rim without markings + pleural line) and
#    support devices (pacemaker, central line, ET tube). The report is templated from exactly these,
#    with varied phrasings and explicit negations; `extract_findings` reads the labels back.
# 2. Demographic traces, as real X-rays leak race and age (Gichoya et al.): age fades rib contrast
#    and spine density and adds aortic-knob calcification; female patients have breast shadows and a
#    narrower body; race adds a faint acquisition-level texture (a grating whose orientation depends
#    on race) and an exposure offset. A linear probe on raw pixels reads all three (see tests).
# 3. A shortcut in training only. Train/val have one majority race (62 % white), age depends on race
#    (cross-attribute dependency) and findings depend on demographics: cardiomegaly is common in
#    black patients, opacity in asian and hispanic ones, effusion and devices in the old,
#    pneumothorax in young men. A model can therefore "diagnose" from the demographic trace. The
#    test split draws demographics uniformly and findings independently of them, at the training
#    marginal rates; a model that took the shortcut over-calls findings for the groups where they
#    were common in training and misses them where they were rare, so the groups pay unequally.

SYN_RACE_P = (0.62, 0.18, 0.12, 0.08)  # white, black, asian, hispanic: codes 0-3 of the official encoding
SYN_AGE_GIVEN_RACE = ((0.2, 0.4, 0.4), (0.35, 0.4, 0.25), (0.3, 0.4, 0.3), (0.5, 0.35, 0.15))
SYN_P_MALE = 0.55
FINDINGS = ("cardiomegaly", "effusion", "opacity", "pneumothorax", "devices")
LOBES = ("right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe")
DEVICES = ("pacemaker", "central line", "endotracheal tube")


def _train_prevalence(race, age, male):
    """P(finding | demographics) in train and val: the planted shortcut."""
    return dict(cardiomegaly=0.15 + 0.35 * (race == 1) + 0.15 * (age == 2), effusion=0.10 + 0.30 * (age == 2),
                opacity=0.15 + 0.25 * (race in (2, 3)), pneumothorax=0.04 + 0.20 * (age == 0 and male),
                devices=0.10 + 0.30 * (age == 2))


def _marginal_prevalence():
    """Training prevalence averaged over the training demographics: the test split's rates."""
    out = dict.fromkeys(FINDINGS, 0.0)
    for race, pr in enumerate(SYN_RACE_P):
        for age, pa in enumerate(SYN_AGE_GIVEN_RACE[race]):
            for male, pg in ((True, SYN_P_MALE), (False, 1 - SYN_P_MALE)):
                for k, v in _train_prevalence(race, age, male).items():
                    out[k] += pr * pa * pg * v
    return out


TEST_PREVALENCE = _marginal_prevalence()


def _sample_case(rng, split):
    if split == "test":  # decorrelated: uniform demographics, findings independent of them
        race, age, male = int(rng.integers(4)), int(rng.integers(3)), bool(rng.random() < 0.5)
        prev = TEST_PREVALENCE
    else:
        race = int(rng.choice(4, p=SYN_RACE_P))
        age, male = int(rng.choice(3, p=SYN_AGE_GIVEN_RACE[race])), bool(rng.random() < SYN_P_MALE)
        prev = _train_prevalence(race, age, male)
    has = {k: bool(rng.random() < p) for k, p in prev.items()}
    side = lambda: str(rng.choice(["right", "left"]))
    f = dict(ctr=float(rng.uniform(0.51, 0.62) if has["cardiomegaly"] else rng.uniform(0.38, 0.50)),
             effusion=(str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.35, 0.25])),
                       str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))) if has["effusion"] else None,
             opacity=str(rng.choice(LOBES)) if has["opacity"] else None,
             pneumothorax=(side(), str(rng.choice(["small", "large"], p=[0.7, 0.3]))) if has["pneumothorax"] else None,
             devices=tuple(d for d in DEVICES if rng.random() < 0.5) or (DEVICES[int(rng.integers(3))],)
             if has["devices"] else (), labels={k: int(v) for k, v in has.items()})
    return race, age, male, f


@functools.lru_cache
def _grid(size):
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    return np.meshgrid(c, c, indexing="ij")


def _render(rng, size, race, age, male, f):
    """One grayscale film, uint8 (size, size). Coordinates in [-1, 1], y down; image left is the
    patient's right, as on a PA film."""
    y0, x0 = _grid(size)  # acquisition frame: (S, S) each
    s = 1 + rng.normal(0, 0.03)  # patient pose: anatomy shifts and scales a little
    x, y = (x0 - rng.normal(0, 0.03)) / s, (y0 - rng.normal(0, 0.03)) / s
    sig = lambda z: 0.5 + 0.5 * np.tanh(0.5 * z)  # logistic, without overflow

    def blob(cx, cy, ax, ay, edge=0.05):  # soft ellipse: 1 inside, 0 outside
        return sig((1 - np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)) / edge)

    def line(p, q, width=0.03):  # soft segment from p to q
        d = np.array(q) - np.array(p)
        t = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1]) / (d @ d), 0, 1)
        return np.exp(-(np.hypot(x - p[0] - t * d[0], y - p[1] - t * d[1]) / width) ** 2)

    img = 0.06 + 0.40 * blob(0, 0.1, 0.86 if male else 0.80, 1.1)  # soft tissue
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
    if f["effusion"]:
        where, amount = f["effusion"]
        level = {"small": 0.42, "moderate": 0.28, "large": 0.10}[amount]
        meniscus = sig((y - level + 0.3 * (np.abs(x) - 0.4)) / 0.03)  # fluid climbs the lateral wall
        img += 0.30 * meniscus * (lungs if where == "bilateral" else lung[where])
    if f["opacity"]:
        cx = -0.42 if f["opacity"].startswith("right") else 0.42
        cy = -0.3 if "upper" in f["opacity"] else 0.25
        img += 0.25 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.12 ** 2)) * lungs
    if f["pneumothorax"]:
        where, amount = f["pneumothorax"]
        edge = 0.62 - (0.12 if amount == "small" else 0.22)  # |x| of the collapsed lung's edge
        apex = sig((0.1 - y) / 0.05) * lung[where]
        img -= (0.12 * sig((np.abs(x) - edge) / 0.02) + 0.5 * ribs) * apex
        img += 0.15 * np.exp(-((np.abs(x) - edge) / 0.015) ** 2) * apex  # visceral pleural line
    if "pacemaker" in f["devices"]:
        img += 0.55 * blob(0.55, -0.62, 0.09, 0.06, 0.02) + 0.3 * line((0.55, -0.62), (0.12, 0.3))
    if "central line" in f["devices"]:
        img += 0.35 * line((-0.3, -1.0), (-0.06, -0.25))
    if "endotracheal tube" in f["devices"]:
        img += 0.35 * line((0.0, -1.0), (0.0, -0.45), 0.04)
    theta = race * np.pi / 4  # race: acquisition-level texture, fixed in the image frame
    img += 0.035 * np.cos(2 * np.pi * 3 * (x0 * np.cos(theta) + y0 * np.sin(theta)))
    img += (0.0, -0.04, 0.03, 0.05)[race]
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02) + rng.normal(0, 0.025, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _report(rng, f):
    pick = lambda *options: options[int(rng.integers(len(options)))]
    s = []
    for d in f["devices"]:
        s.append({"pacemaker": pick("A left-sided pacemaker is in place with leads in the right atrium and ventricle.",
                                    "Left chest wall pacemaker with leads in standard position."),
                  "central line": pick("A right internal jugular central venous catheter terminates in the mid SVC.",
                                       "Right IJ line ends in the SVC."),
                  "endotracheal tube": pick("An endotracheal tube terminates about 4 cm above the carina.",
                                            "ET tube in standard position.")}[d])
    if f["ctr"] > 0.5:
        grade = "mildly" if f["ctr"] < 0.56 else "moderately"
        s.append(pick(f"The heart is {grade} enlarged.", f"{grade.capitalize()[:-2]} cardiomegaly.",
                      f"The cardiac silhouette is {grade} enlarged."))
    else:
        s.append(pick("The cardiac silhouette is normal in size.", "Heart size is normal.", "The heart is not enlarged."))
    s.append(pick("The mediastinal and hilar contours are unremarkable.", "Mediastinal contours are within normal limits."))
    if f["opacity"]:
        lobe = f["opacity"]
        s.append(pick(f"There is a focal opacity in the {lobe}, concerning for pneumonia.",
                      f"{lobe.capitalize()} consolidation is seen.", f"Patchy opacity in the {lobe} may reflect infection."))
    else:
        s.append(pick("The lungs are clear without focal consolidation.", "There is no focal opacity to suggest pneumonia.",
                      "The lungs are clear."))
    if not f["effusion"] and not f["pneumothorax"] and rng.random() < 0.5:
        s.append(pick("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax."))
    else:
        if f["effusion"]:
            where, amount = f["effusion"]
            s.append(f"{amount.capitalize()} bilateral pleural effusions." if where == "bilateral" else
                     pick(f"{amount.capitalize()} {where} pleural effusion.", f"There is a {amount} {where} pleural effusion."))
        else:
            s.append(pick("No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."))
        if f["pneumothorax"]:
            where, amount = f["pneumothorax"]
            s.append(pick(f"{amount.capitalize()} {where} apical pneumothorax.", f"There is a {amount} {where} pneumothorax."))
        else:
            s.append(pick("No pneumothorax.", "There is no pneumothorax."))
    if f["ctr"] <= 0.5 and not (f["effusion"] or f["opacity"] or f["pneumothorax"]) and rng.random() < 0.5:
        s.append("No acute cardiopulmonary process.")
    return " ".join(s)


_KEYWORDS = dict(cardiomegaly=r"cardiomegaly|enlarged", effusion=r"effusion", opacity=r"opacity|consolidation",
                 pneumothorax=r"pneumothorax", devices=r"pacemaker|catheter|\btube\b|\bline\b")


def extract_findings(report):
    """Rule-based labeler for the synthetic reports (the demo's stand-in for CheXbert): a finding is
    positive when some sentence names it without "no", "not" or "without"."""
    out = dict.fromkeys(FINDINGS, 0)
    for sentence in re.split(r"(?<=\.)\s+", report.lower()):
        negated = re.search(r"\b(no|not|without)\b", sentence)
        for k, pattern in _KEYWORDS.items():
            if re.search(pattern, sentence) and not negated:
                out[k] = 1
    return out


_INDICATIONS = ("Shortness of breath.", "Chest pain.", "Cough and fever, evaluate for pneumonia.", "Hypoxia.",
                "Follow-up.", "Preoperative evaluation.")


@dataclass
class SyntheticConfig:
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 600
    size: int = 64  # image side in pixels
    seed: int = 0
    vocab_size: int = 1024  # BPE target; the small corpus may stop short of it


def make_synthetic(out_dir, cfg=SyntheticConfig()):
    """Write {train,val,test}.json (MIMIC format + "findings_labels"), images/<split>/*.png and
    tokenizer.json to out_dir. Deterministic in cfg.seed. Returns {split: list of JSON items}."""
    out = Path(out_dir)
    splits = {}
    for k, (split, n) in enumerate((("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))):
        rng = np.random.default_rng([cfg.seed, k])
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        items = []
        for i in range(n):
            race, age, male, f = _sample_case(rng, split)
            pixels = _render(rng, cfg.size, race, age, male, f)
            report = _report(rng, f)
            indication = str(rng.choice(_INDICATIONS)) if rng.random() < 0.5 else None
            if f["devices"] and rng.random() < 0.5:
                indication = "Evaluate line placement."
            item_id, image = f"{split}_{i:05d}", f"images/{split}/{split}_{i:05d}.png"
            Image.fromarray(pixels).save(out / image)
            items.append(_item(item_id, image, mimic_question(indication), report,
                               anchor_age_group=age, gender="M" if male else "F", race_major=RACES[race],
                               findings_labels=f["labels"]))
        with open(out / f"{split}.json", "w") as fh:
            json.dump(items, fh, indent=1)
        splits[split] = items
    texts = [conversation_prompt(it["conversations"][0]["value"], it["conversations"][1]["value"])
             for it in splits["train"]]
    train_demo_tokenizer(texts, cfg.vocab_size).save(str(out / "tokenizer.json"))
    return splits


def train_demo_tokenizer(texts, vocab_size=1024):
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


# ----------------------------------------------------------------------------------------------


def _print_groups(name, records):
    counts = {a: Counter("n/a" if r["attrs"][a] == UNKNOWN else spec.classes[r["attrs"][a]] for r in records)
              for a, spec in ATTRIBUTES.items()}
    print(f"{name:6s} n={len(records):5d}  " +
          "  ".join(f"{a}: " + ", ".join(f"{k} {v}" for k, v in c.most_common()) for a, c in counts.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description="FairLLaVA data: demo set, validation, converters.")
    ap.add_argument("--make-demo", metavar="DIR", help="write the synthetic benchmark and tokenizer to DIR")
    ap.add_argument("--n-train", type=int, default=SyntheticConfig.n_train, help="demo training images")
    ap.add_argument("--n-val", type=int, default=SyntheticConfig.n_val, help="demo validation images")
    ap.add_argument("--n-test", type=int, default=SyntheticConfig.n_test, help="demo test images")
    ap.add_argument("--size", type=int, default=SyntheticConfig.size, help="demo image side in pixels")
    ap.add_argument("--seed", type=int, default=SyntheticConfig.seed, help="demo random seed")
    ap.add_argument("--check", metavar="JSON", help="validate a LLaVA JSON file and print its group counts")
    ap.add_argument("--dataset", default="mimic", choices=sorted(DATASETS), help="format of --check JSON")
    ap.add_argument("--skip-bad", action="store_true", help="--check: skip and count bad items instead of failing")
    ap.add_argument("--convert", nargs=3, metavar=("DATASET", "CSV", "OUT_JSON"),
                    help="convert a metadata CSV (mimic|padchest|ham) to LLaVA JSON")
    args = ap.parse_args(argv)
    if not (args.make_demo or args.check or args.convert):
        ap.error("nothing to do: give --make-demo, --check or --convert")
    if args.make_demo:
        t0 = time.time()
        cfg = SyntheticConfig(args.n_train, args.n_val, args.n_test, args.size, args.seed)
        splits = make_synthetic(args.make_demo, cfg)
        print(f"wrote {args.make_demo} in {time.time() - t0:.1f}s ({cfg.size}px images, tokenizer.json with "
              f"{load_tokenizer(args.make_demo).get_vocab_size()} tokens)")
        for split, items in splits.items():
            recs = read_llava_json(Path(args.make_demo) / f"{split}.json")  # read back, validated
            _print_groups(split, recs)
            for finding, attr in (("cardiomegaly", "race"), ("effusion", "age"), ("opacity", "race")):
                rates = {}
                for r, it in zip(recs, items):
                    rates.setdefault(ATTRIBUTES[attr].classes[r["attrs"][attr]], []).append(it["findings_labels"][finding])
                print(f"{'':7s}{finding} rate by {attr}: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in sorted(rates.items())))
    if args.check:
        _print_groups("check", read_llava_json(args.check, args.dataset, on_error="skip" if args.skip_bad else "raise"))
    if args.convert:
        dataset, csv_path, out_path = args.convert
        converters = dict(mimic=mimic_csv_to_json, padchest=padchest_csv_to_json, ham=ham_csv_to_json)
        if dataset not in converters:
            ap.error(f"--convert: unknown dataset {dataset!r}; choose from {sorted(converters)}")
        converters[dataset](csv_path, out_path)


if __name__ == "__main__":
    main()
