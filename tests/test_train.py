"""train.py: gradient accumulation and DDP give the gradients of one process on the combined
batch, --resume continues exactly from a checkpoint that loads with weights_only=True, bad steps,
crashes and foreign checkpoints are handled, phi follows the main learning-rate schedule, the leak
monitor leaves training untouched, --report-to tensorboard mirrors the logs, --dry-run counts."""

import argparse
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import config as cli
import model as model_module
import monitor
import train
from fairness import FairnessConfig
from lora import LoRAConfig
from train_env import make_env, train_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("train"))


config = train_config


def log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def free_port():
    # a port the OS just handed out: a fixed one would collide with another run of the tests
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_grads(a, b, tol=1e-6):
    ga, gb = torch.load(a), torch.load(b)
    assert ga.keys() == gb.keys() and len(ga) > 0
    assert any(g.abs().sum() > 0 for g in ga.values())
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=tol, rtol=1e-4, msg=k)


@pytest.mark.parametrize("method", ["lora", "reweight"])
def test_grad_accumulation_equals_big_batch(env, tmp_path, method):
    train.train(config(env, tmp_path / "a", method=method, max_steps=1, dump_grads=str(tmp_path / "a.pt")), quiet=True)
    train.train(config(env, tmp_path / "b", method=method, max_steps=1, batch_size=2, grad_accum=2,
                       dump_grads=str(tmp_path / "b.pt")), quiet=True)
    assert_same_grads(tmp_path / "a.pt", tmp_path / "b.pt")
    assert log(tmp_path / "a")[0]["loss"] == pytest.approx(log(tmp_path / "b")[0]["loss"], rel=1e-5)


def test_ddp_two_processes_equal_one(env, tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 samples each == 1 process with the 4 samples."""
    single = tmp_path / "single"
    train.train(config(env, single, max_steps=1, dump_grads=str(tmp_path / "single.pt")), quiet=True)
    cfg = config(env, tmp_path / "ddp", max_steps=2, batch_size=2, dump_grads=str(tmp_path / "ddp.pt"))
    args = cli.to_argv(cfg)
    assert cli.parse_args(args)[1] == cfg  # the command line gives back the same run
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(ROOT / "train.py"), *args],
                       capture_output=True, text=True, env=env_vars, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_grads(tmp_path / "single.pt", tmp_path / "ddp.pt")
    lines = log(tmp_path / "ddp")
    assert [x["step"] for x in lines] == [1, 2]  # one writer: no line twice
    assert lines[0]["loss"] == pytest.approx(log(single)[0]["loss"], rel=1e-5)
    assert (tmp_path / "ddp" / "adapter" / "adapter_config.json").is_file()
    assert not list((tmp_path / "ddp").glob("*.tmp"))


@pytest.mark.parametrize("method", ["fairllava", "resample"])
def test_resume_continues_exactly(env, tmp_path, method):
    kw = dict(method=method, max_steps=6, lora_dropout=0.1, batch_size=4, grad_accum=2)  # 3 steps/epoch
    train.train(config(env, tmp_path / "full", **kw), quiet=True)
    part = config(env, tmp_path / "part", save_every=4, stop_after=4, **kw)
    train.train(part, quiet=True)
    assert len(log(tmp_path / "part")) == 4
    train.train(replace(part, stop_after=0, resume=True), quiet=True)
    full, resumed = log(tmp_path / "full"), log(tmp_path / "part")
    assert [x["step"] for x in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
        if method == "fairllava":
            assert a["dim_loss"] == pytest.approx(b["dim_loss"], rel=1e-5, abs=1e-7)
    if method == "fairllava":
        assert "club/race" in full[0]
        # phi travels in the checkpoint (no separate file): a resumed run must continue with it
        saved = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["trainable"]
        assert any(k.startswith("fair.dac.heads.race.") for k in saved) and saved["fair.dac.heads.race.weight"].shape[0] == 9


def test_resume_mismatch_is_an_error(env, tmp_path):
    train.train(config(env, tmp_path / "r", max_steps=1), quiet=True)
    with pytest.raises(ValueError, match="does not match"):
        train.train(config(env, tmp_path / "r", max_steps=2, lora_r=8, resume=True), quiet=True)
    with pytest.raises(FileNotFoundError, match="checkpoint.pt not found"):
        train.train(config(env, tmp_path / "empty", max_steps=1, resume=True), quiet=True)


def test_checkpoint_loads_with_weights_only(env, tmp_path):
    """Tensors, numbers and strings only: torch.load(weights_only=True) reads it, so resuming never
    runs code from the file."""
    train.train(config(env, tmp_path / "w", method="fairllava", max_steps=2, lora_dropout=0.1), quiet=True)
    st = torch.load(tmp_path / "w" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(st) == {"step", "config", "trainable", "optimizer", "dac_optimizer", "rng"} and st["step"] == 2
    assert json.loads(st["config"])["method"] == "fairllava"
    assert any(k.startswith("llm.") and "lora_A" in k for k in st["trainable"])
    assert any(k.startswith("mm_projector.") for k in st["trainable"]) and "fair.dac.heads.age.weight" in st["trainable"]
    assert st["dac_optimizer"]["state"] and len(st["rng"]) == 1 and isinstance(st["rng"][0]["torch"], torch.Tensor)


FOREIGN = {
    "pickled_object": lambda path: torch.save(argparse.Namespace(step=3), path),  # needs code to unpickle
    "not_a_torch_file": lambda path: path.write_bytes(b"not a checkpoint at all"),
    "tensors_of_something_else": lambda path: torch.save({"model": {"w": torch.zeros(2)}}, path),
}


@pytest.mark.parametrize("kind", FOREIGN)
def test_resume_from_a_foreign_file_is_a_value_error(env, tmp_path, kind):
    out = tmp_path / "f"
    out.mkdir()
    FOREIGN[kind](out / "checkpoint.pt")
    with pytest.raises(ValueError, match=f"--resume {out / 'checkpoint.pt'}: not a checkpoint written by train.py"):
        train.train(config(env, out, max_steps=1, resume=True), quiet=True)


@pytest.mark.parametrize("protocol", ["alternating", "single_step"])
def test_phi_learning_rate_follows_the_main_schedule(env, tmp_path, monkeypatch, protocol):
    """One schedule for every learning rate: phi's lr / dac_lr equals the main lr / lr at every step,
    whether phi has its own optimizer (alternating) or a group of the main one (single_step)."""
    seen = {}
    real_build = train.build_regularizer

    def spy(cfg, model, opt, d):  # record phi's lr each time its parameters are stepped
        fair, dac_opt = real_build(cfg, model, opt, d)
        phi_opt, group = (dac_opt.opt, 0) if dac_opt is not None else (opt, 1)
        real_step = phi_opt.step

        def step(*a, **k):
            seen.setdefault("lr", []).append(phi_opt.param_groups[group]["lr"])
            return real_step(*a, **k)

        phi_opt.step = step
        return fair, dac_opt

    monkeypatch.setattr(train, "build_regularizer", spy)
    cfg = config(env, tmp_path / protocol, method="fairllava", protocol=protocol, max_steps=5, warmup_ratio=0.4,
                 lr=1e-3, dac_lr=4e-3)
    train.train(cfg, quiet=True)
    main_lr = [x["lr"] for x in log(tmp_path / protocol)]
    assert len(seen["lr"]) == 5
    assert main_lr == pytest.approx([1e-3 * train.cosine_lr(s, 5, 2) for s in range(5)])  # warmup 2, then cosine
    assert [lr / 4e-3 for lr in seen["lr"]] == pytest.approx([lr / 1e-3 for lr in main_lr])


@pytest.mark.parametrize("method", ["fairllava", "lora"])
def test_monitor_logs_the_leak_and_leaves_training_untouched(env, tmp_path, monkeypatch, method):
    kw = dict(method=method, max_steps=3, lora_dropout=0.1, batch_size=4, grad_accum=2)  # dropout draws from the RNG
    train.train(config(env, tmp_path / "plain", **kw), quiet=True)
    graphs = []
    real_report = monitor.leak_report
    monkeypatch.setattr(monitor, "leak_report", lambda h, *a: graphs.append(h.requires_grad) or real_report(h, *a))
    train.train(config(env, tmp_path / "mon", monitor_json=str(env / "data" / "val.json"), monitor_every=1, **kw),
                quiet=True)
    assert not (tmp_path / "plain" / "monitor.jsonl").exists()
    # the monitor draws nothing from the random streams: the training is the same to the last bit
    assert [x["loss"] for x in log(tmp_path / "mon")] == [x["loss"] for x in log(tmp_path / "plain")]
    points = [json.loads(line) for line in (tmp_path / "mon" / "monitor.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 1, 2, 3]  # before training, then after every step
    phi_keys = {"dac_acc/race", "club/race", "dac_acc/age", "club/age", "dac_acc/gender", "club/gender"}
    for p in points:
        assert {"h_rms", "probe/race", "probe/age", "probe/gender"} <= set(p) and p["h_rms"] > 0
        assert (phi_keys <= set(p)) if method == "fairllava" else not (phi_keys & set(p))
    assert graphs == [False] * 4  # h is measured without building an autograd graph


def scalars(board, tag):
    """(step, value) of a scalar in a TensorBoard folder, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(board))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc.Tags()["scalars"]


def test_report_to_tensorboard_mirrors_the_logs_across_a_resume(env, tmp_path):
    kw = dict(method="fairllava", max_steps=4, report_to="tensorboard", monitor_json=str(env / "data" / "val.json"),
              monitor_every=2, monitor_n=8)
    part = config(env, tmp_path / "r", save_every=2, stop_after=3, **kw)
    train.train(part, quiet=True)  # killed after step 3, with the checkpoint of step 2
    train.train(replace(part, stop_after=0, resume=True), quiet=True)
    lines = log(tmp_path / "r")
    points = [json.loads(line) for line in (tmp_path / "r" / "monitor.jsonl").read_text().splitlines()]
    board = tmp_path / "r" / "tensorboard"
    assert len(list(board.glob("events.out.tfevents.*"))) == 2  # one file per process that trained
    # step 3 of the killed run is hidden, as it is cut from log.jsonl: each step once (as float32s)
    loss, tags = scalars(board, "train/loss")
    assert [s for s, _ in loss] == [x["step"] for x in lines] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx([x["loss"] for x in lines], rel=1e-6)
    names = lambda section, record: {f"{section}/{k}" for k in record if k != "step"}
    assert set(tags) == names("train", lines[0]) | names("monitor", points[0])  # every number of both files
    probe, _ = scalars(board, "monitor/probe/race")
    assert probe == [(p["step"], pytest.approx(p["probe/race"], rel=1e-6)) for p in points] and len(probe) == 3


def test_report_to_tensorboard_without_the_package_is_refused_up_front(env, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an import sees without the package
    with pytest.raises(SystemExit) as e:
        train.main(cli.to_argv(config(env, tmp_path / "out", max_steps=1, report_to="tensorboard")))
    assert e.value.code == ("train.py: error: --report-to tensorboard needs the tensorboard package, which is not "
                            "installed: pip install tensorboard (or leave --report-to at none)")
    assert not (tmp_path / "out").exists()  # refused before anything was built or written


def test_nonfinite_loss_skips_then_stops(env, tmp_path, monkeypatch):
    real = model_module.LlavaModel.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        out.loss = out.loss * float("nan") if calls["n"] == 2 else out.loss
        return out

    monkeypatch.setattr(model_module.LlavaModel, "forward", flaky)
    model, _ = train.train(config(env, tmp_path / "nan", max_steps=3), quiet=True)
    lines = log(tmp_path / "nan")
    assert [x["skipped"] for x in lines] == [False, True, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    def always_inf(self, *a, **k):
        out = real(self, *a, **k)
        out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(model_module.LlavaModel, "forward", always_inf)
    with pytest.raises(FloatingPointError, match="non-finite losses in a row"):
        train.train(config(env, tmp_path / "inf", max_steps=5, max_bad_steps=2), quiet=True)


def test_crash_while_saving_keeps_last_checkpoint(env, tmp_path, monkeypatch):
    out = tmp_path / "c"
    train.train(config(env, out, max_steps=2, save_every=1, stop_after=1), quiet=True)  # killed after step 1
    before = (out / "checkpoint.pt").read_bytes()

    def broken_save(obj, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(train.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train.train(config(env, out, max_steps=2, save_every=1, resume=True), quiet=True)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob("*.tmp"))


def test_bad_paths(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        train.train(config(env, tmp_path / "x", llm=str(tmp_path / "nope")), quiet=True)
    with pytest.raises(FileNotFoundError):
        train.train(config(env, tmp_path / "x", train_json=str(tmp_path / "missing.json")), quiet=True)


def test_stage1_trains_projector_only(env, tmp_path):
    model, _ = train.train(config(env, tmp_path / "s1", stage=1, max_steps=2), quiet=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mm_projector.") for n in trainable)
    assert (tmp_path / "s1" / "mm_projector.bin").is_file() and not (tmp_path / "s1" / "adapter").exists()


def test_dry_run_counts(capsys):
    train.main(["--dry-run"])
    out = capsys.readouterr().out
    # LoRA r=64 on the seven projections of Vicuna-7B, per layer r * (in + out) for q, k, v, o
    # (4096 -> 4096), gate, up (4096 -> 11008) and down (11008 -> 4096)
    assert 32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) == 159_907_840
    assert "159,907,840" in out
    assert "57,358" in out  # the paper's "~57K" DAC
    assert "6,738,415,616" in out and "GiB" in out


@pytest.mark.parametrize("argv, flag", [
    (["--lambdas", "religion=1"], "--lambdas"), (["--lambdas", "race=-1"], "--lambdas"),
    (["--lambdas", "race"], "--lambdas"), (["--max-steps", "-5"], "--max-steps"), (["--stage", "3"], "--stage"),
    (["--batch-size", "0"], "--batch-size"), (["--grad-accum", "0"], "--grad-accum"), (["--epochs", "0"], "--epochs"),
    (["--method", "adversarial"], "--method"), (["--layer", "middle"], "--layer"), (["--h-norm", "z"], "--h-norm"),
    (["--lr", "nan"], "--lr"), (["--report-to", "wandb"], "--report-to")])
def test_bad_flags_are_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") or "error:" in last
    assert flag in last, last


def test_flags_fill_the_nested_configs_once():
    _, cfg = cli.parse_args(["--lambdas", "race=1", "--lora-r", "8", "--layer", "16", "--h-norm", "batch"])
    assert cfg.fair.lambdas == {**FairnessConfig().lambdas, "race": 1.0}  # the others keep their default
    assert cfg.fair.layer == 16 and cfg.fair.h_norm == "batch" and cfg.lora.r == 8
    assert cli.parse_args(cli.to_argv(cfg))[1] == cfg
    assert cli.parse_args([])[1] == train.TrainConfig()  # the defaults are the official recipe


def test_to_argv_of_a_config_read_back_from_config_json():
    # config.json holds tuples as JSON lists: the flags built from it must still give the same run
    _, cfg = cli.parse_args(["--balance-on", "race", "age", "--attributes", "race", "gender"])
    saved = json.loads(json.dumps(asdict(cfg)))
    fair, lora = FairnessConfig(**saved.pop("fair")), LoRAConfig(**saved.pop("lora"))
    back = train.TrainConfig(**saved, fair=fair, lora=lora)
    assert cli.parse_args(cli.to_argv(back))[1] == cfg
