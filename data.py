"""Data for FairLLaVA: records, images, the tokenizer and prompt template, labels, batches, the
baselines.

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

The synthetic chest X-ray benchmark of the demo (real MIMIC-CXR needs credentialed access) lives in
synthetic.py and writes this same MIMIC JSON format.

    python data.py --check runs/demo/data/train.json --dataset mimic   # validate, print group counts
    python data.py --check train.json --decode --image-root mimic-cxr-jpg/   # also decode every image
    python data.py --convert ham HAM10000_metadata.csv ham.json        # metadata CSV -> LLaVA JSON
"""

import argparse
import csv
import json
import math
import os
import struct
import sys
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
        raise ValueError(f"unknown race {short(value)}; expected one of {RACES[:7]} or unknown/declined/''")
    return RACES.index(key)


def encode_gender(value):
    key = str(value).strip().lower()
    if key in ("m", "male"):
        return 0
    if key in ("f", "female"):
        return 1
    raise ValueError(f"unknown gender {short(value)}; expected M/F or male/female")


def age_group(years, cutoffs="mimic"):
    """Age in years -> 0/1/2. MIMIC-CXR bins are [0,44], (44,65], (65,inf); the HAM10000 script
    cuts at 45 and 66 (age < 45, 45 <= age < 66, age >= 66). They agree on whole years."""
    try:
        age = float(years)
    except (TypeError, ValueError):
        raise ValueError(f"age {short(years)} is not a number") from None
    if not 0 <= age < 150:  # also catches NaN, which pandas writes for an empty cell
        raise ValueError(f"age {short(years)} is out of range")
    if cutoffs == "ham":
        return 0 if age < 45 else 1 if age < 66 else 2
    return 0 if age <= 44 else 1 if age <= 65 else 2


def encode_age_group(value):
    """MIMIC's precomputed anchor_age_group (0, 1 or 2)."""
    if str(value).strip() not in ("0", "1", "2"):
        raise ValueError(f"age group {short(value)} is not 0, 1 or 2")
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


def clip(text, limit=80):
    """text cut to `limit` characters: an error message echoes what it got, never a whole file."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(value, limit=80):
    """repr(value), clipped."""
    return clip(repr(value), limit)


def one_line(e):
    """The message of a refused input as one line, in the error's own words: an OSError as
    "path: reason" (not "[Errno 2] ... 'path'"), a multi-line report joined with "; "."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return "; ".join(" ".join(part.split()) for part in str(e).splitlines() if part.strip())


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr (exit code 2), naming the flag; the usage stays in --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, unless its text already says it or it is a plain switch;
    an empty default shows as "not set". Description and epilog are printed as written."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if "default:" in (action.help or "") or switch or action.required or action.help == argparse.SUPPRESS:
            return action.help
        if action.default in ("", None):
            return f"{action.help} (default: not set)"
        return super()._get_help_string(action)


def command_line(prog, main, argv=None, status=2):
    """main(argv), with bad input (ValueError, OSError: a flag, a path, a file's content) ending as
    one line `PROG: error: ...` on stderr and exit `status`, never a traceback."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(status)


def nearest_existing(path):
    """`path` or its nearest ancestor that exists (absolute): where a folder to be made would go,
    and what is in the way when that is a file."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def read_json(path, what="JSON"):
    """Parse a JSON file; a bad file is a DataError naming it (and the line and column of the
    problem), never a bare JSONDecodeError. `what` says what the file should hold."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected {what}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; expected a file with {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
                        f"{_jsonl_hint(text, e)}; expected {what}") from None


def _jsonl_hint(text, e):
    # A JSON Lines file (one object per line) fails on its second line with "Extra data".
    if e.msg == "Extra data" and e.lineno > 1:
        return " (it looks like JSON Lines, one object per line, not one JSON document)"
    return ""


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


HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # 16/32-bit X-rays (PadChest), float images


def _open_image(path, decode=True):
    if not Path(path).is_file():
        raise _Bad("image", f"no such file {path}")
    try:
        with Image.open(path) as im:  # reads the header only, unless decode
            if decode:
                im.load()
    except Exception as e:
        raise _Bad("image", f"unreadable image {path}: {e}") from None
    problem = _intensity_problem(im) if decode else None
    if problem:
        raise _Bad("image", f"{path}: {problem}")
    return im


def _intensity_problem(image):
    """What is wrong with a 16/32-bit or float image's pixels, or None. ImageProcessor scales these by
    their maximum into 8 bits, so a negative or non-finite value would wrap around."""
    if image.mode not in HIGH_DEPTH_MODES:
        return None
    a = np.asarray(image, dtype=np.float32)
    if not np.isfinite(a).all():
        return f"{image.mode}-mode pixels must be finite and >= 0 (intensities), found non-finite values"
    if a.min() < 0:
        return f"{image.mode}-mode pixels must be finite and >= 0 (intensities), found a minimum of {a.min():g}"
    return None


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
    items = read_json(path, "a JSON list of LLaVA items")
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of items, got a JSON {type(items).__name__}")
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
            if not isinstance(item["image"], str):
                raise _Bad("image", f"expected a file path (a string), got a JSON {type(item['image']).__name__}")
            question, answer = _question_answer(item, dataset)
            attrs = _attrs(item, dataset, unknown_race)
            image = str(root / item["image"])
            if check_images:
                _open_image(image, decode_images)
        except _Bad as e:
            msg = f"{path}: item {short(item_id)}: field {e.field!r}: {e.problem}"
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


def recorded_attributes(dataset):
    """The attributes a data set records (HAM10000 and PadChest have no race)."""
    return tuple(a for a in ATTRIBUTES if DATASETS[dataset][a] is not None)



def group_names(records, attribute):
    """The human-readable group of every record for one attribute (data.ATTRIBUTES names)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; choose from {tuple(ATTRIBUTES)}")
    classes = ATTRIBUTES[attribute].classes
    codes = [r.get("attrs", {}).get(attribute, UNKNOWN) for r in records]
    missing = [r["id"] for r, c in zip(records, codes) if c is None or c == UNKNOWN]
    if missing:
        raise ValueError(
            f"attribute {attribute!r} is missing from the metadata of {len(missing)} of {len(records)} records, "
            f"e.g. {missing[:5]}; score only the attributes the data set records "
            f"(HAM10000 and PadChest have no race) or drop those records")
    bad = sorted({c for c in codes if not (isinstance(c, int) and 0 <= c < len(classes))}, key=str)
    if bad:
        raise ValueError(f"attribute {attribute!r}: codes {bad} are not in 0..{len(classes) - 1} ({classes})")
    return [classes[c] for c in codes]


# ----------------------------------------------------------------------------------------------
# Converters: metadata CSV -> LLaVA JSON (filters as the official data: usable views, non-empty
# findings, all demographics present)


def check_convert_paths(csv_path, out_path, overwrite=False):
    """Before a conversion reads anything: it never writes over its own input, and over an existing
    file only with --overwrite (the user's own JSON may sit at that name)."""
    csv_path, out_path = Path(csv_path), Path(out_path)
    if out_path.exists() and csv_path.exists() and out_path.resolve() == csv_path.resolve():
        raise DataError(f"--convert: OUT_JSON {out_path} is the input CSV itself; give another output path")
    if out_path.is_dir():
        raise DataError(f"--convert: OUT_JSON {out_path} is a folder; give a file path")
    if out_path.exists() and not overwrite:
        raise DataError(f"--convert: OUT_JSON {out_path} exists; --overwrite replaces it, or give another path")


def _convert(csv_path, out_path, make_item, columns):
    """Rows of csv_path -> make_item -> a LLaVA JSON list in out_path. `columns`: the header names
    the converter needs, each a name or a tuple of alternatives (one of them is enough). A CSV
    without them is refused before anything is written: a wrong file must not come out as
    "wrote 0 of N rows"."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's BOM
            reader = csv.DictReader(f)
            _check_columns(csv_path, reader.fieldnames or [], columns)
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        f"save the CSV as UTF-8 and convert again") from None
    items, dropped = [], Counter()
    for row in rows:
        item = make_item({k: (v or "").strip() for k, v in row.items() if k is not None})
        if isinstance(item, str):
            dropped[item] += 1
        else:
            items.append(item)
    why = ", ".join(f"{k} {v}" for k, v in dropped.most_common()) or "none"
    if not items:
        raise DataError(f"{csv_path}: none of its {len(rows)} rows is usable (dropped: {why}); nothing written")
    tmp = Path(str(out_path) + ".tmp")
    try:  # whole or not at all: a killed conversion leaves no half-written JSON under the real name
        tmp.write_text(json.dumps(items, indent=1))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{csv_path}: wrote {len(items)} of {len(rows)} rows to {out_path} (dropped: {why})")
    return items


def _check_columns(csv_path, header, columns):
    missing = [c if isinstance(c, str) else " or ".join(c) for c in columns
               if not set((c,) if isinstance(c, str) else c) & set(header)]
    if missing:
        found = short(", ".join(header), 120) if header else "no header row"
        raise DataError(f"{csv_path}: missing column(s) {'; '.join(missing)} (found: {found})")


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
        sid, study = r.get("subject_id"), r.get("study_id")
        if not (r.get("path") or (sid and study)):
            return "no path"
        path = r.get("path") or f"files/p{sid[:2]}/p{sid}/s{study}/{r['dicom_id']}.jpg"
        return _item(r["dicom_id"], path, mimic_question(r.get("indication")), r["findings"],
                     anchor_age_group=age, gender=r["gender"].upper()[0], race_major=race_major(r.get("race")))
    return _convert(csv_path, out_path, make, ["dicom_id", ("path", "subject_id"), ("path", "study_id"),
                                                "ViewPosition", "findings", "anchor_age", "gender", "race"])


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
    return _convert(csv_path, out_path, make, ["ImageID", "FINDINGS", ("Age", "PatientBirth"),
                                                ("Age", "StudyDate_DICOM"), ("gender", "PatientSex_DICOM")])


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
    return _convert(csv_path, out_path, make, ["image_id", "dx", "age", "sex"])


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
        problem = _intensity_problem(image)
        if problem:
            raise ValueError(problem)
        if image.mode in HIGH_DEPTH_MODES:
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


def tokenizer_file(path):
    """The file load_tokenizer reads for `path`: the path itself, or in a folder its tokenizer.json,
    else its SentencePiece tokenizer.model (Vicuna ships only that one)."""
    p = Path(path)
    if p.is_dir():
        found = [p / name for name in ("tokenizer.json", "tokenizer.model") if (p / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{p}: no tokenizer.json or tokenizer.model")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer file not found")
    return p


def load_tokenizer(path):
    """A tokenizers.Tokenizer from the file tokenizer_file(path) picks: a tokenizer.json as it is, a
    SentencePiece tokenizer.model converted by sentencepiece_tokenizer."""
    from tokenizers import Tokenizer
    p = tokenizer_file(path)
    if p.suffix == ".model":
        return sentencepiece_tokenizer(p)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library reports a bad file as a bare Exception
        raise ValueError(f"{p}: not a readable tokenizers file ({short(str(e))})") from None


# SentencePiece tokenizer.model -> tokenizers.Tokenizer. The file is a serialized protobuf
# ModelProto (sentencepiece_model.proto); we read the few fields encoding depends on with a small
# reader of the wire format rather than depend on protobuf and sentencepiece.

class _Corrupt(Exception):
    pass


def _varint(buf, pos):
    value, shift = 0, 0
    while shift < 70:
        if pos >= len(buf):
            raise _Corrupt("ends inside a number")
        byte = buf[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise _Corrupt("a number is longer than 10 bytes")


def _wire_fields(buf):
    """(field number, value) of each field of one serialized message: a varint as an int, a
    length-delimited / fixed32 / fixed64 field as its bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5):
            size, pos = _varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            value, pos = buf[pos:pos + size], pos + size
            if pos > len(buf):
                raise _Corrupt(f"ends inside field {number}")
        else:  # 3/4 (groups) and 6/7 do not occur in a SentencePiece model
            raise _Corrupt(f"field {number} has wire type {wire}")
        yield number, value


# field number -> (name, kind, proto2 default): only the fields that encoding depends on
_PIECE = {1: ("piece", "str", ""), 2: ("score", "float", 0.0), 3: ("type", "int", 1)}
# (trainer options such as split_digits shape the pieces; encoding needs only the pieces themselves)
_TRAINER = {3: ("model_type", "int", 1), 24: ("treat_whitespace_as_suffix", "bool", False),
            35: ("byte_fallback", "bool", False), 40: ("unk_id", "int", 0), 41: ("bos_id", "int", 1)}
_NORMALIZER = {1: ("name", "str", ""), 2: ("precompiled_charsmap", "bytes", b""),
               3: ("add_dummy_prefix", "bool", True), 4: ("remove_extra_whitespaces", "bool", True),
               5: ("escape_whitespaces", "bool", True)}
_MODEL = {1: ("pieces", [_PIECE], None), 2: ("trainer_spec", _TRAINER, None), 3: ("normalizer_spec", _NORMALIZER, None)}
PIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


def _message(buf, schema):
    """One message -> {name: value} for the fields in `schema`, proto2 defaults for absent ones."""
    out = {name: [] if isinstance(kind, list) else default for name, kind, default in schema.values()}
    for number, value in _wire_fields(buf):
        if number in schema:  # other fields (training options, self-test data) do not matter here
            name, kind, _ = schema[number]
            if isinstance(kind, list):  # a repeated field
                out[name].append(_value(value, kind[0], name))
            else:
                out[name] = _value(value, kind, name)
    return out


def _value(value, kind, name):
    """A field's wire value as `kind`: "int", "bool", "float", "str", "bytes" or a message schema."""
    if isinstance(value, int) != (kind in ("int", "bool")) or (kind == "float" and len(value) != 4):
        raise _Corrupt(f"field {name} has the wrong wire type")
    if isinstance(kind, dict):
        return _message(value, kind)
    if kind == "int":
        return value - (1 << 64) if value >= 1 << 63 else value  # a negative int32 (pad_id -1) is 64-bit
    if kind == "float":
        return struct.unpack("<f", value)[0]
    return bool(value) if kind == "bool" else value.decode("utf-8") if kind == "str" else value


def read_sentencepiece_model(path):
    """tokenizer.model -> {pieces: [{piece, score, type}], trainer_spec: {...}, normalizer_spec: {...}}.
    A truncated or corrupt file is a one-line ValueError naming it."""
    try:
        model = _message(Path(path).read_bytes(), _MODEL)
    except (_Corrupt, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable SentencePiece model ({e}); is the file truncated?") from None
    for name in ("pieces", "trainer_spec", "normalizer_spec"):
        if not model[name]:
            raise ValueError(f"{path}: not a SentencePiece model: it has no {name}; is the file truncated?")
    return model


def _check_supported(model, path):
    """Refuse what the conversion below would not reproduce exactly. It covers what Llama (and
    Vicuna) use: BPE, byte fallback, identity normalization with the dummy prefix and spaces kept."""
    spec, norm, pieces = model["trainer_spec"], model["normalizer_spec"], model["pieces"]
    types, unk, kind = [p["type"] for p in pieces], spec["unk_id"], spec["model_type"]
    problems = [  # (is it so, what the file has)
        (kind != 2, f"trainer_spec.model_type is {MODEL_TYPES.get(kind, kind)}"),
        (not spec["byte_fallback"], "trainer_spec.byte_fallback is false"),
        (types.count(6) != 256, f"it has {types.count(6)} BYTE pieces, not 256"),
        (spec["treat_whitespace_as_suffix"], "trainer_spec.treat_whitespace_as_suffix is true"),
        (norm["precompiled_charsmap"] != b"", f"normalizer_spec has a precompiled_charsmap ({norm['name']!r})"),
        (norm["remove_extra_whitespaces"], "normalizer_spec.remove_extra_whitespaces is true"),
        (not norm["escape_whitespaces"], "normalizer_spec.escape_whitespaces is false"),
        (not set(types) <= {1, 2, 3, 6}, "pieces include " + ", ".join(
            PIECE_TYPES.get(t, f"type {t}") for t in sorted(set(types) - {1, 2, 3, 6})) + " ones"),
        (not 0 <= unk < len(pieces) or types[unk] != 2, f"trainer_spec.unk_id {unk} is not an UNKNOWN piece"),
        (len({p["piece"] for p in pieces}) != len(pieces), "two pieces are the same string"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"{path}: {what}; only BPE with byte_fallback and identity normalization "
                             f"(as in Llama's tokenizer.model) is supported")


def _bpe_merges(pieces):
    """SentencePiece BPE merges the adjacent pair of symbols whose concatenation is the
    highest-scoring piece; `tokenizers` BPE merges the pair of lowest rank. So every split of a
    NORMAL piece into two NORMAL pieces (the only symbols SentencePiece merges) is a merge, ranked
    by the merged piece's score, then its id, then the shorter left part first, as HF converts
    Llama's tokenizer (that last tie matters only when two overlapping pairs make the same piece)."""
    normal = {p["piece"]: i for i, p in enumerate(pieces) if p["type"] == 1}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-pieces[i]["score"], i, k, left, right))
    ranked.sort(key=lambda m: m[:3])
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_tokenizer(path):
    """A SentencePiece BPE tokenizer.model as a tokenizers.Tokenizer that gives the ids and text of
    SentencePiece itself (and of HF's LlamaTokenizer, which splits special tokens such as "</s>"
    out of the text first: so do we). encode() adds the BOS as Llama does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    model = read_sentencepiece_model(path)
    _check_supported(model, path)
    pieces, spec, norm = model["pieces"], model["trainer_spec"], model["normalizer_spec"]
    vocab = {p["piece"]: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(pieces), unk_token=pieces[spec["unk_id"]]["piece"],
                               fuse_unk=True, byte_fallback=True))
    # SentencePiece's normalizer (identity rules): the dummy-prefix "▁" before a non-empty text,
    # then every space written "▁". No pre-tokenizer: SentencePiece's BPE runs over the whole text.
    prefix = [normalizers.Prepend("▁")] if norm["add_dummy_prefix"] else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    # Control and unknown pieces are special tokens: matched in the raw text as HF's LlamaTokenizer
    # does (SentencePiece alone would spell "</s>" out), and dropped by skip_special_tokens. The text
    # between them is normalized piece by piece, each with its dummy prefix, as the "legacy"
    # LlamaTokenizer does (the v1 template never puts text after a "</s>", so legacy or not agree).
    tok.add_special_tokens([AddedToken(p["piece"], special=True, normalized=False)
                            for p in pieces if p["type"] in (2, 3)])
    # SentencePiece drops the first "▁" of the decoded text: the dummy prefix
    strip = [decoders.Strip(" ", 1, 0)] if norm["add_dummy_prefix"] else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    if 0 <= spec["bos_id"] < len(pieces):
        bos = pieces[spec["bos_id"]]["piece"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec["bos_id"])])
    return tok


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
    full, labels = _full_example(tokenizer, question, answer, item_id)
    if IMAGE_TOKEN_INDEX in full and IMAGE_TOKEN_INDEX not in full[:max_length]:
        raise DataError(f"item {short(item_id)}: max_length {max_length} cuts off the image sentinel")
    return full[:max_length], labels[:max_length]


def _full_example(tokenizer, question, answer, item_id):
    """encode_example before the cut at max_length: (input_ids, labels) of the whole conversation."""
    prompt = tokenize_with_image(tokenizer, conversation_prompt(question))
    full = tokenize_with_image(tokenizer, conversation_prompt(question, answer))
    eos = tokenizer.token_to_id("</s>")
    if full[:len(prompt)] != prompt or len(full) <= len(prompt) or full[-1] != eos:
        raise DataError(f"item {short(item_id)}: the tokenizer merges across 'ASSISTANT:' and the answer, "
                        f"or does not map '</s>' to one eos id; prompt and labels would disagree")
    return full, [IGNORE_INDEX] * len(prompt) + full[len(prompt):]


@dataclass
class TextScan:
    """What tokenisation does to a set of records: the ids of those whose text has characters the
    vocabulary lacks (they became <unk>) and of those longer than max_length (cut)."""
    n: int
    unk: list
    cut: list


def scan_text(records, tokenizer, max_length):
    """Tokenise every record as training will -> TextScan. Both losses are silent in training, so
    they are counted here, up front; an item that cannot be trained at all (the cut removes the
    image sentinel, prompt and labels disagree) is a DataError now rather than at step 5,000."""
    unk_id = tokenizer.token_to_id("<unk>")  # None: no <unk> (e.g. byte fallback covers every text)
    unk, cut = [], []
    for r in records:
        full, _ = _full_example(tokenizer, r["question"], r["answer"], r["id"])
        if unk_id is not None and unk_id in full:
            unk.append(r["id"])
        if len(full) > max_length:
            encode_example(tokenizer, r["question"], r["answer"], max_length, r["id"])  # the sentinel must survive
            cut.append(r["id"])
    return TextScan(len(records), unk, cut)


def load_image(path, item_id="?"):
    try:
        return _open_image(path)
    except _Bad as e:  # the file changed since read_llava_json checked it
        raise DataError(f"item {short(item_id)}: field 'image': {e.problem}") from None


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


def _print_groups(name, records):
    counts = {a: Counter("n/a" if r["attrs"][a] == UNKNOWN else spec.classes[r["attrs"][a]] for r in records)
              for a, spec in ATTRIBUTES.items()}
    print(f"{name:6s} n={len(records):5d}  " +
          "  ".join(f"{a}: " + ", ".join(f"{k} {v}" for k, v in c.most_common()) for a, c in counts.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description="FairLLaVA data: validation and converters.")
    ap.add_argument("--check", metavar="JSON", help="validate a LLaVA JSON file and print its group counts")
    ap.add_argument("--dataset", default="mimic", choices=sorted(DATASETS), help="format of --check JSON")
    ap.add_argument("--skip-bad", action="store_true", help="--check: skip and count bad items instead of failing")
    ap.add_argument("--image-root", default=None,
                    help="--check: folder the JSON's image paths are relative to, as train.py's --image-root "
                         "(default: the JSON's folder)")
    ap.add_argument("--decode", action="store_true",
                    help="--check: decode every image fully (slower); without it only the image header is read, "
                         "so a truncated or corrupt file passes --check and fails when training reaches it")
    ap.add_argument("--convert", nargs=3, metavar=("DATASET", "CSV", "OUT_JSON"),
                    help="convert a metadata CSV (mimic|padchest|ham) to LLaVA JSON")
    ap.add_argument("--overwrite", action="store_true", help="--convert: replace an existing OUT_JSON")
    args = ap.parse_args(argv)
    if not (args.check or args.convert):
        ap.error("nothing to do: give --check or --convert (the synthetic benchmark: python synthetic.py)")
    if args.decode and not args.check:
        ap.error("--decode goes with --check")
    if args.image_root and not args.check:
        ap.error("--image-root goes with --check")
    converters = dict(mimic=mimic_csv_to_json, padchest=padchest_csv_to_json, ham=ham_csv_to_json)
    if args.convert and args.convert[0] not in converters:
        ap.error(f"--convert: unknown dataset {args.convert[0]!r}; choose from {sorted(converters)}")
    try:  # a bad file is one line naming it, not a traceback
        if args.check:
            _print_groups("check", read_llava_json(args.check, args.dataset, args.image_root, decode_images=args.decode,
                                                   on_error="skip" if args.skip_bad else "raise"))
        if args.convert:
            dataset, csv_path, out_path = args.convert
            check_convert_paths(csv_path, out_path, args.overwrite)
            converters[dataset](csv_path, out_path)
    except (ValueError, OSError) as e:
        raise SystemExit(f"data.py: error: {one_line(e)}") from None


if __name__ == "__main__":
    main()
