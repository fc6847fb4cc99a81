"""Bad input to train.py and data.py ends as one line naming the file, flag or field (exit code not
0), or as correct behaviour: flags, --out and --resume, truncated images and checkpoints, text the
tokenizer cannot represent, malformed JSON and CSV, --help."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import config
import train
from train_env import make_env, train_config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("bad_input"))


def run_config(env, out, **kw):
    return train_config(env, out, **{"max_steps": 2, **kw})


def argv(env, out, *extra, **kw):
    return config.to_argv(run_config(env, out, **kw)) + list(extra)


def refusal(main, args, capsys):
    """Run a command-line main that must refuse -> its one-line message (exit status checked)."""
    with pytest.raises(SystemExit) as e:
        main(args)
    code, err = e.value.code, capsys.readouterr().err
    message, status = (code, 1) if isinstance(code, str) else (err.strip(), code)
    assert status not in (0, None), message
    assert len(message.strip().splitlines()) == 1, message
    assert "Traceback" not in message and len(message) < 600, message
    return message


def log_steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def copy_data(env, tmp_path, edit=None):
    """A copy of the training JSON (images stay where they are) with edit(items) applied."""
    items = json.loads((env / "data" / "train.json").read_text())
    for it in items:
        it["image"] = str(env / "data" / it["image"])
    if edit:
        edit(items)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(items))
    return path


# ----------------------------------------------------------------------------------------------
# flags: one line naming the flag, exit code 2 (several of these were refused before; they stay so)

BAD_FLAGS = [
    (["--max-steps", "-5"], "--max-steps"), (["--epochs", "0"], "--epochs"), (["--stage", "3"], "--stage"),
    (["--lambdas", "religion=1"], "--lambdas"), (["--lambdas", "race=-0.5"], "--lambdas"),
    (["--batch-size", "0"], "--batch-size"), (["--grad-accum", "0"], "--grad-accum"),
    (["--dataset", "ham10000"], "--dataset"), (["--method", "adversarial"], "--method"),
    (["--tokens", "everything"], "--tokens"), (["--balance-on", "religion"], "--balance-on"),
    (["--dtype", "fp16"], "--dtype"), (["--overwrite", "--resume"], "--overwrite"),
]


@pytest.mark.parametrize("args, flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it(args, flag, capsys):
    message = refusal(train.main, args, capsys)
    assert message.startswith("train.py: error:") and flag in message


def test_help_lists_real_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--dataset {ham,mimic,padchest}" in text and "ham10000" not in text.lower().replace("ham: ham10000", "")
    assert "default: race=0.2 age=0.6 gender=0.1" in text and "default: None" not in text
    assert "(default: the --llm folder)" in text and "(default: )" not in text
    assert "--method {lora,resample,reweight,fairllava}" in text and "--tokens {image,answer,all}" in text


def test_train_json_is_required(capsys):
    message = refusal(train.main, ["--out", "unused"], capsys)
    assert "--train-json is required" in message


# ----------------------------------------------------------------------------------------------
# --out and --resume


def test_resume_with_changed_flags_is_refused_naming_each(env, tmp_path, capsys):
    out = tmp_path / "r"
    train.main(argv(env, out))
    before = (out / "config.json").read_text()
    message = refusal(train.main, argv(env, out, resume=True, lr=5e-2, max_steps=40), capsys)
    assert "--lr 0.05 does not match the checkpoint's 0.001" in message
    assert "--max-steps 40 does not match the checkpoint's 2" in message and "checkpoint.pt" in message
    assert (out / "config.json").read_text() == before  # never claims a setting that was not used
    assert json.loads(before)["lr"] == 1e-3


def test_resume_may_change_bookkeeping_flags(env, tmp_path):
    out = tmp_path / "b"
    train.main(argv(env, out, max_steps=3, save_every=1, stop_after=1))
    train.main(argv(env, out, max_steps=3, save_every=2, log_every=5, num_workers=0, resume=True))
    assert log_steps(out) == [1, 2, 3] and json.loads((out / "config.json").read_text())["save_every"] == 2


def test_fresh_run_into_a_used_out_is_refused(env, tmp_path, capsys):
    out = tmp_path / "used"
    train.main(argv(env, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    message = refusal(train.main, argv(env, out, lr=2e-3), capsys)
    assert f"--out {out} is not empty" in message and "--overwrite" in message and "--resume" in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_overwrite_clears_the_old_run(env, tmp_path):
    out = tmp_path / "o"
    train.main(argv(env, out, max_steps=3))
    train.main(argv(env, out, "--overwrite", max_steps=2, lr=2e-3))
    assert log_steps(out) == [1, 2] and json.loads((out / "config.json").read_text())["lr"] == 2e-3


def test_overwrite_never_deletes_files_train_did_not_write(env, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    message = refusal(train.main, argv(env, out, "--overwrite"), capsys)
    assert "--overwrite" in message and "notes.txt" in message
    assert (out / "notes.txt").read_text() == "keep me"


def test_killed_run_resumes_exactly_with_each_step_logged_once(env, tmp_path):
    """A kill after step 5 with the last checkpoint at step 4 (and half a line written): the resumed
    logs have each step once, and losses and final weights equal the uninterrupted run's bit for bit."""
    kw = dict(method="fairllava", max_steps=6, lora_dropout=0.1, grad_accum=2, save_every=2,
              monitor_json=str(env / "data" / "val.json"), monitor_every=1)
    train.train(run_config(env, tmp_path / "full", **kw), quiet=True)
    part = run_config(env, tmp_path / "part", stop_after=5, **kw)
    train.train(part, quiet=True)
    with open(tmp_path / "part" / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the kill came in the middle of a write
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"] == 4
    train.train(replace(part, stop_after=0, resume=True), quiet=True)
    full, resumed = ([json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
                     for d in ("full", "part"))
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5, 6]
    assert [x["loss"] for x in resumed] == [x["loss"] for x in full]
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["trainable"] for d in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monitor = [json.loads(x)["step"] for x in (tmp_path / "part" / "monitor.jsonl").read_text().splitlines()]
    assert monitor == [0, 1, 2, 3, 4, 5, 6]


def test_resume_with_a_log_that_is_not_json_lines(env, tmp_path, capsys):
    out = tmp_path / "j"
    train.main(argv(env, out, max_steps=2, save_every=1, stop_after=1))
    (out / "log.jsonl").write_text(json.dumps([{"step": 1, "loss": 0.5}] * 5000, indent=1))  # a JSON array
    message = refusal(train.main, argv(env, out, max_steps=2, save_every=1, resume=True), capsys)
    assert f"{out / 'log.jsonl'} line 1" in message and "one JSON object per line" in message


def test_truncated_checkpoint_is_one_line_naming_it(env, tmp_path, capsys):
    out = tmp_path / "t"
    train.main(argv(env, out))
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    message = refusal(train.main, argv(env, out, resume=True), capsys)
    assert f"--resume {ckpt}" in message and "truncated" in message


@pytest.mark.parametrize("spoil", ["truncated_safetensors", "bad_config_json"])
def test_bad_adapter_is_one_line_naming_the_file(env, tmp_path, capsys, spoil):
    out = tmp_path / "a"
    train.main(argv(env, out, max_steps=1))
    adapter = out / "adapter"
    if spoil == "truncated_safetensors":
        bad = adapter / "adapter_model.safetensors"
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad = adapter / "adapter_config.json"
        bad.write_text(bad.read_text()[:-20])
    message = refusal(train.main, argv(env, tmp_path / "b", adapter=str(adapter)), capsys)
    assert str(bad) in message
    if spoil == "bad_config_json":
        assert "line" in message and "column" in message


# ----------------------------------------------------------------------------------------------
# images: a truncated file passes the header check; --decode catches it, training saves and names it


def truncate_image(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-1500])


def test_check_decode_finds_a_truncated_png(env, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    truncate_image(bad)
    path = copy_data(env, tmp_path, lambda items: items[3].update(image=str(bad)))
    data.main(["--check", str(path)])  # the header is fine: the plain check passes
    message = refusal(data.main, ["--check", str(path), "--decode"], capsys)
    assert str(bad) in message and "field 'image'" in message and items_id(path, 3) in message


def items_id(path, n):
    return json.loads(Path(path).read_text())[n]["id"]


def test_truncated_image_mid_run_saves_the_steps_done(env, tmp_path, capsys):
    """The image is in the third batch: steps 1-2 are saved, the error names the file, and once
    the file is fixed --resume finishes the run."""
    cfg = run_config(env, tmp_path / "run", max_steps=4)
    order = train.epoch_batches(cfg, list(range(24)), train.Dist(), 0)
    victim = order[2][0]
    bad = tmp_path / "bad.png"
    truncate_image(bad)
    path = copy_data(env, tmp_path, lambda items: items[victim].update(image=str(bad)))
    message = refusal(train.main, argv(env, tmp_path / "run", max_steps=4, train_json=str(path)), capsys)
    assert str(bad) in message and "steps 1-2" in message and "--resume" in message
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert log_steps(tmp_path / "run") == [1, 2]
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(bad)
    train.main(argv(env, tmp_path / "run", max_steps=4, train_json=str(path), resume=True))
    assert log_steps(tmp_path / "run") == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# text the tokenizer changes silently: counted in one line, or refused with --strict-text


def foreign_text(items):
    items[5]["conversations"][1]["value"] = "Heart size is normal. 心脏大小正常 😀 Épanchement."


@pytest.mark.parametrize("case", ["unk", "cut"])
def test_lossy_text_is_counted_or_refused(env, tmp_path, capsys, case):
    path = copy_data(env, tmp_path, foreign_text if case == "unk" else None)
    kw = dict(train_json=str(path), max_steps=1, max_length=256 if case == "unk" else 60)
    train.main(argv(env, tmp_path / "counted", **kw))
    err = capsys.readouterr().err
    expected = "1 of 24 reports have <unk> tokens" if case == "unk" else "of 24 reports were cut at --max-length 60"
    assert expected in err and "(first: id " in err
    message = refusal(train.main, argv(env, tmp_path / "strict", "--strict-text", **kw), capsys)
    assert "--strict-text" in message and expected in message
    if case == "unk":
        assert items_id(path, 5) in message


# ----------------------------------------------------------------------------------------------
# malformed JSON: the file, line and column; JSON Lines where a JSON list is expected; short echoes


@pytest.mark.parametrize("case, expected", [
    ("malformed", "line 3 column"), ("json_lines", "looks like JSON Lines"),
    ("object", "expected a JSON list of items, got a JSON dict"), ("huge_value", "unknown race")])
def test_bad_training_json_is_one_line_naming_the_file(env, tmp_path, capsys, case, expected):
    items = json.loads((env / "data" / "train.json").read_text())
    path = tmp_path / "train.json"
    if case == "malformed":
        path.write_text('[\n{"id": "a",\n "image": oops}\n]')
    elif case == "json_lines":
        path.write_text("\n".join(json.dumps(it) for it in items * 200))
    elif case == "object":
        path.write_text(json.dumps({"data": items}))
    else:
        items[0]["race_major"] = "x" * 200_000
        path.write_text(json.dumps(items))
    message = refusal(train.main, argv(env, tmp_path / "o", train_json=str(path)), capsys)
    assert str(path) in message and expected in message
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_monitor_json_errors_name_their_file(env, tmp_path, capsys):
    bad = tmp_path / "val.json"
    bad.write_text("[{]")
    message = refusal(train.main, argv(env, tmp_path / "m", monitor_json=str(bad)), capsys)
    assert str(bad) in message and "line 1 column 3" in message


# ----------------------------------------------------------------------------------------------
# CSV conversion


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("dataset, row, missing", [
    ("mimic", dict(dicom_id="d1", findings="Clear.", age="52", sex="F"), "ViewPosition"),
    ("ham", dict(image="ISIC_1", diagnosis="mel", age="45", sex="male"), "image_id"),
    ("padchest", dict(ImageID="p.png", FINDINGS="Normal.", sex="F"), "gender or PatientSex_DICOM")])
def test_convert_with_wrong_columns_names_them(tmp_path, capsys, dataset, row, missing):
    write_csv(tmp_path / "in.csv", [row])
    message = refusal(data.main, ["--convert", dataset, str(tmp_path / "in.csv"), str(tmp_path / "out.json")], capsys)
    assert str(tmp_path / "in.csv") in message and "missing column" in message and missing in message
    assert not (tmp_path / "out.json").exists()


def test_convert_with_no_usable_row_is_refused(tmp_path, capsys):
    write_csv(tmp_path / "ham.csv", [dict(lesion_id="L1", image_id="ISIC_1", dx="mel", age="", sex="unknown")])
    message = refusal(data.main, ["--convert", "ham", str(tmp_path / "ham.csv"), str(tmp_path / "ham.json")], capsys)
    assert "none of its 1 rows is usable (dropped: demographics 1)" in message
    assert not (tmp_path / "ham.json").exists()


def test_check_of_a_missing_file_is_one_line(tmp_path, capsys):
    message = refusal(data.main, ["--check", str(tmp_path / "nope.json")], capsys)
    assert str(tmp_path / "nope.json") in message


@pytest.mark.parametrize("text", ["{\"hidden_size\": 64,", "[1, 2]"])
def test_bad_llm_config_json_is_one_line_naming_it(env, tmp_path, capsys, text):
    import shutil
    llm = tmp_path / "llm"
    shutil.copytree(env / "llm", llm)
    (llm / "config.json").write_text(text)
    message = refusal(train.main, argv(env, tmp_path / "out", llm=str(llm)), capsys)
    assert str(llm / "config.json") in message


def test_corrupt_tokenizer_json_is_one_line_naming_it(env, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE"')
    message = refusal(train.main, argv(env, tmp_path / "out", tokenizer=str(bad)), capsys)
    assert str(bad) in message and "tokenizers file" in message


# ----------------------------------------------------------------------------------------------
# nothing of the user's is lost: inputs inside --out, a conversion over its own input


def test_overwrite_never_deletes_an_input_of_the_same_run(env, tmp_path, capsys):
    """--projector S1/mm_projector.bin --out S1 --overwrite would delete the projector it was given."""
    s1 = tmp_path / "s1"
    train.main(argv(env, s1, stage=1))
    before = (s1 / "mm_projector.bin").read_bytes()
    for extra in (["--overwrite"], []):
        message = refusal(train.main, argv(env, s1, *extra, stage=2, projector=str(s1 / "mm_projector.bin")), capsys)
        assert f"--projector {s1 / 'mm_projector.bin'} lies inside --out {s1}" in message
    assert (s1 / "mm_projector.bin").read_bytes() == before


@pytest.mark.parametrize("flag", ["monitor_json", "train_json"])
def test_a_json_input_inside_out_is_refused(env, tmp_path, capsys, flag):
    out = tmp_path / "run"
    out.mkdir()
    path = copy_data(env, out)
    before = path.read_bytes()
    message = refusal(train.main, argv(env, out, "--overwrite", **{flag: str(path)}), capsys)
    assert f"--{flag.replace('_', '-')} {path} lies inside --out" in message
    assert path.read_bytes() == before


def test_convert_never_writes_over_its_own_input(tmp_path, capsys):
    write_csv(tmp_path / "m.csv", [dict(lesion_id="L1", image_id="ISIC_1", dx="mel", age="50", sex="male")])
    before = (tmp_path / "m.csv").read_bytes()
    for extra in ([], ["--overwrite"]):
        message = refusal(data.main, ["--convert", "ham", str(tmp_path / "m.csv"), str(tmp_path / "m.csv"), *extra],
                          capsys)
        assert "is the input CSV itself" in message and str(tmp_path / "m.csv") in message
    assert (tmp_path / "m.csv").read_bytes() == before


def test_convert_over_an_existing_file_needs_overwrite(tmp_path, capsys):
    write_csv(tmp_path / "m.csv", [dict(lesion_id="L1", image_id="ISIC_1", dx="mel", age="50", sex="male")])
    (tmp_path / "ham.json").write_text("the user's")
    args = ["--convert", "ham", str(tmp_path / "m.csv"), str(tmp_path / "ham.json")]
    message = refusal(data.main, args, capsys)
    assert f"OUT_JSON {tmp_path / 'ham.json'} exists; --overwrite replaces it" in message
    assert (tmp_path / "ham.json").read_text() == "the user's"
    data.main(args + ["--overwrite"])
    assert json.loads((tmp_path / "ham.json").read_text())[0]["id"] == "ISIC_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ham.json", "m.csv"]  # no .tmp left
