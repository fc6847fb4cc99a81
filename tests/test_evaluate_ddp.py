"""evaluate.py under torchrun: two CPU processes (gloo) give the predictions and the scores of one;
a rank's file left by a killed run is completed without generating its lines again; files of
another world size are never read; what stays one process's work is refused under torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate as E
from data import read_llava_json
from model import LlamaConfig, VisionConfig, build_projector
from train_env import make_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The training tests' tiny models and data, with a projector for them."""
    root = make_env(tmp_path_factory.mktemp("eval_ddp"))
    torch.manual_seed(1)
    projector = build_projector(VisionConfig.tiny().width, LlamaConfig.tiny().hidden_size)
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}, root / "mm_projector.bin")
    return root


def flags(env, out):
    # the 24 training records as the test set: 12 per rank, in batches of 3, so the two runs batch
    # different records together
    return [str(a) for a in (
        "--llm", env / "llm", "--vision", env / "vision", "--vision-heads", 2, "--tokenizer",
        env / "data" / "tokenizer.json", "--projector", env / "mm_projector.bin", "--test-json",
        env / "data" / "train.json", "--out", out, "--batch-size", 3, "--max-new-tokens", 8,
        "--min-group-size", 1, "--n-resamples", 20, "--device", "cpu")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, n=2):
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                        f"--master_port={free_port()}", str(ROOT / "evaluate.py"), *args],
                       capture_output=True, text=True, env=env_vars, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def single(env, tmp_path_factory):
    """The one-process run: its folder and the test records."""
    out = tmp_path_factory.mktemp("single") / "out"
    E.main(flags(env, out))
    return out, read_llava_json(env / "data" / "train.json")


def test_two_ranks_give_the_predictions_and_scores_of_one(env, single, tmp_path):
    one, records = single
    out = tmp_path / "out"
    r = torchrun(flags(env, out))
    by_id = {p["id"]: p for p in lines(one / "predictions.jsonl")}
    # the same lines, now in the order of the test set
    assert lines(out / "predictions.jsonl") == [by_id[rec["id"]] for rec in records]
    assert json.loads((out / "results.json").read_text()) == json.loads((one / "results.json").read_text())
    assert (out / "predictions_key.json").read_text() == (one / "predictions_key.json").read_text()
    # the ranks' files are merged away; rank 0 alone prints the table
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    assert r.stdout.count("Whole test set") == 1


def test_a_killed_ranks_file_is_completed_and_another_worlds_is_never_read(env, single, tmp_path):
    one, records = single
    out = tmp_path / "out"
    out.mkdir()
    key = json.loads((one / "predictions_key.json").read_text())
    by_id = {p["id"]: p for p in lines(one / "predictions.jsonl")}
    # rank 1 of 2 was killed after three of its twelve records (and in the middle of a fourth line);
    # its lines are marked, so a line generated again would show
    share = records[1::2]
    kept = {rec["id"]: dict(by_id[rec["id"]], prediction="kept: " + by_id[rec["id"]]["prediction"])
            for rec in share[:3]}
    name = E.shard_name(1, 2)
    (out / f"{name}_key.json").write_text(json.dumps({**key, "shard": "rank 1 of 2"}))
    (out / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in kept.values()) + '{"id": "x", "pre')
    # a file of a run on 3 processes, with a line that must not make it into this run's predictions
    stale = E.shard_name(0, 3)
    (out / f"{stale}_key.json").write_text(json.dumps({**key, "shard": "rank 0 of 3"}))
    (out / f"{stale}.jsonl").write_text(json.dumps(dict(by_id[records[0]["id"]], prediction="stale")) + "\n")

    torchrun(flags(env, out))
    assert lines(out / "predictions.jsonl") == [kept.get(rec["id"], by_id[rec["id"]]) for rec in records]
    assert not (out / f"{name}.jsonl").exists() and (out / f"{stale}.jsonl").exists()  # left as it was


def test_a_ranks_file_of_another_world_size_is_refused(env, tmp_path):
    key = {"version": E.KEY_VERSION, "shard": "rank 1 of 3"}
    name = E.shard_name(1, 2)
    (tmp_path / f"{name}_key.json").write_text(json.dumps(key))
    (tmp_path / f"{name}.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"differs in: shard \(\"rank 1 of 3\" -> \"rank 1 of 2\"\)"):
        E.claim_predictions(tmp_path, {**key, "shard": "rank 1 of 2"}, name=name)


@pytest.mark.parametrize("flag", ["--predictions", "--preflight"])
def test_one_process_work_is_refused_under_torchrun(env, tmp_path, monkeypatch, capsys, flag):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--test-json", str(env / "data" / "train.json"), "--out", str(tmp_path / "out")]
    argv += ["--predictions", str(tmp_path / "p.jsonl")] if flag == "--predictions" else \
        [flag, "--llm", str(env / "llm"), "--vision", str(env / "vision")]
    with pytest.raises(SystemExit) as e:
        E.parse_args(argv)
    assert e.value.code == 2
    assert f"{flag} runs in one process: start it with python, not torchrun" in capsys.readouterr().err
