"""Bad input to evaluate.py ends as one clear line on stderr and a non-zero exit status, naming the
file, flag or field and what is allowed; or as correct behaviour. The worst case first: a run must
never resume predictions that another model or other settings wrote into the same --out.

The command line runs in-process through evaluate.cli (the function `python evaluate.py` calls), so
the file stays fast; one case kills a real process with SIGKILL."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
from checkpoint import save_llama
from data import conversation_prompt, read_llava_json
from lora import LoRAConfig, apply_lora, lora_layers, save_peft_adapter
from model import LlamaConfig, tiny_llava
from synthetic import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
N = 8
REPORTS = ["The heart is mildly enlarged. No pleural effusion.",
           "The lungs are clear. No pleural effusion or pneumothorax.",
           "Small left pleural effusion. Heart size is normal.",
           "Moderate cardiomegaly. There is a small right pneumothorax."]


def _item(i):
    return {"id": f"r{i}", "image": f"img/{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nProvide a description of the findings."},
                              {"from": "gpt", "value": REPORTS[i % len(REPORTS)]}],
            "race_major": ["white", "black"][i % 2], "anchor_age_group": i % 3, "gender": "FM"[(i // 2) % 2]}


def _save_adapter(model, seed, run):
    """A trained-looking adapter (B != 0, so it changes the output) in train.py's layout:
    run/adapter/ and run/mm_projector.bin beside it."""
    torch.manual_seed(seed)
    for m in lora_layers(model.llm).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.5)
    save_peft_adapter(model.llm, run / "adapter")
    torch.save({f"model.mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()},
               run / "mm_projector.bin")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A test set of N records, a tokenizer and a tiny base model on disk, and two adapters of it
    ("fair" and "lora") as train.py writes them."""
    root = tmp_path_factory.mktemp("bench")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    items = [_item(i) for i in range(N)]
    for it in items:
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / it["image"])
    (root / "test.json").write_text(json.dumps(items))
    records = read_llava_json(root / "test.json")
    tok = train_tokenizer([conversation_prompt(r["question"], r["answer"]) for r in records], vocab_size=300)
    model = tiny_llava(llm=LlamaConfig.tiny(vocab_size=tok.get_vocab_size()), seed=1).eval()
    save_llama(model.llm, root / "llm")
    tok.save(str(root / "llm" / "tokenizer.json"))
    torch.save({f"visual.trunk.{k}": v for k, v in model.vision_tower.state_dict().items()}, root / "vit.bin")
    apply_lora(model.llm, LoRAConfig.tiny())
    _save_adapter(model, 0, root / "fair")
    _save_adapter(model, 1, root / "lora")
    return dict(root=root, records=records)


def _model_args(bench, out, adapter="fair", *extra):
    root = bench["root"]
    args = ["--llm", str(root / "llm"), "--vision", str(root / "vit.bin"), "--vision-heads", "2",
            "--test-json", str(root / "test.json"), "--out", str(out), "--batch-size", "3",
            "--max-new-tokens", "4", "--min-group-size", "1", "--n-resamples", "0", "--device", "cpu"]
    if adapter:
        args += ["--adapter", str(root / adapter / "adapter")]
    return args + list(extra)


def _score_args(bench, predictions, out, *extra):
    return ["--predictions", str(predictions), "--test-json", str(bench["root"] / "test.json"), "--out", str(out),
            "--min-group-size", "1", "--n-resamples", "0", *extra]


def _good_predictions(bench, path):
    path.write_text("".join(json.dumps({"id": r["id"], "prediction": r["answer"]}) + "\n" for r in bench["records"]))
    return path


def refused(argv, capsys):
    """Run the command line; it must refuse: exit status != 0, one line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        E.cli(argv)
    err = capsys.readouterr().err
    assert e.value.code not in (0, None)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("evaluate.py: error: ") and "Traceback" not in err
    return lines[0]


def _preds(out):
    """The predictions file of a run, by id; each id must appear exactly once."""
    rows = [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicated predictions: {ids}"
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def fair_run(bench, tmp_path_factory):
    """An uninterrupted FairLLaVA run: the reference for resumed runs."""
    out = tmp_path_factory.mktemp("fair_run")
    res = E.cli(_model_args(bench, out))
    return dict(out=out, preds=_preds(out), results=res)


# -----------------------------------------------------------------------------
# 1. resuming is keyed on what made the predictions


def test_another_adapter_into_the_same_out_is_refused(bench, fair_run, tmp_path, capsys):
    out = tmp_path / "out"
    E.cli(_model_args(bench, out, "fair", "--limit", "4"))
    before = (out / "predictions.jsonl").read_text()
    line = refused(_model_args(bench, out, "lora"), capsys)
    assert "predictions.jsonl was made by another model or settings" in line
    assert "adapter (path, weights)" in line and "projector (path" in line
    assert "--out" in line and "--overwrite" in line
    assert (out / "predictions.jsonl").read_text() == before  # nothing touched


@pytest.mark.parametrize("flag, value, field", [("--max-new-tokens", "5", "max_new_tokens (4 -> 5)"),
                                                ("--vision-heads", "4", "vision_heads (2 -> 4)")])
def test_other_generation_settings_are_refused(bench, fair_run, tmp_path, capsys, flag, value, field):
    out = tmp_path / "out"
    E.cli(_model_args(bench, out, "fair", "--limit", "4"))
    args = _model_args(bench, out)
    args[args.index(flag) + 1] = value
    line = refused(args, capsys)
    assert field in line and "--overwrite" in line


def test_a_changed_adapter_file_at_the_same_path_is_refused(bench, tmp_path, capsys):
    import shutil
    shutil.copytree(bench["root"] / "fair", tmp_path / "run")
    args = _model_args(bench, tmp_path / "out", None, "--adapter", str(tmp_path / "run" / "adapter"), "--limit", "4")
    E.cli(args)
    shutil.copy(bench["root"] / "lora" / "adapter" / "adapter_model.safetensors", tmp_path / "run" / "adapter")
    line = refused(args, capsys)
    assert "adapter (weights)" in line and "path" not in line.split("differs in:")[1].split(";")[0]


def test_an_edited_test_file_is_refused(bench, tmp_path, capsys):
    items = [_item(i) for i in range(N)]
    (tmp_path / "test.json").write_text(json.dumps(items))
    args = _model_args(bench, tmp_path / "out", "fair", "--image-root", str(bench["root"]), "--limit", "4")
    args[args.index("--test-json") + 1] = str(tmp_path / "test.json")
    E.cli(args)
    items[0]["conversations"][0]["value"] += " Compare with the prior study."  # the prompt of r0 changes
    (tmp_path / "test.json").write_text(json.dumps(items))
    assert "differs in: test_json (contents)" in refused(args, capsys)


def test_overwrite_starts_afresh_with_the_other_model(bench, fair_run, tmp_path):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    E.cli(_model_args(bench, out, "fair"))
    res = E.cli(_model_args(bench, out, "lora", "--overwrite"))
    assert res == E.cli(_model_args(bench, fresh, "lora"))
    assert _preds(out) == _preds(fresh) != fair_run["preds"]
    assert json.loads((out / "predictions_key.json").read_text())["adapter"]["path"].endswith("lora/adapter")


def test_predictions_of_unknown_origin_are_refused(bench, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _good_predictions(bench, out / "predictions.jsonl")
    line = refused(_model_args(bench, out), capsys)
    assert "unknown origin (no predictions_key.json" in line and "--overwrite" in line


def test_an_unreadable_key_is_refused(bench, tmp_path, capsys):
    out = tmp_path / "out"
    E.cli(_model_args(bench, out, "fair", "--limit", "4"))
    (out / "predictions_key.json").write_text("{not json")
    line = refused(_model_args(bench, out), capsys)
    assert "predictions_key.json: unreadable" in line and "--overwrite" in line


TORN = {"mid_json": b'{"id": "r5", "predic',
        "mid_character": '{"id": "r5", "prediction": "caf\u00e9'.encode()[:-1],  # half of a UTF-8 character
        "complete_without_newline": b'{"id": "r5", "prediction": "not from this model"}'}


@pytest.mark.parametrize("torn", sorted(TORN))
def test_a_torn_last_line_is_regenerated_once(bench, fair_run, tmp_path, torn):
    out = tmp_path / "out"
    E.cli(_model_args(bench, out, "fair", "--limit", "5"))  # a run killed after five reports...
    with open(out / "predictions.jsonl", "ab") as f:  # ...in the middle of writing the sixth
        f.write(TORN[torn])
    res = E.cli(_model_args(bench, out))
    assert _preds(out) == fair_run["preds"]  # every record exactly once, as an uninterrupted run
    assert res == fair_run["results"]


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import evaluate as E
real, calls = E.generate, []
def generate(*a, **k):
    calls.append(1)
    if len(calls) == 2:  # the first batch is on disk; the second never gets there
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
E.generate = generate
E.cli({argv!r})
"""


def test_resume_after_kill_9_equals_an_uninterrupted_run(bench, fair_run, tmp_path):
    out = tmp_path / "out"
    argv = _model_args(bench, out)
    run = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT), argv=argv)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert len(_preds(out)) == 3  # one batch of three
    res = E.cli(argv)
    assert _preds(out) == fair_run["preds"] and res == fair_run["results"]


# -----------------------------------------------------------------------------
# 2. the projector


def test_no_projector_is_refused(bench, tmp_path, capsys):
    line = refused(_model_args(bench, tmp_path / "out", None), capsys)
    assert "--projector is missing" in line and "--random-projector" in line
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_an_adapter_without_a_projector_is_refused(bench, tmp_path, capsys):
    import shutil
    shutil.copytree(bench["root"] / "fair" / "adapter", tmp_path / "bare" / "adapter")
    args = _model_args(bench, tmp_path / "out", None, "--adapter", str(tmp_path / "bare" / "adapter"))
    line = refused(args, capsys)
    assert "--projector is missing (none in or beside the --adapter folder)" in line


def test_the_projector_beside_the_adapter_is_used(bench, fair_run, tmp_path, capsys):
    explicit = tmp_path / "explicit"
    E.cli(_model_args(bench, explicit, "fair", "--projector", str(bench["root"] / "fair" / "mm_projector.bin")))
    assert _preds(explicit) == fair_run["preds"]  # the fixture's run found the same projector itself
    E.cli(_model_args(bench, tmp_path / "again"))
    assert "fair/mm_projector.bin (found with --adapter)" in capsys.readouterr().err


def test_a_random_projector_takes_the_flag_and_says_so(bench, tmp_path, capsys):
    res = E.cli(_model_args(bench, tmp_path / "out", None, "--random-projector", "--limit", "4"))
    assert res["n"] == 4 and "warning: random projector" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "predictions_key.json").read_text())["projector"] == "random"


# -----------------------------------------------------------------------------
# 3.-7. flags, files and fields, each refusal naming what is wrong

FLAG_CASES = {  # extra arguments on a scoring run -> what the message must name
    "limit_negative": (["--limit", "-3"], ["--limit", "at least 1, got -3"]),
    "limit_zero": (["--limit", "0"], ["--limit", "at least 1"]),
    "limit_not_a_number": (["--limit", "all"], ["--limit", "expected an integer"]),
    "batch_size_zero": (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    "max_new_tokens_zero": (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    "n_resamples_negative": (["--n-resamples", "-1"], ["--n-resamples", "at least 0"]),
    "min_group_size_zero": (["--min-group-size", "0"], ["--min-group-size"]),
    "unknown_dataset": (["--dataset", "chexpert"], ["--dataset", "invalid choice"]),
    "llm_with_predictions": (["--llm", "x"], ["--llm", "cannot be combined with --predictions"]),
    "adapter_and_overwrite_with_predictions": (["--adapter", "a", "--overwrite"],
                                               ["--adapter, --overwrite cannot be combined with --predictions"]),
    "probe_with_predictions": (["--probe-train-json", "t.json"], ["--probe-train-json", "--predictions"]),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags_are_refused_naming_the_flag(bench, tmp_path, capsys, case):
    extra, needles = FLAG_CASES[case]
    preds = _good_predictions(bench, tmp_path / "p.jsonl")
    line = refused(_score_args(bench, preds, tmp_path / "out", *extra), capsys)
    for needle in needles:
        assert needle in line


def test_no_model_and_no_predictions(bench, tmp_path, capsys):
    line = refused(["--test-json", str(bench["root"] / "test.json"), "--out", str(tmp_path / "o")], capsys)
    assert "--predictions" in line and "--llm" in line


def test_projector_and_random_projector_exclude_each_other(bench, tmp_path, capsys):
    args = _model_args(bench, tmp_path / "o", "fair", "--projector", "p.bin", "--random-projector")
    assert "--projector and --random-projector" in refused(args, capsys)


BIG = "x" * 300_000  # a file that must never be echoed whole
PREDICTION_FILES = {  # predictions file content -> what the message must say
    "json_array_one_line": (json.dumps([{"id": f"r{i}", "prediction": BIG} for i in range(N)]),
                            "p.jsonl line 1: expected one JSON object per line (JSONL), got a JSON array"),
    "json_array_pretty": (json.dumps([{"id": "r0", "prediction": BIG}], indent=2),
                          "p.jsonl line 1: expected one JSON object per line (JSONL), got a JSON array"),
    "malformed_line": ('{"id": "r0", "prediction": "a"}\n{"id": "r1", "prediction": "a"}\n{"id": "r2", ' + BIG,
                       "p.jsonl line 3: not valid JSON"),
    "a_string_per_line": ('"r0 no acute process"\n', "p.jsonl line 1: expected one JSON object per line (JSONL), "
                                                     "got a JSON str"),
    "missing_keys": (json.dumps({"id": "r0", "answer": "a", BIG: 1}) + "\n", "p.jsonl line 1: needs an id"),
    "prediction_not_a_string": (json.dumps({"id": "r0", "prediction": ["a"] * 100_000}) + "\n",
                                "p.jsonl line 1: field 'prediction' must be a string"),
    "id_not_a_string": (json.dumps({"id": {"x": 1}, "prediction": "a"}) + "\n",
                        "p.jsonl line 1: field 'id' must be a string or an integer"),
    "empty_file": ("\n\n", "--predictions"),
}


@pytest.mark.parametrize("case", sorted(PREDICTION_FILES))
def test_unreadable_prediction_files_name_file_and_line(bench, tmp_path, capsys, case):
    text, needle = PREDICTION_FILES[case]
    (tmp_path / "p.jsonl").write_text(text)
    line = refused(_score_args(bench, tmp_path / "p.jsonl", tmp_path / "out"), capsys)
    assert needle in line and str(tmp_path / "p.jsonl") in line
    assert len(line) < 300  # the content is quoted, if at all, in a few dozen characters


def test_non_utf8_predictions(bench, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert f"{tmp_path / 'p.jsonl'}: not UTF-8 text" in refused(_score_args(bench, tmp_path / "p.jsonl",
                                                                             tmp_path / "out"), capsys)


def test_a_json_array_from_the_real_command_line(bench, tmp_path):
    """The same refusal through `python evaluate.py`, the way users run it."""
    (tmp_path / "p.jsonl").write_text(PREDICTION_FILES["json_array_one_line"][0])
    run = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *_score_args(bench, tmp_path / "p.jsonl",
                                                                                  tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and len(run.stderr) < 300
    assert "got a JSON array" in run.stderr


def test_out_is_an_existing_file(bench, tmp_path, capsys):
    (tmp_path / "taken").write_text("something else")
    line = refused(_score_args(bench, _good_predictions(bench, tmp_path / "p.jsonl"), tmp_path / "taken"), capsys)
    assert f"--out {tmp_path / 'taken'}: is a file" in line
    assert (tmp_path / "taken").read_text() == "something else"


MISSING = {  # the flag whose path does not exist -> what the message must say
    "--test-json": "--test-json {}: no such file",
    "--image-root": "--image-root {}: no such folder",
    "--predictions": "--predictions {}: no such file",
    "--ids": "--ids {}: no such file",
}


@pytest.mark.parametrize("flag", sorted(MISSING))
def test_missing_files_name_the_flag(bench, tmp_path, capsys, flag):
    args = _score_args(bench, _good_predictions(bench, tmp_path / "p.jsonl"), tmp_path / "out")
    missing = str(tmp_path / "nowhere")
    if flag in args:
        args[args.index(flag) + 1] = missing
    else:
        args += [flag, missing]
    assert MISSING[flag].format(missing) in refused(args, capsys)


@pytest.mark.parametrize("flag", ["--llm", "--vision", "--projector", "--adapter", "--tokenizer", "--probe-train-json"])
def test_missing_model_files_name_the_path(bench, tmp_path, capsys, flag):
    args = _model_args(bench, tmp_path / "out", "fair", "--projector", str(bench["root"] / "fair" / "mm_projector.bin"))
    missing = str(tmp_path / "nowhere" / "model")
    if flag in args:
        args[args.index(flag) + 1] = missing
    else:
        args += [flag, missing]
    line = refused(args, capsys)
    assert f"{flag} {missing}" in line
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_a_tokenizer_folder_without_tokenizer_json(bench, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"sentencepiece")
    line = refused(_model_args(bench, tmp_path / "out", "fair", "--tokenizer", str(tmp_path / "tok")), capsys)
    assert f"{tmp_path / 'tok' / 'tokenizer.model'}: not a readable SentencePiece model" in line


def test_a_jsonl_test_file(bench, tmp_path, capsys):
    lines = [json.dumps(_item(i)) for i in range(N)]
    (tmp_path / "test.jsonl").write_text("\n".join(lines))
    args = _score_args(bench, _good_predictions(bench, tmp_path / "p.jsonl"), tmp_path / "out")
    args[args.index("--test-json") + 1] = str(tmp_path / "test.jsonl")
    line = refused(args + ["--image-root", str(bench["root"])], capsys)
    assert f"{tmp_path / 'test.jsonl'}: not valid JSON" in line and "JSON list" in line


def test_a_test_record_without_its_demographics(bench, tmp_path, capsys):
    items = [_item(i) for i in range(N)]
    del items[3]["gender"]
    (tmp_path / "test.json").write_text(json.dumps(items))
    args = _score_args(bench, _good_predictions(bench, tmp_path / "p.jsonl"), tmp_path / "out",
                       "--image-root", str(bench["root"]))
    args[args.index("--test-json") + 1] = str(tmp_path / "test.json")
    assert "item 'r3': field 'gender': missing" in refused(args, capsys)


def test_predictions_that_miss_records(bench, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "prediction": "x"}) + "\n" for r in bench["records"][:-2]))
    assert "6 predictions but 8 test records" in refused(_score_args(bench, tmp_path / "p.jsonl", tmp_path / "o"),
                                                         capsys)


# -----------------------------------------------------------------------------
# 6. subsets: --ids and --limit; the group-size hint names the flag


def _score_subset(bench, records):
    preds = [{"id": r["id"], "prediction": REPORTS[0]} for r in records]
    return E.score(preds, records, n_resamples=0, min_group_size=1)


def test_ids_and_limit_score_a_subset(bench, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": r["id"], "prediction": REPORTS[0]}) + "\n" for r in bench["records"]))
    (tmp_path / "ids.txt").write_text("r6\n\nr1\nr2\nr5 \n")
    recs = {r["id"]: r for r in bench["records"]}
    res = E.cli(_score_args(bench, preds, tmp_path / "a", "--ids", str(tmp_path / "ids.txt")))
    assert res == _score_subset(bench, [recs[i] for i in ("r1", "r2", "r5", "r6")])  # test-file order
    res = E.cli(_score_args(bench, preds, tmp_path / "b", "--ids", str(tmp_path / "ids.txt"), "--limit", "3"))
    assert res == _score_subset(bench, [recs[i] for i in ("r1", "r2", "r5")])
    res = E.cli(_score_args(bench, preds, tmp_path / "c", "--limit", "6"))
    assert res == _score_subset(bench, bench["records"][:6])


IDS_FILES = {
    "unknown_id": ("r1\nr99\nr2\n", "1 ids are not in the test set, e.g. 'r99'"),
    "duplicate_id": ("r1\nr2\nr1\n", "line 3: id 'r1' is listed twice (first on line 1)"),
    "empty": ("\n \n", "no ids (--ids takes one record id per line)"),
}


@pytest.mark.parametrize("case", sorted(IDS_FILES))
def test_bad_ids_files(bench, tmp_path, capsys, case):
    text, needle = IDS_FILES[case]
    (tmp_path / "ids.txt").write_text(text)
    args = _score_args(bench, _good_predictions(bench, tmp_path / "p.jsonl"), tmp_path / "o",
                       "--ids", str(tmp_path / "ids.txt"))
    line = refused(args, capsys)
    assert str(tmp_path / "ids.txt") in line and needle in line


def test_a_subset_too_small_for_its_groups_names_the_flag(bench, tmp_path, capsys):
    args = _score_args(bench, _good_predictions(bench, tmp_path / "p.jsonl"), tmp_path / "o", "--limit", "3")
    args[args.index("--min-group-size") + 1] = "2"
    line = refused(args, capsys)
    assert "attribute 'race': fewer than two groups with at least 2 records" in line
    assert "lower --min-group-size or leave race out of --attributes" in line and "min_group_size" not in line


def test_help_lists_the_keys_of_the_input_files(capsys):
    with pytest.raises(SystemExit) as e:
        E.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in ('"question_id"', '"prediction"', '"text"', '"conversations"', "race_major", "anchor_age_group",
                "--ids", "--overwrite", "--random-projector", "predictions_key.json"):
        assert key in text
