"""Tests for evaluate.py: batched and resumed generation, scores equal to metrics.py on the same
texts, bad input, the written outputs, both command-line modes, and the attribute probe."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
import metrics as M
from checkpoint import save_llama
from data import ImageProcessor, conversation_prompt, read_llava_json, tokenize_with_image
from lora import LoRAConfig, apply_lora, lora_layers, save_peft_adapter
from generate import generate
from model import LlamaConfig, tiny_llava
from synthetic import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
N = 36
REPORTS = [
    "The heart is mildly enlarged. No pleural effusion.",
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "Small left pleural effusion. Heart size is normal.",
    "There is a focal opacity in the right lower lobe, concerning for pneumonia.",
    "Left chest wall pacemaker with leads in standard position. The lungs are clear.",
    "Moderate cardiomegaly. There is a small right pneumothorax.",
]
RACES = ["white", "white", "white", "black", "black", "asian"]  # uneven group sizes on purpose


def _item(i):
    # gender alternates; age and race cycle with other periods so the groups cut across each other
    return {"id": f"r{i:02d}", "image": f"img/{i:02d}.png",
            "conversations": [{"from": "human", "value": "<image>\nProvide a description of the findings."},
                              {"from": "gpt", "value": REPORTS[i % len(REPORTS)]}],
            "race_major": RACES[i % 6], "anchor_age_group": (i // 2) % 3, "gender": "F" if i % 2 else "M"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A test set of N records whose images carry the gender (bright left half for F, right half
    for M), a small BPE tokenizer and a tiny random LLaVA sized to it."""
    root = tmp_path_factory.mktemp("bench")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    items = [_item(i) for i in range(N)]
    for i, it in enumerate(items):
        px = rng.normal(110, 25, (32, 32))
        half = slice(0, 16) if it["gender"] == "F" else slice(16, 32)
        px[:, half] += 90
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(root / it["image"])
    (root / "test.json").write_text(json.dumps(items))
    records = read_llava_json(root / "test.json")
    tok = train_tokenizer([conversation_prompt(r["question"], r["answer"]) for r in records], vocab_size=300)
    tok.save(str(root / "tokenizer.json"))
    model = tiny_llava(llm=LlamaConfig.tiny(vocab_size=tok.get_vocab_size())).eval()
    return dict(root=root, records=records, tok=tok, model=model, proc=ImageProcessor(size=32))


def _generate(bench, path, records=None, batch_size=4, max_new_tokens=6):
    return E.generate_predictions(bench["model"], bench["tok"], records or bench["records"], bench["proc"], path,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# -----------------------------------------------------------------------------
# generation


def test_batched_generation_equals_one_prompt_at_a_time(bench, tmp_path):
    recs = bench["records"][:7]
    batched = _generate(bench, tmp_path / "b.jsonl", recs, batch_size=4)
    single = _generate(bench, tmp_path / "s.jsonl", recs, batch_size=1)
    assert [p["id"] for p in batched] == [r["id"] for r in recs]  # returned in record order
    assert batched == single
    assert sorted(map(json.dumps, _lines(tmp_path / "b.jsonl"))) == sorted(map(json.dumps, batched))
    # the prompt is the "v1" conversation with the image sentinel, decoded without special tokens
    r = recs[3]
    prompt = tokenize_with_image(bench["tok"], conversation_prompt(r["question"]))
    ids = generate(bench["model"], [prompt], bench["proc"](Image.open(r["image"]))[None], max_new_tokens=6,
                   eos_token_id=bench["tok"].token_to_id("</s>"))[0]
    assert batched[3] == {"id": r["id"], "prediction": bench["tok"].decode(ids, skip_special_tokens=True).strip(),
                          "reference": r["answer"]}


def test_killed_run_continues_where_it_stopped(bench, tmp_path, monkeypatch):
    path = tmp_path / "preds.jsonl"
    recs = bench["records"][:10]
    fresh = _generate(bench, tmp_path / "fresh.jsonl", recs, batch_size=3)

    calls = {"n": 0}
    real_generate = E.generate

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run is killed
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(E, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _generate(bench, path, recs, batch_size=3)
    monkeypatch.setattr(E, "generate", real_generate)
    before = path.read_text()
    assert len(before.splitlines()) == 6  # two batches made it to disk
    with open(path, "a") as f:  # and the kill tore the next line in half
        f.write('{"id": "r09", "predic')

    # a limited run first: only ids not yet in the file are generated
    _generate(bench, path, recs[:8], batch_size=3)
    resumed = _generate(bench, path, recs, batch_size=3)
    text = path.read_text()
    assert text.startswith(before)  # nothing already there was rewritten or regenerated
    ids = [row["id"] for row in _lines(path)]
    assert sorted(ids) == sorted(r["id"] for r in recs)  # each id exactly once, the torn line is gone
    assert resumed == fresh


def test_existing_lines_are_not_generated_again(bench, tmp_path):
    path = tmp_path / "preds.jsonl"
    recs = bench["records"][:4]
    path.write_text(json.dumps({"id": recs[1]["id"], "prediction": "kept as it is", "reference": "x"}) + "\n")
    out = _generate(bench, path, recs)
    assert out[1]["prediction"] == "kept as it is"
    assert len(_lines(path)) == 4


# -----------------------------------------------------------------------------
# scoring


def _predictions(records, seed=0):
    """Predictions of mixed quality: copies, other reports, truncations; shuffled, as a file may be."""
    rng = random.Random(seed)
    preds = []
    for i, r in enumerate(records):
        kind = i % 4
        text = r["answer"] if kind == 0 else REPORTS[(i + 1) % len(REPORTS)] if kind == 1 else \
            r["answer"].split(".")[0] + "." if kind == 2 else "No acute cardiopulmonary process."
        preds.append({"id": r["id"], "prediction": text})
    rng.shuffle(preds)
    return preds


def test_score_equals_metrics_on_the_same_texts(bench):
    recs = bench["records"]
    preds = _predictions(recs)
    res = E.score(preds, recs, min_group_size=7, n_resamples=30)
    by_id = {p["id"]: p["prediction"] for p in preds}
    hyps, refs = [by_id[r["id"]] for r in recs], [r["answer"] for r in recs]
    f1 = M.chexpert_f1("micro")
    assert res["overall"]["BLEU-4"]["score"] == pytest.approx(M.corpus_bleu(hyps, refs, 4), abs=1e-9)
    assert res["overall"]["BLEU-1"]["score"] == pytest.approx(M.corpus_bleu(hyps, refs, 1), abs=1e-9)
    assert res["overall"]["ROUGE-L"]["score"] == pytest.approx(M.rouge_l(hyps, refs), abs=1e-9)
    assert res["overall"]["CheXpert-F1 (micro)"]["score"] == pytest.approx(f1(hyps, refs), abs=1e-9)
    assert 0 < res["overall"]["BLEU-4"]["score"] < 100

    # race: white 18, black 12, asian 6 records; asian is below min_group_size 7 -> flagged, not in the gap
    race = res["fairness"]["race"]
    for name, fn in (("BLEU-4", lambda h, r: M.corpus_bleu(h, r, 4)), ("CheXpert-F1 (micro)", f1)):
        groups = {}
        for g in ("white", "black", "asian"):
            idx = [i for i, r in enumerate(recs) if r["attrs"]["race"] == {"white": 0, "black": 1, "asian": 2}[g]]
            groups[g] = fn([hyps[i] for i in idx], [refs[i] for i in idx])
            assert race[name]["groups"][g]["score"] == pytest.approx(groups[g], abs=1e-9)
            assert race[name]["groups"][g]["n"] == len(idx)
        assert [race[name]["groups"][g]["small"] for g in ("white", "black", "asian")] == [False, False, True]
        gap = abs(groups["white"] - groups["black"])
        assert race[name]["gap"] == pytest.approx(gap, abs=1e-9)
        assert race[name]["es"] == pytest.approx(res["overall"][name]["score"] / (1 + gap), abs=1e-9)
        lo, hi = race[name]["ci"]["es"]
        assert lo <= hi
    # group names are the readable ones, every attribute has every metric
    assert set(res["fairness"]["gender"]["BLEU-1"]["groups"]) == {"M", "F"}
    assert set(res["fairness"]["age"]["BLEU-1"]["groups"]) == {"0-44", "45-65", "66+"}
    assert set(res["fairness"]["age"]) == set(res["overall"]) == set(M.report_metrics())
    json.dumps(res, allow_nan=False)  # JSON-serialisable, no NaN


def test_official_script_numerator_is_the_mean_of_the_groups(bench):
    recs = bench["records"]
    res = E.score(_predictions(recs), recs, attributes=("gender",), m_all="group_mean", min_group_size=1,
                  n_resamples=0)
    rep = res["fairness"]["gender"]["BLEU-4"]
    mean = np.mean([s["score"] for s in rep["groups"].values()])
    assert rep["m_all"] == pytest.approx(mean) and rep["es"] == pytest.approx(mean / (1 + rep["gap"]))
    assert rep["m_all"] != pytest.approx(res["overall"]["BLEU-4"]["score"])


def test_ham_scores_diagnoses():
    answers = ["This is a melanocytic nevus.", "Melanoma.", "Basal cell carcinoma.", "Melanoma."]
    preds = ["Melanocytic nevus.", "A nevus.", "Basal cell carcinoma.", "Melanoma."]
    recs = [{"id": str(i), "answer": a, "attrs": {"race": -1, "age": i % 2, "gender": i // 2}}
            for i, a in enumerate(answers)]
    pr = [{"id": str(i), "prediction": p} for i, p in enumerate(preds)]
    res = E.score(pr, recs, attributes=("age", "gender"), dataset="ham", min_group_size=1, n_resamples=0)
    assert res["overall"]["Accuracy"]["score"] == pytest.approx(75.0)
    assert res["fairness"]["gender"]["Accuracy"]["groups"] == {"M": {"score": 50.0, "n": 2, "small": False},
                                                               "F": {"score": 100.0, "n": 2, "small": False}}
    with pytest.raises(ValueError, match="'race' is missing .* 4 of 4 records.*no race"):
        E.score(pr, recs, dataset="ham", min_group_size=1, n_resamples=0)


def _drop_race(recs):
    out = [dict(r, attrs=dict(r["attrs"])) for r in recs]
    out[2]["attrs"]["race"] = -1
    del out[5]["attrs"]["race"]
    return out


BAD = {
    "count_mismatch": (lambda p, r: (p[:-1], r), r"35 predictions but 36 test records; 1 test records have no pred"),
    "unknown_id": (lambda p, r: (p[:-1] + [{"id": "zzz", "prediction": "x"}], r),
                   r"ids do not match the test set; 1 prediction ids are not in the test set, e.g. \['zzz'\]"),
    "duplicate_id": (lambda p, r: (p + [p[0]], r), r"more than one prediction"),
    "missing_group_label": (lambda p, r: (p, _drop_race(r)),
                            r"'race' is missing .* 2 of 36 records, e\.g\. \['r02', 'r05'\]"),
    "empty_test_set": (lambda p, r: ([], []), r"empty test set"),
    "no_predictions": (lambda p, r: ([], r), r"no predictions to score"),
    "unknown_attribute": (lambda p, r: (p, r), r"unknown attribute 'sex'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_what_is_wrong(bench, case):
    make, message = BAD[case]
    preds, recs = make(_predictions(bench["records"]), bench["records"])
    attributes = ("sex",) if case == "unknown_attribute" else ("race", "age", "gender")
    with pytest.raises(ValueError, match=message):
        E.score(preds, recs, attributes=attributes, n_resamples=0, min_group_size=1)


def test_unreadable_prediction_files_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n\n{"id": "b", "answer": "y"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl line 3: needs an id"):
        E.read_predictions(path)
    path.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", \n')
    with pytest.raises(ValueError, match=r"p\.jsonl line 2: not valid JSON"):
        E.read_predictions(path)


# -----------------------------------------------------------------------------
# outputs


def test_write_outputs_table_chart_and_json(bench, tmp_path):
    res = E.score(_predictions(bench["records"]), bench["records"], min_group_size=7, n_resamples=20)
    E.write_outputs(res, tmp_path, title="tiny run")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(res))
    md = (tmp_path / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method | ES-"))
    assert header.split(" | ")[1:4] == ["ES-BLEU1(R)", "ES-BLEU4(R)", "ES-F1(R)"]
    assert "ES-F1(G) |" in header and "Δ-BLEU4(A)" in md
    row = next(line for line in md.splitlines() if line.startswith("| tiny run | "))
    assert row.split(" | ")[1] == f"{res['fairness']['race']['BLEU-1']['es']:.2f}"
    assert "| asian* | 6 |" in md  # the small group is marked
    with Image.open(tmp_path / "groups.png") as im:
        im.load()
        assert im.format == "PNG" and im.width >= 800 and im.height >= 3 * 300
        colors = {tuple(c) for c in np.asarray(im).reshape(-1, 3)}
    assert E.COLORS[0] in colors and E.COLORS[1] in colors  # both metrics' bars are drawn


def test_compare_markdown_lays_methods_side_by_side(bench):
    recs = bench["records"]
    a = E.score(_predictions(recs, 0), recs, min_group_size=1, n_resamples=0)
    b = E.score([{"id": r["id"], "prediction": r["answer"]} for r in recs], recs, min_group_size=1, n_resamples=0)
    b["probe"] = {"race": {"accuracy": 61.0, "chance": 50.0, "n_classes": 3}}
    md = E.compare_markdown({"LoRA": a, "FairLLaVA": b})
    rows = [line for line in md.splitlines() if line.startswith("| FairLLaVA |")]
    assert len(rows) == 4  # ES, gaps, whole set, probe
    assert rows[0].split(" | ")[1] == "100.00"  # perfect predictions: no gap, ES = BLEU-1 = 100
    assert "| LoRA | – |" in md and "61.0 (50.0)" in md
    # the same numbers, flat, for averaging over seeds
    flat = E.headline(json.loads(json.dumps(b)))
    assert list(flat)[:3] == ["ES-BLEU1(R)", "ES-BLEU4(R)", "ES-F1(R)"] and len(flat) == 9 + 9 + 3 + 1
    assert flat["Δ-F1(G)"] == b["fairness"]["gender"]["CheXpert-F1 (micro)"]["gap"] == 0.0
    assert flat["BLEU-4"] == pytest.approx(100.0) and flat["probe race"] == 61.0


# -----------------------------------------------------------------------------
# command line


def test_scoring_only_command_line(bench, tmp_path):
    recs = bench["records"]
    preds = _predictions(recs)
    path = tmp_path / "official.jsonl"  # LLaVA's model_vqa field names
    path.write_text("".join(json.dumps({"question_id": p["id"], "text": p["prediction"]}) + "\n" for p in preds))
    res = E.main(["--predictions", str(path), "--test-json", str(bench["root"] / "test.json"), "--out",
                  str(tmp_path / "out"), "--min-group-size", "7", "--n-resamples", "10"])
    assert res == E.score(preds, recs, min_group_size=7, n_resamples=10)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "results.md", "groups.png", "outputs_record.json"}


def test_command_line_bad_input_is_one_clear_line(bench, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in _predictions(bench["records"])[:-3]))
    run = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--predictions", str(path), "--test-json",
                          str(bench["root"] / "test.json"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0
    assert run.stderr.strip().startswith("evaluate.py: error: 33 predictions but 36 test records")
    assert "Traceback" not in run.stderr


def test_model_command_line_with_adapter(bench, tmp_path):
    """Base + projector + PEFT adapter from disk, merged, gives the predictions of the in-memory
    LoRA model (unmerged); the results are written next to them."""
    model = tiny_llava(llm=bench["model"].llm.config, seed=1).eval()
    save_llama(model.llm, tmp_path / "llm")
    bench["tok"].save(str(tmp_path / "llm" / "tokenizer.json"))
    torch.save({f"visual.trunk.{k}": v for k, v in model.vision_tower.state_dict().items()}, tmp_path / "vit.bin")
    torch.save({f"model.mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()},
               tmp_path / "mm_projector.bin")
    apply_lora(model.llm, LoRAConfig.tiny())
    torch.manual_seed(0)
    for m in lora_layers(model.llm).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.5)  # a trained-looking adapter that changes the output
    save_peft_adapter(model.llm, tmp_path / "run" / "adapter")

    recs = bench["records"][:4]
    expected = E.generate_predictions(model, bench["tok"], recs, bench["proc"], tmp_path / "mem.jsonl",
                                      batch_size=2, max_new_tokens=4)
    res = E.main(["--llm", str(tmp_path / "llm"), "--vision", str(tmp_path / "vit.bin"), "--vision-heads", "2",
                  "--projector", str(tmp_path / "mm_projector.bin"), "--adapter", str(tmp_path / "run" / "adapter"),
                  "--test-json", str(bench["root"] / "test.json"), "--out", str(tmp_path / "out"), "--limit", "4",
                  "--batch-size", "2", "--max-new-tokens", "4", "--min-group-size", "1", "--n-resamples", "0",
                  "--device", "cpu"])
    assert E.read_predictions(tmp_path / "out" / "predictions.jsonl") == expected
    assert res["n"] == 4 and (tmp_path / "out" / "results.md").read_text().startswith("# run")


# -----------------------------------------------------------------------------
# attribute probe


def test_probe_reads_a_planted_attribute_and_skips_unknown_labels(bench):
    recs = [dict(r, attrs=dict(r["attrs"], race=-1)) for r in bench["records"]]  # race unknown everywhere
    recs[0]["attrs"]["age"] = -1
    train, test = recs[:24], recs[24:]
    out = E.attribute_probe(bench["model"], bench["tok"], bench["proc"], train, test, max_train=23)
    assert set(out) == {"age", "gender"}  # race has no known label: left out
    g = out["gender"]
    assert g["chance"] == pytest.approx(50.0) and g["n_classes"] == 2 and g["n_test"] == 12
    assert g["n_train"] == 23  # the max_train subset
    assert g["accuracy"] >= 90.0  # the image shows the gender, and h keeps it
    assert out["age"]["n_train"] <= 23 and out["age"]["chance"] == pytest.approx(100 * 4 / 12)


def test_the_probe_pools_as_the_run_recorded(tmp_path):
    from dataclasses import asdict

    import train
    from fairness import FairnessConfig
    assert E.probe_pooling(None) == ("mid", "image")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    cfg = train.TrainConfig(fair=FairnessConfig(layer=3, tokens="answer"))
    (run / "config.json").write_text(json.dumps(asdict(cfg)))
    assert E.probe_pooling(str(run / "adapter")) == (3, "answer")
    (run / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json"):
        E.probe_pooling(str(run / "adapter"))
