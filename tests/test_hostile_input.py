"""Input a hostile but realistic user gives, on every surface (flags, model configs, adapters, data,
demo folders, reuse keys): each case ends as an exit status other than 0 and ONE line on stderr
naming the flag, file or field, and leaves every file of the user's byte for byte as it was; or,
where the input is fine, as the right behaviour.

The commands run in-process (their main functions), so the file stays fast; the two cases about
processes (a killed demo's workers) start real ones."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import config
import data
import demo
import evaluate
import train
from model import build_projector
from synthetic import train_tokenizer
from train_env import make_env, train_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = make_env(tmp_path_factory.mktemp("hostile"))
    proj = build_projector(32, 64)  # VisionConfig.tiny() width -> LlamaConfig.tiny() hidden
    torch.save({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}, root / "mm_projector.bin")
    return root


def snapshot(*roots):
    """{path: sha256} of every file under the roots: what 'the user's files are untouched' compares."""
    out = {}
    for root in roots:
        for f in sorted(Path(root).rglob("*")):
            if f.is_file() and not f.is_symlink():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line(fn, argv, capsys, prog):
    """Run a main that must refuse: exit status not 0, one line on stderr starting "PROG: ", no
    traceback. -> that line (a message passed to sys.exit is what Python prints)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(argv)
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):
        err, code = err + code, 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: "), lines[0]
    return lines[0]


def train_argv(env, out, *extra, **kw):
    return config.to_argv(train_config(env, out, max_steps=1, **kw)) + list(extra)


# ----------------------------------------------------------------------------------------------
# train.py flags: finite and in range when they are parsed (before any model is built)

FLAG_CASES = [
    (["--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1)"),
    (["--warmup-ratio", "-0.1"], "--warmup-ratio must be in [0, 1)"),
    (["--max-bad-steps", "-1"], "--max-bad-steps must be >= 1"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--lm-weight", "inf"], "--lm-weight must be a finite number >= 0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0"),
    (["--lambdas", "race=inf"], "--lambdas['race'] must be a finite number >= 0"),
    (["--lambdas", "age=nan"], "--lambdas['age'] must be a finite number >= 0"),
    (["--dac-weight", "nan"], "--dac-weight must be a finite number >= 0"),
    (["--dac-weight", "inf"], "--dac-weight must be a finite number >= 0"),
    (["--lora-alpha", "nan"], "--lora-alpha) must be a finite number > 0"),
    (["--lora-r", "0"], "--lora-r) must be an integer >= 1"),
    (["--lora-dropout", "1"], "--lora-dropout) must be a number in [0, 1)"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--max-length", "1"], "--max-length must be >= 2"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--lora-r", "0", "--preflight"], "--lora-r) must be an integer >= 1"),
]


@pytest.mark.parametrize("args, expected", FLAG_CASES, ids=[" ".join(a) for a, _ in FLAG_CASES])
def test_numeric_flags_are_refused_when_parsed(env, tmp_path, capsys, args, expected):
    before = snapshot(env)
    line = one_line(train.main, train_argv(env, tmp_path / "out", *args), capsys, "train.py")
    assert expected in line
    assert not (tmp_path / "out").exists() and snapshot(env) == before


# ----------------------------------------------------------------------------------------------
# train.py runs: what the preflight said OK to must not crash later, and the other way round


@pytest.mark.parametrize("preflight", [False, True])
def test_layer_out_of_range(env, tmp_path, capsys, preflight):
    argv = train_argv(env, tmp_path / "out", *(["--preflight"] if preflight else []), method="fairllava", layer=99)
    line = one_line(train.main, argv, capsys, "train.py")
    assert "--layer 99: the model has 2 layers, so hidden states 0..2" in line
    assert not (tmp_path / "out").exists()


def test_out_under_a_file(env, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    line = one_line(train.main, train_argv(env, tmp_path / "afile" / "sub"), capsys, "train.py")
    assert f"--out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder" in line
    assert (tmp_path / "afile").read_text() == "mine"


def big_tokenizer(env, path):
    texts = [json.dumps(it) for it in json.loads((env / "data" / "train.json").read_text())]
    tok = train_tokenizer(texts * 4, vocab_size=600)
    tok.save(str(path))
    return tok.get_vocab_size()


@pytest.mark.parametrize("preflight", [False, True])
def test_a_tokenizer_larger_than_the_embedding(env, tmp_path, capsys, preflight):
    vocab = big_tokenizer(env, tmp_path / "tokenizer.json")
    argv = train_argv(env, tmp_path / "out", *(["--preflight"] if preflight else []), tokenizer=str(tmp_path / "tokenizer.json"))
    line = one_line(train.main, argv, capsys, "train.py")
    assert f"vocabulary of {vocab} tokens is larger than the embedding matrix (300 rows)" in line
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_embedding_in_evaluate(env, tmp_path, capsys):
    big_tokenizer(env, tmp_path / "tokenizer.json")
    line = one_line(evaluate.cli, eval_argv(env, tmp_path / "out", "--tokenizer", str(tmp_path / "tokenizer.json")),
                    capsys, "evaluate.py")
    assert "is larger than the embedding matrix (300 rows)" in line
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def edited_json(env, tmp_path, edit, name="train.json"):
    items = json.loads((env / "data" / name).read_text())
    for it in items:
        it["image"] = str(env / "data" / it["image"])
    edit(items)
    path = tmp_path / name
    path.write_text(json.dumps(items))
    return path


@pytest.mark.parametrize("preflight", [False, True])
def test_an_image_field_that_is_a_list(env, tmp_path, capsys, preflight):
    def edit(items):
        items[1]["image"] = [items[1]["image"]]
    path = edited_json(env, tmp_path, edit)
    before = snapshot(tmp_path)
    argv = train_argv(env, tmp_path / "out", *(["--preflight"] if preflight else []), train_json=str(path))
    line = one_line(train.main, argv, capsys, "train.py")
    assert "field 'image': expected a file path (a string), got a JSON list" in line
    assert snapshot(tmp_path) == before


def test_a_float_image_with_negative_pixels(env, tmp_path, capsys):
    a = np.linspace(-50, 200, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(a, mode="F").save(tmp_path / "neg.tiff")

    def edit(items):
        items[0]["image"] = str(tmp_path / "neg.tiff")
    path = edited_json(env, tmp_path, edit)
    line = one_line(train.main, train_argv(env, tmp_path / "out", "--preflight", train_json=str(path)), capsys,
                    "train.py")
    assert "F-mode pixels must be finite and >= 0" in line and "neg.tiff" in line
    with pytest.raises(data.DataError, match="F-mode pixels must be finite and >= 0"):
        data.load_image(tmp_path / "neg.tiff", "x")
    with pytest.raises(ValueError, match=r"F-mode pixels must be finite and >= 0 \(intensities\), found a minimum of -50"):
        data.ImageProcessor(32)(Image.fromarray(a, mode="F"))


# ----------------------------------------------------------------------------------------------
# model configs: one validation, naming config.json and the field

CONFIG_CASES = [
    ({"rms_norm_eps": "1e-05"}, "rms_norm_eps must be a finite number > 0, got '1e-05'"),
    ({"pad_token_id": 5000}, "pad_token_id must be a token id in 0..299, got 5000"),
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer in 1..16384, got 0"),
    ({"num_hidden_layers": 1e12}, "num_hidden_layers must be an integer in 1..4096, got 1000000000000.0"),
    ({"num_hidden_layers": 10 ** 12}, "num_hidden_layers must be an integer in 1..4096, got 1000000000000"),
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number > 0, got nan"),
    ({"vocab_size": -1}, "vocab_size must be an integer in 1..16777216, got -1"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
]


@pytest.mark.parametrize("change, expected", CONFIG_CASES, ids=[next(iter(c)) + "=" + str(next(iter(c.values())))
                                                                 for c, _ in CONFIG_CASES])
def test_a_bad_llm_config_is_one_line_naming_it(env, tmp_path, capsys, change, expected):
    llm = tmp_path / "llm"
    shutil.copytree(env / "llm", llm)
    cfg = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**cfg, **change}))
    before = snapshot(llm)
    line = one_line(train.main, train_argv(env, tmp_path / "out", llm=str(llm)), capsys, "train.py")
    assert f"{llm / 'config.json'}: {expected}" in line
    line = one_line(train.main, train_argv(env, tmp_path / "out", "--preflight", llm=str(llm)), capsys, "train.py")
    assert expected in line
    assert snapshot(llm) == before and not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused_naming_the_tensor(env, tmp_path, capsys):
    """Before, evaluate.py with --random-projector on such a model exited 0 with empty reports."""
    llm = tmp_path / "llm"
    shutil.copytree(env / "llm", llm)
    model = checkpoint.load_llama(llm)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    checkpoint.save_llama(model, llm)
    line = one_line(evaluate.cli, eval_argv(env, tmp_path / "out", llm=llm, projector=None) + ["--random-projector"],
                    capsys, "evaluate.py")
    assert "non-finite values (NaN or inf) in model.layers.1.mlp.up_proj.weight" in line


# ----------------------------------------------------------------------------------------------
# evaluate.py


def eval_argv(env, out, *extra, llm=None, projector="default"):
    argv = ["--llm", str(llm or env / "llm"), "--vision", str(env / "vision"), "--vision-heads", "2",
            "--test-json", str(env / "data" / "test.json"), "--out", str(out), "--max-new-tokens", "3",
            "--min-group-size", "1", "--n-resamples", "0", "--device", "cpu",
            "--tokenizer", str(env / "data" / "tokenizer.json")]
    if projector:
        argv += ["--projector", str(env / "mm_projector.bin" if projector == "default" else projector)]
    return argv + list(extra)


def test_max_new_tokens_beyond_the_model(env, tmp_path, capsys):
    line = one_line(evaluate.cli, eval_argv(env, tmp_path / "out", "--max-new-tokens", str(10 ** 12)), capsys,
                    "evaluate.py")
    assert f"--max-new-tokens {10 ** 12}: the model holds 512 positions" in line


def test_a_negative_bootstrap_seed(env, tmp_path, capsys):
    line = one_line(evaluate.cli, eval_argv(env, tmp_path / "out", "--seed", "-1"), capsys, "evaluate.py")
    assert "--seed" in line and "at least 0, got -1" in line
    assert not (tmp_path / "out").exists()  # refused when parsed, before generating


@pytest.mark.parametrize("field, value, expected", [("r", "4", "LoRA r (--lora-r) must be an integer >= 1, got '4'"),
                                                     ("lora_alpha", None, "missing field(s) lora_alpha of a PEFT LoRA config")])
def test_a_bad_adapter_config(env, tmp_path, capsys, field, value, expected):
    model = checkpoint.load_llama(env / "llm")
    from lora import LoRAConfig, apply_lora, save_peft_adapter
    apply_lora(model, LoRAConfig.tiny())
    save_peft_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg.pop(field) if value is None else cfg.update({field: value})
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    before = snapshot(tmp_path / "adapter")
    line = one_line(evaluate.cli, eval_argv(env, tmp_path / "out", "--adapter", str(tmp_path / "adapter")), capsys,
                    "evaluate.py")
    assert f"{tmp_path / 'adapter' / 'adapter_config.json'}: {expected}" in line
    assert snapshot(tmp_path / "adapter") == before


def copy_test_set(env, tmp_path):
    shutil.copytree(env / "data", tmp_path / "data")
    return tmp_path / "data" / "test.json"


def test_images_replaced_at_the_same_paths_are_not_reused(env, tmp_path, capsys):
    test = copy_test_set(env, tmp_path)
    argv = eval_argv(env, tmp_path / "out") + ["--test-json", str(test)]
    evaluate.cli(argv)
    first = json.loads(test.read_text())[0]["image"]
    img = tmp_path / "data" / first
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)  # same path, other pixels
    line = one_line(evaluate.cli, argv, capsys, "evaluate.py")
    assert "images" in line and "--overwrite" in line


def test_a_changed_open_clip_config_beside_a_vision_file_is_not_reused(env, tmp_path, capsys):
    vision = tmp_path / "vision"
    shutil.copytree(env / "vision", vision)
    (vision / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": {"heads": 2}}}))
    argv = eval_argv(env, tmp_path / "out") + ["--vision", str(vision / "open_clip_pytorch_model.bin")]
    evaluate.cli(argv)
    (vision / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": {"heads": 4}}}))
    line = one_line(evaluate.cli, argv, capsys, "evaluate.py")
    assert "vision (weights)" in line and "--overwrite" in line


# ----------------------------------------------------------------------------------------------
# data.py --convert


def test_convert_a_latin1_csv(tmp_path, capsys):
    (tmp_path / "m.csv").write_bytes("lesion_id,image_id,dx,age,sex\nL1,ISIC_1,mel,50,m\xe4le\n".encode("latin-1"))
    before = snapshot(tmp_path)
    line = one_line(data.main, ["--convert", "ham", str(tmp_path / "m.csv"), str(tmp_path / "ham.json")], capsys,
                    "data.py")
    assert f"{tmp_path / 'm.csv'}: not UTF-8 text" in line and "save the CSV as UTF-8" in line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# demo.py: flags, folders in the way, keys by content, workers that outlive a killed demo


@pytest.mark.parametrize("args, expected", [
    (["--seeds", "-1"], "--seeds, --data-seed, --base-seed and --check-draws must be in [0, 2**32)"),
    (["--data-seed", "-3"], "--seeds, --data-seed, --base-seed and --check-draws must be in [0, 2**32)"),
    (["--check-draws", "5", "-3"], "--seeds, --data-seed, --base-seed and --check-draws must be in [0, 2**32)"),
    (["--study", "--seeds", "3"], "--study runs its own draws, seeds and arms"),
    (["--study", "--check-draws", "3"], "--study and --check-draws are two runs"),
    (["--check-draws", "3", "--seeds", "0", "1"], "--check-draws trains LoRA and its control with one training seed"),
    (["--seeds", "1", "1"], "--seeds lists a seed twice: 1 1"),
])
def test_demo_seeds(tmp_path, capsys, args, expected):
    line = one_line(demo.parse_args, args + ["--dir", str(tmp_path / "d")], capsys, "demo.py")
    assert expected in line and not (tmp_path / "d").exists()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_demo_data_folder_that_is_a_file_or_a_link(tmp_path, kind):
    d = tmp_path / "D"
    (d / "draw1").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("y")
    data_dir = d / "draw1" / "data"  # the default draw's benchmark
    data_dir.write_text("x") if kind == "file" else data_dir.symlink_to(tmp_path / "mine")
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--dir", str(d), "--n-test", "240", "--workers", "1"],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert f"{data_dir} is a {'file' if kind == 'file' else 'symbolic link'}, not a folder" in lines[0]
    assert snapshot(tmp_path) == before


def test_a_retrained_stage1_changes_the_stage2_key(env, tmp_path):
    """Before: the stage-2 key held the projector's path, so a stage 2 trained on an old stage 1
    was reused after stage 1 was redone with other settings."""
    proj = tmp_path / "stage1" / "mm_projector.bin"
    proj.parent.mkdir()
    shutil.copy(env / "mm_projector.bin", proj)
    tcfg = train_config(env, tmp_path / "seed0" / "lora", projector=str(proj), stage=2)
    before = demo.run_key(tcfg)
    sd = torch.load(proj, weights_only=True)
    torch.save({k: v + 1 for k, v in sd.items()}, proj)  # what retraining stage 1 does to the file
    after = demo.run_key(tcfg)
    assert before["inputs"]["mm_projector.bin"] != after["inputs"]["mm_projector.bin"]
    assert {k: v for k, v in before.items() if k != "inputs"} == {k: v for k, v in after.items() if k != "inputs"}


def test_the_test_split_is_described_as_scored():
    res = {(1, 0, "lora"): {"fairness": {"race": {"Finding-F1 (shortcut findings)": {"groups": {
        "white": {"n": 58}, "black": {"n": 62}, "asian": {"n": 61}, "hispanic": {"n": 59}}}}}}}
    assert demo.test_split(res) == "240 decorrelated cases per draw (58-62 per race)"


def _worker_pids():
    """Processes started by the pool's initializer: their command line names the spawn entry point."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:] if "multiprocessing.spawn" in line}


@pytest.mark.skipif(not hasattr(os, "getppid") or shutil.which("ps") is None, reason="needs ps")
def test_the_workers_of_a_killed_demo_exit(tmp_path):
    """kill -9 of the demo: its workers see their parent gone and exit within seconds, instead of
    training on and writing into --dir."""
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import demo\n"
              "from concurrent.futures import ProcessPoolExecutor\nfrom multiprocessing import get_context\n"
              "import os\n"
              "pool = ProcessPoolExecutor(2, mp_context=get_context('spawn'), initializer=demo._die_with_parent,"
              " initargs=(os.getpid(),))\n"
              # both workers have run their initializer (the watcher) once each has finished a job
              "assert len({j.result() for j in [pool.submit(demo._slow_pid, 1.0) for _ in range(2)]}) == 2\n"
              "jobs = [pool.submit(time.sleep, 600) for _ in range(2)]\n"
              "time.sleep(0.5); print('ready', flush=True); time.sleep(600)\n")
    before = _worker_pids()
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    workers = _worker_pids() - before
    assert len(workers) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and workers & _worker_pids():
        time.sleep(0.2)
    assert not workers & _worker_pids(), "a worker outlived the killed demo"


# ----------------------------------------------------------------------------------------------
# evaluate.py writes results only over its own


def score_argv(env, out, preds):
    return ["--predictions", str(preds), "--test-json", str(env / "data" / "test.json"), "--out", str(out),
            "--min-group-size", "1", "--n-resamples", "0"]


def write_predictions(env, path):
    recs = data.read_llava_json(env / "data" / "test.json")
    path.write_text("".join(json.dumps({"id": r["id"], "prediction": r["answer"]}) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("name", ["results.md", "results.json", "groups.png"])
def test_evaluate_never_writes_over_a_result_file_of_the_user(env, tmp_path, capsys, name):
    preds = write_predictions(env, tmp_path / "p.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("the user's")
    before = snapshot(tmp_path)
    line = one_line(evaluate.cli, score_argv(env, out, preds), capsys, "evaluate.py")
    assert f"{out / name} was not written by evaluate.py" in line
    assert snapshot(tmp_path) == before
    (out / name).unlink()
    evaluate.cli(score_argv(env, out, preds))  # its own results: written, then written over
    evaluate.cli(score_argv(env, out, preds))


def test_overwrite_keeps_predictions_of_unknown_origin(env, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write_predictions(env, out / "predictions.jsonl")  # the user's, no predictions_key.json
    before = snapshot(tmp_path)
    line = one_line(evaluate.cli, eval_argv(env, out, "--overwrite"), capsys, "evaluate.py")
    assert "--overwrite" in line and "has no predictions_key.json beside it" in line
    assert snapshot(tmp_path) == before


def test_a_diverging_run_stops_in_one_line_naming_what_was_saved(env, tmp_path, capsys, monkeypatch):
    """The run's progress and its "step skipped" warnings go to stderr too; its end is one error line."""
    import model as model_module
    real = model_module.LlavaModel.forward

    def nan_after_two(self, *a, **k):  # steps 1-2 are fine, then every loss is NaN
        out = real(self, *a, **k)
        nan_after_two.calls += 1
        out.loss = out.loss * (float("nan") if nan_after_two.calls > 2 else 1.0)
        return out

    def last_line(out, **kw):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train.main(config.to_argv(train_config(env, out, max_steps=8, max_bad_steps=2, **kw)))
        assert "Traceback" not in capsys.readouterr().err
        return e.value.code

    nan_after_two.calls = 0
    monkeypatch.setattr(model_module.LlavaModel, "forward", nan_after_two)
    assert last_line(tmp_path / "run", save_every=2) == (
        f"train.py: error: 2 non-finite losses in a row (--max-bad-steps): stopping; the last checkpoint, of step 2, "
        f"is {tmp_path / 'run' / 'checkpoint.pt'}")
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    nan_after_two.calls = 10  # NaN from the first step: nothing was saved, and the message says so
    assert last_line(tmp_path / "run2").endswith("stopping; no checkpoint was saved")


def test_a_test_item_whose_image_is_a_list(env, tmp_path, capsys):
    def edit(items):
        items[0]["image"] = [items[0]["image"]]
    test = edited_json(env, tmp_path, edit, name="test.json")
    for extra in ([], ["--preflight"]):
        capsys.readouterr()
        if extra:
            with pytest.raises(SystemExit):
                evaluate.cli(eval_argv(env, tmp_path / "out", "--test-json", str(test), *extra))
            err = capsys.readouterr()
            assert "field 'image': expected a file path (a string), got a JSON list" in err.out + err.err
        else:
            line = one_line(evaluate.cli, eval_argv(env, tmp_path / "out", "--test-json", str(test)), capsys, "evaluate.py")
            assert "field 'image': expected a file path (a string), got a JSON list" in line


@pytest.mark.parametrize("heads", ["2", 0])
def test_a_bad_vision_head_count_in_open_clip_config(env, tmp_path, capsys, heads):
    vision = tmp_path / "vision"
    shutil.copytree(env / "vision", vision)
    (vision / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": {"heads": heads}}}))
    argv = eval_argv(env, tmp_path / "out")
    argv[argv.index("--vision-heads"):argv.index("--vision-heads") + 2] = []  # the config's count is used
    argv[argv.index("--vision") + 1] = str(vision)
    line = one_line(evaluate.cli, argv, capsys, "evaluate.py")
    assert f"the vision head count (--vision-heads, or heads in open_clip_config.json) must be an integer >= 1, " \
           f"got {heads!r}" in line
