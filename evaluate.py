"""
Evaluation for FairLLaVA: generate reports, score them overall and per demographic group, and
write the paper's equity-scaled table.

Follows the paper's evaluation ("Equity-Scaled Metric (ES-M)" and the experiments): every metric M
is computed on the whole test set and on each group g of an attribute a (race, age, gender); the gap is
Delta_a = max_g M_g - min_g M_g and the headline number is ES-M_a = M_all / (1 + Delta_a), so a
model that is equally poor for everyone does not look fair. The metrics themselves (BLEU-1/4,
ROUGE-L, the rule-based CheXpert-style F1 standing in for CheXbert-F1, HAM10000 accuracy,
macro-F1, balanced accuracy) live in metrics.py; this file matches predictions to the test set,
names the groups, and lays the numbers out.

Four parts:
1. `generate_predictions`: batched greedy decoding with the KV cache, one JSONL line per report,
   flushed as it goes, so a killed run picks up where it stopped; `claim_predictions` keys the file
   on what made it (predictions_key.json), so a run resumes only its own predictions. Under
   torchrun each process generates its share of the test set into its own file and rank 0 merges
   them (`claim_shard`, `merge_shards`).
2. `score`: overall and per-group numbers with bootstrap intervals, for predictions from this
   model or from any other system (the official code's outputs included), matched by id.
3. `attribute_probe`: a fresh linear probe on the pooled hidden state h (fairness.py pooling):
   how much race / age / gender the representation still gives away, the leak FairLLaVA's DIM
   term is meant to remove (the paper's motivation: images leak demographics, Gichoya et al.).
4. `write_outputs` / `compare_markdown`: results.json, a Markdown table laid out like the paper's,
   and a bar chart of the group scores (groups.png, drawn with Pillow).

    # a model: base LLM + vision tower + projector (+ a PEFT LoRA adapter, merged for speed)
    python evaluate.py --llm vicuna-7b-v1.5 --vision BiomedCLIP --projector run/mm_projector.bin \\
        --adapter run/adapter --test-json test.json --out eval/fairllava
    # the same on 8 GPUs: each process generates its share of the test set, rank 0 merges and scores
    torchrun --nproc_per_node=8 evaluate.py --llm vicuna-7b-v1.5 ... --out eval/fairllava
    # any system's predictions (JSONL with "id" and "prediction"), no model needed
    python evaluate.py --predictions preds.jsonl --test-json test.json --out eval/other

Predictions from other systems: a JSONL line needs an id ("id" or LLaVA's "question_id") and the text
("prediction", "text", "pred" or "output"); references always come from the test JSON. `--ids FILE`
and `--limit N` score a subset; `--help` lists the accepted keys of every input file.
What is left out: RadGraph-F1, CheXbert-F1 and GREEN need large learned models (see metrics.py for
how the rule-based F1 differs); sampling-based decoding is not exposed on the command line; two
runs writing the same predictions file at once are not guarded against.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import metrics
import outputs
from data import (ATTRIBUTES, DATASETS, UNKNOWN, HelpFormatter, ImageProcessor, OneLineParser, ReportDataset, clip,
                  collate, command_line, conversation_prompt, group_names, load_image, load_tokenizer,
                  nearest_existing, read_llava_json, recorded_attributes, tokenize_with_image, tokenizer_file)
from fairness import FairnessConfig, fit_linear_probe, pool_hidden, token_mask
from lora import load_peft_adapter, merge_lora
from checkpoint import load_llava, read_llama_config, resolve_path, weight_files
from ddp import Dist, setup_distributed
from generate import generate
from preflight import Preflight, check_tokenizer, preflight_model, preflight_out, preflight_paths, preflight_records

# The metrics of each data set, and which of them make the paper's equity-scaled table and the chart.
# short column name -> metric name. The paper's clinical column is RadGraph-F1 (MIMIC main table) and
# CheXbert-F1 (comparison with Chen et al.); ours is the rule-based CheXpert-style micro-F1 over the
# 14 observations, which needs no weights.
HEADLINE = {
    "mimic": {"BLEU1": "BLEU-1", "BLEU4": "BLEU-4", "F1": "CheXpert-F1 (micro)"},
    "padchest": {"BLEU1": "BLEU-1", "BLEU4": "BLEU-4", "F1": "CheXpert-F1 (micro)"},
    "ham": {"Acc": "Accuracy", "F1": "Macro-F1", "BAcc": "Balanced accuracy"},
}
CHART = {"mimic": ("BLEU-4", "CheXpert-F1 (micro)"), "padchest": ("BLEU-4", "CheXpert-F1 (micro)"),
         "ham": ("Accuracy", "Macro-F1")}
SHORT = {"race": "R", "age": "A", "gender": "G"}  # the paper's column suffixes


def dataset_metrics(dataset):
    if dataset not in HEADLINE:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(HEADLINE)}")
    return metrics.ham_metrics() if dataset == "ham" else metrics.report_metrics()


# ----------------------------------------------------------------------------------------------
# Predictions: generation and the resumable JSONL file

# field names other systems use for the same thing (LLaVA's model_vqa writes question_id / text)
ID_KEYS = ("id", "question_id")
PREDICTION_KEYS = ("prediction", "text", "pred", "output")


def _parse_line(line, where):
    """One JSONL line -> {id, prediction[, reference]}; `where` is "FILE line N" for the errors."""
    if line.lstrip().startswith("["):
        # a JSON array where JSONL is expected: the first line of a (pretty-printed) array file
        raise ValueError(f"{where}: expected one JSON object per line (JSONL), got a JSON array")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                         f"expected one JSON object per line (JSONL)") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected one JSON object per line (JSONL), got a JSON {type(row).__name__}")
    id_key = next((k for k in ID_KEYS if k in row), None)
    pred_key = next((k for k in PREDICTION_KEYS if k in row), None)
    if id_key is None or pred_key is None:
        raise ValueError(f"{where}: needs an id ({'/'.join(ID_KEYS)}) and a prediction string "
                         f"({'/'.join(PREDICTION_KEYS)}), got keys {clip(sorted(row))}")
    item_id, pred = row[id_key], row[pred_key]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):  # str(1.0) or str({}) match nothing
        raise ValueError(f"{where}: field {id_key!r} must be a string or an integer, got {clip(json.dumps(item_id))}")
    if not isinstance(pred, str):
        raise ValueError(f"{where}: field {pred_key!r} must be a string, got {clip(json.dumps(pred))}")
    return {"id": str(item_id), "prediction": pred, **({"reference": row["reference"]} if "reference" in row else {})}


def _decode(data, path):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); expected JSONL") from None


def read_predictions(path):
    """A predictions JSONL file -> [{id, prediction[, reference]}]; blank lines are skipped."""
    text = _decode(Path(path).read_bytes(), path)
    # split on "\n" only: str.splitlines also breaks at U+2028 and U+0085, which JSON strings may hold raw
    return [_parse_line(line, f"{path} line {n}") for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _resume(out_jsonl):
    """The predictions already in out_jsonl, by id (first one wins). A run killed in the middle of a
    write leaves a last line without its newline: it is cut off here, and regenerated. The cut is
    made on bytes, before decoding, because the kill may also have split a multi-byte character."""
    path = Path(out_jsonl)
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]  # everything up to the last newline
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    done = {}
    for n, line in enumerate(_decode(complete, path).split("\n"), 1):
        if line.strip():
            row = _parse_line(line, f"{path} line {n}")
            done.setdefault(row["id"], row)
    return done


@torch.no_grad()
def generate_predictions(model, tokenizer, records, image_processor, out_jsonl, batch_size=16,
                         max_new_tokens=256, desc="generate", quiet=False):
    """Greedy reports for `records`, appended to out_jsonl as {"id", "prediction", "reference"},
    one flushed line per report. Ids already in the file are not generated again (resume): the caller
    makes sure they come from this model and these settings (main does, with claim_predictions). Returns
    the predictions of `records`, in their order; lines of other ids in the file are left alone."""
    eos = tokenizer.token_to_id("</s>")
    if eos is None:
        raise ValueError("the tokenizer has no '</s>' token: generation would never stop")
    model.eval()
    done = _resume(out_jsonl)
    todo = [r for r in records if r["id"] not in done]
    prompts = {r["id"]: tokenize_with_image(tokenizer, conversation_prompt(r["question"])) for r in todo}
    # similar lengths in a batch waste less compute on padding; longest first, so a batch that
    # does not fit in memory fails at the start of the run, not at the end
    todo.sort(key=lambda r: -len(prompts[r["id"]]))
    device = next(model.parameters()).device
    pixel_dtype = next(model.vision_tower.parameters()).dtype
    pad_id = model.llm.config.pad_token_id
    Path(out_jsonl).parent.mkdir(parents=True, exist_ok=True)
    with open(out_jsonl, "a", encoding="utf-8") as f, \
            tqdm(total=len(records), initial=len(records) - len(todo), desc=desc, unit="report", disable=quiet) as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            pixels = torch.stack([image_processor(load_image(r["image"], r["id"])) for r in batch])  # (B, 3, S, S)
            out = generate(model, [prompts[r["id"]] for r in batch], pixels.to(device, pixel_dtype),
                           max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_id)
            for r, ids in zip(batch, out):
                row = {"id": r["id"], "prediction": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                       "reference": r["answer"]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[r["id"]] = row
            f.flush()  # the batch is on disk before the next one starts
            bar.update(len(batch))
    return [done[r["id"]] for r in records]


# ----------------------------------------------------------------------------------------------
# Scoring: overall, per group, gap, ES-M, bootstrap intervals


def match_predictions(predictions, records):
    """(hyps, refs) in the order of `records`, the references taken from the test set. Every record
    needs exactly one prediction, and every prediction a record."""
    if not records:
        raise ValueError("empty test set: no records to score")
    if not predictions:
        raise ValueError(f"no predictions to score (the test set has {len(records)} records)")
    ids = [str(p["id"]) for p in predictions]
    dup = [i for i, c in Counter(ids).items() if c > 1]
    if dup:
        raise ValueError(f"{len(dup)} ids have more than one prediction, e.g. {dup[:5]}")
    by_id = {str(p["id"]): p["prediction"] for p in predictions}
    known = {r["id"] for r in records}
    unknown = [i for i in ids if i not in known]
    missing = [r["id"] for r in records if r["id"] not in by_id]
    if unknown or missing:
        msg = f"{len(predictions)} predictions but {len(records)} test records" \
            if len(predictions) != len(records) else "the prediction ids do not match the test set"
        if unknown:
            msg += f"; {len(unknown)} prediction ids are not in the test set, e.g. {unknown[:5]}"
        if missing:
            msg += f"; {len(missing)} test records have no prediction, e.g. {missing[:5]}"
        raise ValueError(msg)
    return [by_id[r["id"]] for r in records], [r["answer"] for r in records]


def _pair(interval):
    return [_num(interval[0]), _num(interval[1])]


def _num(x):
    # NaN (a group absent from every resample) is not valid JSON: write null
    x = float(x)
    return None if math.isnan(x) else x


def score(predictions, records, attributes=("race", "age", "gender"), dataset="mimic", n_resamples=200,
          seed=0, min_group_size=30, m_all="whole_set", confidence=0.95, extra_metrics=None):
    """Every metric of the data set, on the whole test set and per group of each attribute.

    predictions: [{"id", "prediction"}] (any order); records: the test set from data.read_llava_json,
    which provides the references and the groups. Groups smaller than min_group_size are scored and
    flagged "small" but left out of the gap and ES (metrics.fairness_report). m_all="whole_set" is the
    paper's ES numerator; "group_mean" the official script's. Returns a JSON-serialisable dict:
        overall[metric] = {score, ci}
        fairness[attribute][metric] = {m_all, gap, es, ci: {m_all, gap, es, gap_corrected},
                                       gap_null: {mean, q95, mean_sq}, gap_corrected,
                                       groups: {name: {score, n, small, ci}}}
    (with n_resamples > 0: stratified bootstrap intervals, the gap's permutation null and the
    null-corrected gap, see metrics.fairness_report)
    """
    hyps, refs = match_predictions(predictions, records)
    extra_metrics = extra_metrics or {}  # {short column name: metrics.Metric}, e.g. a benchmark's own labeler
    ms = {**dataset_metrics(dataset), **{m.name: m for m in extra_metrics.values()}}
    groups = {a: group_names(records, a) for a in attributes}  # fails on bad metadata before scoring
    out = {"dataset": dataset, "n": len(records), "attributes": list(attributes), "m_all": m_all,
           "min_group_size": min_group_size, "n_resamples": n_resamples, "seed": seed, "confidence": confidence,
           "headline": {**HEADLINE[dataset], **{k: m.name for k, m in extra_metrics.items()}},
           "chart": list(CHART[dataset]), "overall": {}, "fairness": {}}
    for name, metric in ms.items():
        ci = metrics.bootstrap_ci(metric, hyps, refs, n_resamples=n_resamples, seed=seed, confidence=confidence) \
            if n_resamples > 0 else (math.nan, math.nan)
        out["overall"][name] = {"score": metric(hyps, refs), "ci": _pair(ci)}
    reports = metrics.fairness_table(hyps, refs, groups, ms, min_group_size=min_group_size, m_all=m_all,
                                     n_resamples=n_resamples, seed=seed, confidence=confidence) if groups else []
    for r in reports:
        out["fairness"].setdefault(r.attribute, {})[r.metric] = {
            "m_all": r.m_all, "gap": r.gap, "es": r.es,
            "ci": {k: _pair(r.ci[k]) for k in ("m_all", "gap", "es", "gap_corrected") if k in r.ci},
            **({"gap_null": {k: _num(v) for k, v in r.gap_null.items()}, "gap_corrected": _num(r.gap_corrected)}
               if r.gap_null else {}),
            "groups": {g: {"score": s.score, "n": s.n, "small": s.small,
                           **({"ci": _pair(r.group_ci[g])} if g in r.group_ci else {})}
                       for g, s in r.groups.items()},
        }
    return out


# ----------------------------------------------------------------------------------------------
# Linear probe: how much demographic information h still carries


@torch.no_grad()
def pooled_features(model, tokenizer, image_processor, records, layer="mid", tokens="image", batch_size=16):
    """h for every record: the masked mean of the chosen hidden layer over the chosen tokens of the
    teacher-forced conversation, exactly as fairness.py pools it for the DAC. (N, H) float32, CPU."""
    model.eval()
    device = next(model.parameters()).device
    pixel_dtype = next(model.vision_tower.parameters()).dtype
    # its own generator: an iterator draws a seed, and the global stream is training's dropout
    loader = torch.utils.data.DataLoader(ReportDataset(records, tokenizer, image_processor),
                                         batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
    feats = []
    for b in loader:
        out = model(b["input_ids"].to(device), b["pixel_values"].to(device, pixel_dtype),
                    b["attention_mask"].to(device), labels=b["labels"].to(device), return_hidden=True)
        mask = token_mask(tokens, image_mask=out.image_mask, attention_mask=out.attention_mask, labels=out.labels)
        h, _ = pool_hidden(out.hidden, mask, layer=layer)  # (B, H)
        feats.append(h.cpu())
    return torch.cat(feats)


def probe_pooling(adapter):
    """(layer, tokens) the probe pools h with: those the run recorded in config.json beside its
    adapter folder (train.py writes it), else FairnessConfig's defaults (mid layer, image tokens)."""
    defaults = FairnessConfig()
    config = Path(adapter).parent / "config.json" if adapter else None
    if config is None or not config.is_file():
        return defaults.layer, defaults.tokens
    try:
        fair = json.loads(config.read_text())["fair"]
        return fair["layer"], fair["tokens"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config}: expected train.py's config with fair.layer and fair.tokens ({e!r})") from None


def attribute_probe(model, tokenizer, image_processor, train_records, test_records, layer="mid", tokens="image",
                    max_train=1000, attributes=("race", "age", "gender"), batch_size=16, seed=0):
    """Train a fresh linear probe per attribute on h of (up to max_train) training records, report its
    accuracy on the test records next to chance (the majority-class rate of the test labels), both
    in percent. Records whose label is unknown (-1) are skipped; an attribute with no known labels
    (race in HAM10000) is left out. The closer accuracy is to chance, the less h leaks."""
    if not train_records or not test_records:
        raise ValueError(f"the probe needs train and test records, got {len(train_records)} and {len(test_records)}")
    if len(train_records) > max_train:  # a fixed random subset, not the first rows (often sorted)
        keep = np.random.default_rng(seed).permutation(len(train_records))[:max_train]
        train_records = [train_records[i] for i in sorted(keep)]
    x_tr = pooled_features(model, tokenizer, image_processor, train_records, layer, tokens, batch_size)
    x_te = pooled_features(model, tokenizer, image_processor, test_records, layer, tokens, batch_size)
    out = {}
    for a in attributes:
        y_tr = torch.tensor([r["attrs"].get(a, UNKNOWN) for r in train_records])
        y_te = torch.tensor([r["attrs"].get(a, UNKNOWN) for r in test_records])
        k_tr, k_te = y_tr != UNKNOWN, y_te != UNKNOWN
        if not k_tr.any() or not k_te.any():
            continue
        predict = fit_linear_probe(x_tr[k_tr], y_tr[k_tr], ATTRIBUTES[a].num_classes)
        y = y_te[k_te]
        out[a] = {"accuracy": 100.0 * float((predict(x_te[k_te]) == y).float().mean()),
                  "chance": 100.0 * Counter(y.tolist()).most_common(1)[0][1] / len(y),
                  "n_classes": len(set(y.tolist())), "n_train": int(k_tr.sum()), "n_test": int(k_te.sum())}
    return out


# ----------------------------------------------------------------------------------------------
# Outputs: Markdown tables, a chart, JSON


def _f(x):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def headline(results):
    """The paper's table as one flat dict: ES-M and gap of each headline metric per attribute
    ("ES-BLEU4(R)", "Δ-BLEU4(R)", ...), the whole-set headline scores, and the probe accuracies
    ("probe race") when the results hold a "probe" entry (from attribute_probe)."""
    out = {}
    for kind, key in (("ES", "es"), ("Δ", "gap")):
        for a, by_metric in results["fairness"].items():
            for short, name in results["headline"].items():
                out[f"{kind}-{short}({SHORT[a]})"] = by_metric[name][key]
    for name in results["headline"].values():
        out[name] = results["overall"][name]["score"]
    for a, p in results.get("probe", {}).items():
        out[f"probe {a}"] = p["accuracy"]
    return out


def compare_markdown(results_by_method):
    """Several methods side by side, in the paper's layout: ES-M per attribute (higher is better),
    the gaps Delta (lower is better), all whole-set scores, and, when a result holds a "probe" entry,
    the probe accuracy next to chance."""
    first = next(iter(results_by_method.values()))
    flat = {m: headline(r) for m, r in results_by_method.items()}
    keys = list(dict.fromkeys(k for h in flat.values() for k in h))  # union, in first-seen order

    def table(cols):
        return metrics.markdown_table(["Method"] + cols, [[m] + [_f(h.get(k)) for k in cols] for m, h in flat.items()])

    parts = []
    es_cols = [k for k in keys if k.startswith("ES-")]
    if es_cols:
        parts.append(f"ES-M = M_all / (1 + Δ), Δ = max_g M_g − min_g M_g (R race, A age, G gender; groups "
                     f"with fewer than {first['min_group_size']} reports are left out of Δ). Higher is better.\n")
        parts.append(table(es_cols))
        parts.append("\nGaps Δ between the best and the worst group. Lower is better.\n")
        parts.append(table([k for k in keys if k.startswith("Δ-")]))
    names = list(first["overall"])
    parts.append(f"\nWhole test set (n = {first['n']}).\n")
    rows = [[m] + [_f(r["overall"].get(n, {}).get("score")) for n in names] for m, r in results_by_method.items()]
    parts.append(metrics.markdown_table(["Method"] + names, rows))
    probed = [a for a in ATTRIBUTES if any(a in r.get("probe", {}) for r in results_by_method.values())]
    if probed:
        parts.append("\nLinear probe on h: attribute accuracy % (chance = majority class). Closer to chance = "
                     "less demographic information in the representation.\n")
        rows = []
        for m, r in results_by_method.items():
            p = r.get("probe", {})
            rows.append([m] + [f"{p[a]['accuracy']:.1f} ({p[a]['chance']:.1f})" if a in p else "–" for a in probed])
        parts.append(metrics.markdown_table(["Method"] + probed, rows))
    return "\n".join(parts) + "\n"


def groups_markdown(results):
    """Per attribute: each group's n and scores (* = small group, left out of Δ), then M_all, Δ and
    ES of the headline metrics with their bootstrap intervals."""
    parts = []
    pct = round(100 * results["confidence"])
    for a, by_metric in results["fairness"].items():
        names = list(by_metric)
        groups = by_metric[names[0]]["groups"]
        rows = [[f"{g}{'*' if s['small'] else ''}", str(s["n"])]
                + [_f(by_metric[n]["groups"][g]["score"]) for n in names] for g, s in groups.items()]
        parts.append(f"\n### {a}\n\n" + metrics.markdown_table(["group", "n"] + names, rows))
        rows = []
        for short, n in results["headline"].items():
            rep = by_metric[n]
            ci = lambda k: f" [{_f(rep['ci'][k][0])}, {_f(rep['ci'][k][1])}]" if k in rep["ci"] else ""
            rows.append([n, _f(rep["m_all"]) + ci("m_all"), _f(rep["gap"]) + ci("gap"), _f(rep["es"]) + ci("es")])
        parts.append(f"\n{pct}% bootstrap intervals ({results['n_resamples']} resamples) in brackets.\n\n"
                     + metrics.markdown_table(["metric", "M_all", "Δ", "ES"], rows))
    return "\n".join(parts) + "\n"


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44))


def round_step(span, ticks=5):
    """The step of an axis with about `ticks` intervals over span, at a round value (..., 0.02,
    0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10, ...)."""
    e = math.floor(math.log10(span / ticks)) if span > 0 else 0
    return min(m * 10.0 ** k for k in (e, e + 1) for m in (1, 2, 2.5, 5) if m * 10.0 ** k >= span / ticks)


def draw_groups_png(results, path, title=""):
    """One panel per attribute: a bar per group and chart metric, the whole-set score as a dashed
    line, small groups drawn pale. Plain Pillow drawing, no plotting library."""
    from PIL import Image, ImageDraw
    names = [n for n in results["chart"] if n in results["overall"]]
    attrs = list(results["fairness"])
    W, panel_h, top = 1100, 330, 80
    img = Image.new("RGB", (W, top + panel_h * max(len(attrs), 1) + 10), "white")
    d = ImageDraw.Draw(img)
    big, font, small = _font(20), _font(15), _font(13)
    d.text((20, 12), title or "Per-group scores", fill="black", font=big)
    x = 20
    for k, n in enumerate(names):  # legend
        d.rectangle([x, 48, x + 18, 64], fill=COLORS[k % 3])
        d.text((x + 26, 48), n, fill="black", font=font)
        x += 26 + d.textlength(n, font=font) + 30
    d.text((x, 48), f"dashed: whole test set; pale, *: fewer than {results['min_group_size']} reports, "
                    "not in the gap", fill=(90, 90, 90), font=font)
    values = [s["score"] for a in attrs for n in names for s in results["fairness"][a][n]["groups"].values()]
    values += [results["overall"][n]["score"] for n in names]
    top_value = max(values + [1.0]) - 1e-6  # 100.0000001 is 100
    step = round_step(top_value)
    ymax = step * math.ceil(top_value / step)
    for i, a in enumerate(attrs):
        y0 = top + i * panel_h
        x_left, x_right, y_top, y_bottom = 70, W - 20, y0 + 40, y0 + panel_h - 60
        # the default font has no Greek letters: "gap" for Delta
        gaps = "; ".join(f"{n} gap {results['fairness'][a][n]['gap']:.2f}, ES {results['fairness'][a][n]['es']:.2f}"
                         for n in names)
        d.text((x_left, y0 + 8), f"{a}: {gaps}", fill="black", font=font)
        for t in range(round(ymax / step) + 1):  # y grid and labels
            y = y_bottom - (y_bottom - y_top) * t * step / ymax
            d.line([x_left, y, x_right, y], fill=(225, 225, 225))
            d.text((x_left - 8, y), f"{t * step:g}", fill="black", font=small, anchor="rm")
        d.line([x_left, y_top, x_left, y_bottom], fill="black")
        groups = list(results["fairness"][a][names[0]]["groups"]) if names else []
        slot = (x_right - x_left) / max(len(groups), 1)
        bar = slot * 0.7 / max(len(names), 1)
        to_y = lambda v: y_bottom - (y_bottom - y_top) * v / ymax
        for k, n in enumerate(names):  # whole-set score, dashed, behind the bars
            y = to_y(results["overall"][n]["score"])
            for xs in range(x_left, x_right, 14):
                d.line([xs, y, min(xs + 7, x_right), y], fill=COLORS[k % 3], width=2)
        for j, g in enumerate(groups):
            x = x_left + slot * j + slot * 0.15
            for k, n in enumerate(names):
                s = results["fairness"][a][n]["groups"][g]
                color = COLORS[k % 3]
                if s["small"]:  # pale: shown, but not part of the gap
                    color = tuple(c + (255 - c) * 2 // 3 for c in color)
                xb = x + k * bar
                d.rectangle([xb, to_y(s["score"]), xb + bar - 2, y_bottom], fill=color)
                d.text((xb + bar / 2, to_y(s["score"]) - 3), f"{s['score']:.1f}", fill="black", font=small, anchor="md")
            n_g = results["fairness"][a][names[0]]["groups"][g]["n"]
            star = "*" if results["fairness"][a][names[0]]["groups"][g]["small"] else ""
            d.text((x_left + slot * (j + 0.5), y_bottom + 6), f"{g}{star}", fill="black", font=font, anchor="ma")
            d.text((x_left + slot * (j + 0.5), y_bottom + 26), f"n={n_g}", fill=(90, 90, 90), font=small, anchor="ma")
    img.save(path)


def write_outputs(results, out_dir, title=""):
    """results.json (every number), results.md (the paper-style tables + per-group details) and
    groups.png (the chart) in out_dir."""
    md = [f"# {title or 'Evaluation'}\n", compare_markdown({title or "this run": results})]
    if results["fairness"]:
        md.append("## Per group\n" + groups_markdown(results))
    outputs.check(out_dir, RESULT_FILES, "evaluate.py")  # all three, before any is written
    outputs.write(out_dir, "results.json", lambda p: p.write_text(json.dumps(results, indent=1, allow_nan=False)),
                  "evaluate.py")
    outputs.write(out_dir, "results.md", lambda p: p.write_text("\n".join(md)), "evaluate.py")
    outputs.write(out_dir, "groups.png", lambda p: draw_groups_png(results, p, title), "evaluate.py")


# ----------------------------------------------------------------------------------------------
# The key of a predictions file: what produced it, so a resumed run reuses only its own predictions

MIB = 1 << 20
KEY_VERSION = 2  # 2: the images' content and the vision config beside a checkpoint file


def file_fingerprint(path):
    """"size:hash" of a file, the hash a SHA-256 of its first and last MiB. Content, not mtime: a
    copied or touched checkpoint keeps its fingerprint, a retrained one (same size, new numbers in
    the first and last tensors) gets a new one. Reads at most 2 MiB, so a 13 GB model costs
    milliseconds. A change confined to the middle of a large file goes unnoticed."""
    size = Path(path).stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        if size > MIB:
            f.seek(max(size - MIB, MIB))  # the last MiB, without re-reading the first
            h.update(f.read())
    return f"{size}:{h.hexdigest()[:20]}"


def _source(path, files):
    """{path, files: {name: fingerprint}} of one input: where it is and what it holds."""
    return {"path": str(Path(path).resolve()), "files": {Path(f).name: file_fingerprint(f) for f in files}}


def _llm_files(folder):
    return [folder / "config.json", *weight_files(folder)]


def _vision_files(path):
    # a checkpoint file and the open_clip_config.json beside it (its heads), or every weights file in
    # the folder (whichever one the loader picks)
    if path.is_file():
        return [path] + [c for c in [path.parent / "open_clip_config.json"] if c.is_file()]
    return sorted(f for f in path.iterdir() if f.is_file()
                  and (f.suffix in (".bin", ".safetensors", ".pt", ".pth") or f.name == "open_clip_config.json"))


def _adapter_files(folder):
    names = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    return [folder / n for n in names if (folder / n).is_file()]


def images_fingerprint(records):
    """One hash over every test image's content (file_fingerprint of each, with the record's id):
    images replaced at the same paths give another key."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r['id']}\t{file_fingerprint(r['image'])}\n".encode())
    return f"{len(records)} images:{h.hexdigest()[:20]}"


def predictions_key(args, llm, vision, projector, dtype, records):
    """What the predictions of a model run depend on (llm, vision: the resolved folders / files;
    records: the whole test set, whose images are fingerprinted by content). Leaves out what does
    not change them: the batch size (batched greedy decoding equals one prompt at a time), the
    device, --limit/--ids (a subset's predictions are those of the whole set), and the scoring
    flags. What it cannot see: a change confined to the middle of a file over 2 MiB (see
    file_fingerprint), and code: a new version of this project that generates differently."""
    test = Path(args.test_json)
    tokenizer = tokenizer_file(args.tokenizer or llm)
    return {
        "version": KEY_VERSION,
        "llm": _source(llm, _llm_files(llm)),
        "vision": _source(vision, _vision_files(vision)),
        "projector": _source(projector, [projector]) if projector else "random",
        "adapter": _source(args.adapter, _adapter_files(Path(args.adapter))) if args.adapter else None,
        "tokenizer": _source(tokenizer, [tokenizer]),
        "vision_heads": args.vision_heads,
        "max_new_tokens": args.max_new_tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "test_json": _source(test, [test]),
        "image_root": str(Path(args.image_root or test.parent).resolve()),
        "images": images_fingerprint(records),
        "dataset": args.dataset,
    }


def _differences(old, new):
    """The fields where two keys differ, e.g. ["adapter (weights)", "max_new_tokens (256 -> 4)"]."""
    def short(v):  # a file source by its kind, a setting by its value
        return "a file" if isinstance(v, dict) else clip(json.dumps(v), 30)

    out = []
    for field in sorted(old.keys() | new.keys()):
        a, b = old.get(field), new.get(field)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            contents = "contents" if field == "test_json" else "weights"
            parts = [name for name, k in (("path", "path"), (contents, "files")) if a.get(k) != b.get(k)]
            out.append(f"{field} ({', '.join(parts) or 'contents'})")
        else:
            out.append(f"{field} ({short(a)} -> {short(b)})")
    return out


RESULT_FILES = ("results.json", "results.md", "groups.png")  # written over only while they are evaluate.py's (outputs.py)


def claim_predictions(out_dir, key, overwrite=False, name="predictions"):
    """Make out_dir/NAME.jsonl safe to resume: its key (NAME_key.json, written before the first
    prediction) must equal `key`, else the run is refused. overwrite=True removes the old
    predictions and results and starts afresh. Returns the predictions file's path. NAME is
    "predictions", or a rank's own file under torchrun (shard_name)."""
    out_dir = Path(out_dir)
    preds, key_file = out_dir / f"{name}.jsonl", out_dir / f"{name}_key.json"
    fresh = "pass a new --out, or --overwrite to start afresh"
    if overwrite:  # only what evaluate.py can prove it wrote: predictions under its key, its own results
        if preds.exists() and not key_file.is_file():
            raise ValueError(f"--overwrite: {preds} has no {key_file.name} beside it, so it may not be evaluate.py's; "
                             f"move it away or pass a new --out")
        outputs.remove(out_dir, RESULT_FILES, "evaluate.py")
        preds.unlink(missing_ok=True)
    elif preds.exists():
        if not key_file.is_file():
            raise ValueError(f"{preds} holds predictions of unknown origin (no {key_file.name} beside it); {fresh}")
        try:
            old = json.loads(key_file.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError
        except ValueError:
            raise ValueError(f"{key_file}: unreadable, so the predictions beside it cannot be resumed; "
                             f"{fresh}") from None
        diff = _differences(old, key)
        if diff:
            raise ValueError(f"{preds} was made by another model or settings (differs in: {'; '.join(diff)}); {fresh}")
        return preds
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = key_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(key, indent=1))
    os.replace(tmp, key_file)  # a kill leaves the old key or the new one, never half of one
    return preds


# ----------------------------------------------------------------------------------------------
# Under torchrun: each rank generates its share of the test set into its own file; rank 0 merges

# How long a rank that has finished its share waits for the slowest one (torch's default is 10
# minutes on GPUs, less than an uneven resume can take). A rank that dies ends the job through
# torchrun, not through this timeout.
RANK_WAIT = timedelta(hours=24)


def wait_for_ranks(d, stage):
    """dist.barrier. A rank that stops (a refusal, a crash) prints its own error; the ranks waiting
    for it then end with one line saying so, not with a traceback each."""
    try:
        dist.barrier()
    except RuntimeError:  # gloo / nccl: the stopped rank's connection closed
        raise ValueError(f"rank {d.rank} of {d.world}: another rank stopped {stage}; its error says why") from None


def shard_name(rank, world):
    """The name of a rank's predictions file (and, + "_key", of its key). The world size is part of
    it: a run with another number of processes never reads or appends to these files."""
    return f"predictions.rank{rank}of{world}"


def _shard_files(out_dir):
    """The ranks' predictions files in out_dir that are provably evaluate.py's (their key beside
    them), whatever the world size, with their key files."""
    keys = Path(out_dir).glob("predictions.rank*of*_key.json")
    return [f for k in keys for f in (k, k.with_name(k.name.removesuffix("_key.json") + ".jsonl")) if f.exists()]


def claim_shard(out_dir, key, overwrite, d):
    """Make a rank's predictions file safe to resume -> (its path, the ids predictions.jsonl already
    holds, which no rank generates again). Rank 0 first claims predictions.jsonl exactly as one
    process would (same key, same refusals; --overwrite also clears the ranks' files of earlier
    runs); then each rank claims its own file under the key plus its rank and world size."""
    merged = Path(out_dir) / "predictions.jsonl"
    if d.master:
        if overwrite:
            for f in _shard_files(out_dir):
                f.unlink()
        claim_predictions(out_dir, key, overwrite)
        _resume(merged)  # cuts a line torn by a killed one-process run, before the other ranks read the file
    wait_for_ranks(d, "before generating")  # predictions.jsonl is claimed (or cleared) before any rank reads it
    done = set(_resume(merged))
    own = claim_predictions(out_dir, {**key, "shard": f"rank {d.rank} of {d.world}"}, name=shard_name(d.rank, d.world))
    return own, done


def merge_shards(out_dir, records, world):
    """Rank 0, once every rank has finished its share: predictions.jsonl gets the prediction of every
    record, in the order of the test set (after them, the lines of other ids it held, as they were),
    written whole and renamed into place; then the ranks' files, now held in it, are removed.
    -> the predictions of `records`, as generate_predictions returns them."""
    out_dir = Path(out_dir)
    merged = out_dir / "predictions.jsonl"
    rows = _resume(merged)
    shards = [out_dir / f"{shard_name(rank, world)}.jsonl" for rank in range(world)]
    for path in shards:
        for item_id, row in _resume(path).items():
            rows.setdefault(item_id, row)
    missing = [r["id"] for r in records if r["id"] not in rows]
    if missing:  # every rank wrote its share before the barrier: only a change to out_dir meanwhile
        raise ValueError(f"{out_dir}: {len(missing)} test records have no prediction in predictions.jsonl or "
                         f"{shard_name('*', world)}.jsonl after every rank finished, e.g. {missing[:3]}; "
                         f"was the folder changed during the run? Run the same command again to generate them")
    ids = {r["id"] for r in records}
    lines = [rows[r["id"]] for r in records] + [row for i, row in rows.items() if i not in ids]
    tmp = merged.with_name(merged.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines), encoding="utf-8")
    os.replace(tmp, merged)  # a kill leaves the old file and every rank's file, never half a merge
    for path in shards:
        path.unlink(missing_ok=True)
        path.with_name(path.stem + "_key.json").unlink(missing_ok=True)
    return [rows[r["id"]] for r in records]


# ----------------------------------------------------------------------------------------------
# --preflight: this evaluation's inputs, checked with preflight.py's table and rows


def preflight(args):
    """evaluate.py --preflight: the inputs of this evaluation, checked without running anything."""
    pf = Preflight()
    paths = preflight_paths(pf, {
        "--llm": (args.llm, "model"), "--vision": (args.vision, "model"), "--adapter": (args.adapter, "folder"),
        "--tokenizer": (args.tokenizer, "file or folder"), "--test-json": (args.test_json, "file"),
        "--image-root": (args.image_root, "folder"), "--predictions": (args.predictions, "file"),
        "--ids": (args.ids, "file"), "--probe-train-json": (args.probe_train_json, "file")}, required=("--test-json",))
    if args.predictions is None:
        projector = pf.check("path --projector", lambda: _projector_path(args))
        if projector is not None:
            paths["--projector"] = projector
        preflight_model(pf, paths, args.vision_heads or None)
    records = None
    if "--test-json" in paths:
        records = preflight_records(pf, "test json", args.test_json, args.dataset, args.image_root)
    if records is not None:
        attributes = tuple(args.attributes) if args.attributes else recorded_attributes(args.dataset)
        pf.check("group sizes", lambda: _group_sizes_row(records, args, attributes))
    else:
        pf.skip("group sizes", "needs the test json to pass")
    if args.probe_train_json and "--probe-train-json" in paths:
        preflight_records(pf, "probe train json", args.probe_train_json, args.dataset, args.image_root)
    preflight_out(pf, args.out)
    return pf.report("evaluate.py")


def _projector_path(args):
    path, note = _find_projector(args)
    if path is None:
        return note, None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return str(path) + (f" ({note})" if note else ""), path


def _group_sizes_row(records, args, attributes):
    chosen = select_records(records, args.ids, args.limit)
    check_group_sizes(chosen, attributes, args.min_group_size)
    return f"{len(chosen)} records scored; every attribute has >= 2 groups of >= {args.min_group_size}"


# ----------------------------------------------------------------------------------------------
# Command line


def load_model(llm, vision, projector=None, adapter=None, vision_heads=None, device="cpu", dtype=torch.float32):
    """Base LLM + vision tower + projector, with the PEFT adapter merged in (no LoRA cost at inference)."""
    model = load_llava(llm, vision, projector, dtype=dtype, device=device, vision_heads=vision_heads or None)
    if adapter:
        load_peft_adapter(model.llm, adapter)  # wraps with the adapter's own r / alpha / targets first
        model.llm.to(device)
        merge_lora(model.llm)
    return model.eval()


def _records_help():
    fields = "; ".join(f"{d}: " + ", ".join(f for f in (s["race"], s["age"], s["gender"]) if f)
                       for d, s in DATASETS.items())
    return f"""input files:
  --test-json   a JSON list of items, each with "id", "image" (a path relative to --image-root) and
                "conversations": [{{"from": "human", "value": question}}, {{"from": "gpt", "value":
                reference report}}] (PadChest items may give "FINDINGS" / "INDICATION" instead, HAM10000
                items "diagnosis"), and the demographics of --dataset:
                {fields}.
  --predictions JSONL, one object per line: an id ({' or '.join(f'"{k}"' for k in ID_KEYS)}) and the text
                ({', '.join(f'"{k}"' for k in PREDICTION_KEYS)}); other keys, "reference" included, are
                ignored: references always come from --test-json. Predictions of ids outside the
                scored subset (--ids, --limit) are ignored; ids not in --test-json are an error.
  --ids         one record id per line (blank lines skipped): score only these records.

subsets: --ids keeps the listed records, --limit N then keeps the first N of them (or of the whole
test set), in the order of --test-json.

resuming: a model run writes predictions_key.json (model, adapter, projector and tokenizer paths with a
fingerprint of their files, --max-new-tokens, --vision-heads, dtype, the test file) beside
predictions.jsonl and reuses the predictions already there only when the key is the same; otherwise
it stops and names what differs (--overwrite starts afresh).

torchrun --nproc_per_node=N evaluate.py ...: process r generates the records at positions r, r + N,
r + 2N, ... (from 0, after --ids and --limit) that predictions.jsonl does not hold yet, into
predictions.rank<r>of<N>.jsonl (keyed with its rank and N in predictions.rank<r>of<N>_key.json,
resumed like predictions.jsonl, never read by a run with another N); rank 0 then merges them into
predictions.jsonl in the order of the test set, removes them, and scores as one process does."""


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {clip(text, 20)!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


MODEL_FLAGS = ("llm", "vision", "projector", "adapter", "tokenizer", "random_projector", "overwrite",
               "probe_train_json")


def parse_args(argv=None):
    ap = OneLineParser(prog="evaluate.py", description="Generate reports and score them overall and per demographic group.",
                       epilog=_records_help(), formatter_class=HelpFormatter)
    g_data = ap.add_argument_group("data")
    g_model = ap.add_argument_group("model (omit with --predictions)")
    g_gen = ap.add_argument_group("generation")
    g_score = ap.add_argument_group("scoring")
    g_run = ap.add_argument_group("run and output")
    g_data.add_argument("--test-json", required=True, help="test set, LLaVA JSON with demographics (keys below)")
    g_data.add_argument("--dataset", default="mimic", choices=sorted(HEADLINE), help="format and metrics of the test set")
    g_data.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the JSON's)")
    g_data.add_argument("--ids", default=None, help="file of record ids, one per line: evaluate only these records")
    g_data.add_argument("--limit", type=_int_at_least(1), default=None,
                        help="evaluate only the first N test records (after --ids; default: all)")
    g_model.add_argument("--llm", help="language model folder or hub id (HF Llama layout)")
    g_model.add_argument("--vision", help="vision tower: open_clip checkpoint file or folder")
    g_model.add_argument("--vision-heads", type=_int_at_least(0), default=0, help="vision attention heads (0: width / 64)")
    g_model.add_argument("--projector", help="mm_projector.bin (or LLaVA-Rad's non_lora_trainables.bin); default: the "
                                             "one in the --adapter folder or beside it (train.py's layout)")
    g_model.add_argument("--random-projector", action="store_true",
                         help="run with an untrained, random projector on purpose (smoke tests: the reports are noise)")
    g_model.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder, merged into the LLM")
    g_model.add_argument("--tokenizer", default=None, help="tokenizer.json or tokenizer.model (SentencePiece), or their folder (default: the --llm folder)")
    g_gen.add_argument("--batch-size", type=_int_at_least(1), default=16, help="reports generated per batch")
    g_gen.add_argument("--max-new-tokens", type=_int_at_least(1), default=256,
                       help="generation length limit (official: 256)")
    g_gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="torch device (under torchrun a cuda device is each process's own, cuda:LOCAL_RANK)")
    g_gen.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="weights dtype on GPU (CPU: fp32)")
    g_score.add_argument("--predictions", default=None, help="score this JSONL file instead of running a model (keys below)")
    g_score.add_argument("--attributes", nargs="+", default=None, choices=tuple(ATTRIBUTES),
                         help="attributes to score (default: those the data set records)")
    g_score.add_argument("--min-group-size", type=_int_at_least(1), default=30,
                         help="smaller groups are flagged, left out of the gap")
    g_score.add_argument("--m-all", default="whole_set", choices=("whole_set", "group_mean"),
                         help="ES numerator: whole-set score (paper) or mean of group scores (official script)")
    g_score.add_argument("--n-resamples", type=_int_at_least(0), default=200,
                         help="bootstrap resamples for intervals (0: none)")
    g_score.add_argument("--seed", type=_int_at_least(0), default=0, help="bootstrap seed")
    g_score.add_argument("--probe-train-json", default=None,
                         help="also fit a linear attribute probe on h, trained on this JSON (model mode only)")
    g_score.add_argument("--probe-max-train", type=_int_at_least(1), default=1000, help="training records for the probe")
    g_run.add_argument("--out", required=True, help="output folder: predictions.jsonl, results.json/.md, groups.png")
    g_run.add_argument("--overwrite", action="store_true",
                       help="discard the predictions and results already in --out and start afresh")
    g_run.add_argument("--title", default="", help="title of the table and the chart")
    g_run.add_argument("--preflight", action="store_true",
                       help="check every input in seconds (paths, checkpoint keys and shapes from their headers, "
                            "tokenizer vs embedding, image size, the test JSON with its images decoded, group sizes, "
                            "--out writable) and print one table; exit 0 if the run would start, else 2")

    args = ap.parse_args(argv)
    flag = lambda name: "--" + name.replace("_", "-")
    if args.predictions is not None:
        # the file is scored as it is; a model flag beside it would be silently ignored
        given = [flag(n) for n in MODEL_FLAGS if getattr(args, n)]
        if given:
            ap.error(f"{', '.join(given)} cannot be combined with --predictions (it scores the file; no model runs)")
    elif not (args.llm and args.vision):
        ap.error("give --predictions FILE to score, or a model: --llm and --vision (+ --projector, --adapter)")
    if args.projector and args.random_projector:
        ap.error("--projector and --random-projector exclude each other")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (args.predictions or args.preflight):
        # torchrun shares out a model run's generation; scoring a file or checking inputs is one process's work
        ap.error(f"{'--predictions' if args.predictions else '--preflight'} runs in one process: start it with "
                 f"python, not torchrun")
    return args


def _find_projector(args):
    """(path or None, note) of the projector of a model run: --projector, else the one the adapter
    folder carries (LLaVA-Rad puts non_lora_trainables.bin in it, train.py mm_projector.bin beside
    it). Without one the projector is random and the reports are noise with plausible-looking
    scores, so that takes --random-projector. The note says which was picked, when not given."""
    if args.projector:
        return Path(args.projector), None
    if args.adapter:
        folder = Path(args.adapter)
        for p in (folder / "mm_projector.bin", folder / "non_lora_trainables.bin", folder.parent / "mm_projector.bin"):
            if p.is_file():
                return p, f"projector {p} (found with --adapter)"
    if args.random_projector:
        return None, "warning: random projector (--random-projector): the reports are noise"
    where = " (none in or beside the --adapter folder)" if args.adapter else ""
    raise ValueError(f"--projector is missing{where}: give the trained mm_projector.bin; an untrained projector "
                     f"gives meaningless reports (--random-projector allows it on purpose, for smoke tests)")


def _check_paths(args):
    """Missing inputs, refused before anything slow starts, each naming its flag."""
    files = {"--test-json": args.test_json, "--predictions": args.predictions, "--ids": args.ids,
             "--projector": args.projector, "--probe-train-json": args.probe_train_json}
    for name, path in files.items():
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {path}: {'not a file' if Path(path).exists() else 'no such file'}")
    folders = {"--image-root": args.image_root, "--adapter": args.adapter}
    for name, path in folders.items():
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"{name} {path}: {'not a folder' if Path(path).exists() else 'no such folder'}")
    blocker = nearest_existing(args.out)
    if not blocker.is_dir():
        raise ValueError(f"--out {args.out}: {'' if blocker == Path(args.out).absolute() else f'{blocker} '}is a file; "
                         "--out takes a folder (it will hold predictions.jsonl, results.json, results.md, groups.png)")


def _resolve(flag, path, patterns):
    """A local model path, or a hub id fetched with the files the loader reads."""
    try:
        return resolve_path(path, patterns)
    except FileNotFoundError as e:
        raise ValueError(f"{flag} {e}") from None


def _read_test(path, dataset, image_root, check_images):
    try:
        return read_llava_json(path, dataset, image_root, check_images=check_images)
    except json.JSONDecodeError as e:  # its message has a position but not the file
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         f"--test-json takes a JSON list of items") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; --test-json takes a JSON list of items") from None


def _read_ids(path):
    text = _decode(Path(path).read_bytes(), path)
    ids, seen = [], {}
    for n, line in enumerate(text.split("\n"), 1):
        item_id = line.strip()
        if not item_id:
            continue
        if item_id in seen:
            raise ValueError(f"{path} line {n}: id {clip(item_id, 40)!r} is listed twice "
                             f"(first on line {seen[item_id]})")
        seen[item_id] = n
        ids.append(item_id)
    if not ids:
        raise ValueError(f"{path}: no ids (--ids takes one record id per line)")
    return ids


def select_records(records, ids_file=None, limit=None):
    """The records to evaluate: those listed in ids_file, then the first `limit` of them, in the
    order of the test set."""
    if ids_file is not None:
        wanted = _read_ids(ids_file)
        known = {r["id"] for r in records}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise ValueError(f"{ids_file}: {len(unknown)} ids are not in the test set, e.g. "
                             f"{clip(', '.join(map(repr, unknown[:3])), 60)}")
        wanted = set(wanted)
        records = [r for r in records if r["id"] in wanted]
    return records[:limit] if limit else records


def check_group_sizes(records, attributes, min_group_size):
    """Refuse, before generating anything, an attribute with fewer than two groups big enough to
    compare (a subset or a small test set), naming the flags that fix it."""
    for a in attributes:
        sizes = Counter(group_names(records, a))
        if sum(n >= min_group_size for n in sizes.values()) < 2:
            raise ValueError(f"attribute {a!r}: fewer than two groups with at least {min_group_size} records "
                             f"(sizes {dict(sizes)}); lower --min-group-size or leave {a} out of --attributes")


def _score_file(args, records, all_ids):
    predictions = read_predictions(args.predictions)
    if not predictions:
        raise ValueError(f"--predictions {args.predictions}: no predictions in the file")
    # predictions of test records outside the chosen subset are not scored; unknown ids still fail
    keep = {r["id"] for r in records}
    return [p for p in predictions if p["id"] in keep or p["id"] not in all_ids]


def _load_for_run(args, out, all_records, d):
    """Check everything a model run needs, claim out/predictions.jsonl (under torchrun: and this
    rank's own file), then load the model: (model, tokenizer, the file this process appends to, the
    ids predictions.jsonl already holds under torchrun). Every refusal comes before the slow model load."""
    dtype = torch.bfloat16 if (args.device.startswith("cuda") and args.dtype == "bf16") else torch.float32
    projector, note = _find_projector(args)
    llm = _resolve("--llm", args.llm, ["*.json", "*.safetensors", "*.bin", "tokenizer*"])
    vision = _resolve("--vision", args.vision, ["*.json", "*.bin", "*.safetensors"])
    try:
        tokenizer = load_tokenizer(args.tokenizer or llm)  # cheap, and its errors say how to fix them
    except FileNotFoundError as e:
        raise ValueError(f"{'--tokenizer' if args.tokenizer else '--llm'} {e}") from None
    llm_cfg = read_llama_config(llm)
    check_tokenizer(args.tokenizer or llm, tokenizer, llm_cfg, llm_cfg.vocab_size)  # the embedding's rows
    max_positions = llm_cfg.max_position_embeddings
    if args.max_new_tokens >= max_positions:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the model holds {max_positions} positions "
                         f"(max_position_embeddings in {llm / 'config.json'}), prompt included")
    key = predictions_key(args, llm, vision, projector, dtype, all_records)
    if d.world > 1:
        preds_file, merged = claim_shard(out, key, args.overwrite, d)
    else:
        preds_file, merged = claim_predictions(out, key, args.overwrite), set()
    model = load_model(str(llm), str(vision), projector, args.adapter, args.vision_heads, args.device, dtype)
    if note and d.master:  # after the checks and the load, so a refusal stays the only line on stderr
        print(f"evaluate.py: {note}", file=sys.stderr)
    return model, tokenizer, preds_file, merged


def _run_model(args, records, attributes, out, all_records, d):
    """Generate (or resume) the predictions of `records`; -> (predictions, title, probe or None).
    Under torchrun rank r generates records[r::world] (less those predictions.jsonl already holds)
    into its own file; rank 0 merges them once every rank is done, and returns None elsewhere."""
    check_group_sizes(records, attributes, args.min_group_size)  # before hours of generation, not after
    model, tokenizer, preds_file, merged = _load_for_run(args, out, all_records, d)
    vc = model.vision_tower.config
    processor = ImageProcessor(size=vc.image_size, mean=vc.mean, std=vc.std)
    share = records if d.world == 1 else [r for r in records[d.rank::d.world] if r["id"] not in merged]
    desc = "generate" if d.world == 1 else f"generate (rank 0's share of {d.world})"  # one bar, rank 0's
    predictions = generate_predictions(model, tokenizer, share, processor, preds_file, args.batch_size,
                                       args.max_new_tokens, desc=desc, quiet=not d.master)
    if d.world > 1:
        wait_for_ranks(d, "while generating")  # every rank's share is on disk
        if not d.master:
            return None
        predictions = merge_shards(out, records, d.world)
    title = args.title or (Path(args.adapter).parent.name if args.adapter else Path(args.llm).name)
    probe = None
    if args.probe_train_json:
        train = _read_test(args.probe_train_json, args.dataset, args.image_root, check_images=True)
        layer, tokens = probe_pooling(args.adapter)
        probe = attribute_probe(model, tokenizer, processor, train, records, layer, tokens,
                                max_train=args.probe_max_train, attributes=attributes, batch_size=args.batch_size)
    return predictions, title, probe


def main(argv=None):
    """Evaluate as the flags say -> the results (None on the ranks other than 0 under torchrun)."""
    args = parse_args(argv)
    if args.preflight:
        sys.exit(preflight(args))
    # under torchrun (a model run: parse_args refuses the others) the process group, as train.py's
    d = setup_distributed(timeout=RANK_WAIT) if args.predictions is None else Dist()
    if dist.is_initialized() and args.device.startswith("cuda"):
        args.device = d.device  # each process its own GPU, cuda:LOCAL_RANK
    try:
        return _evaluate(args, d)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _evaluate(args, d):
    t0 = time.time()
    _check_paths(args)
    outputs.check(args.out, RESULT_FILES, "evaluate.py")  # before hours of generation, not after
    out = Path(args.out)
    all_records = _read_test(args.test_json, args.dataset, args.image_root, check_images=args.predictions is None)
    records = select_records(all_records, args.ids, args.limit)
    attributes = tuple(args.attributes) if args.attributes else recorded_attributes(args.dataset)
    probe = None
    if args.predictions is not None:
        predictions = _score_file(args, records, {r["id"] for r in all_records})
        match_predictions(predictions, records)  # a missing or unknown id is the first thing to fix
        check_group_sizes(records, attributes, args.min_group_size)
        title = args.title or Path(args.predictions).stem
    else:
        ran = _run_model(args, records, attributes, out, all_records, d)
        if ran is None:  # a rank other than 0 under torchrun: rank 0 merges its share and scores
            return None
        predictions, title, probe = ran
    results = score(predictions, records, attributes, args.dataset, args.n_resamples, args.seed,
                    args.min_group_size, args.m_all)
    if probe is not None:
        results["probe"] = probe
    write_outputs(results, out, title)
    print(compare_markdown({title: results}))
    print(f"wrote {out}/results.json, results.md, groups.png in {time.time() - t0:.1f}s")
    return results


def cli(argv=None):
    """main, with bad input ending as one line on stderr and exit status 1, not a traceback."""
    return command_line("evaluate.py", main, argv, status=1)


if __name__ == "__main__":
    cli()
