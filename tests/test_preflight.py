"""train.py --preflight and evaluate.py --preflight: a clean set of inputs passes (exit 0), and each
kind of planted problem is caught with its one line on stderr (exit 2), without loading a tensor
and without writing in --out."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
import train
from lora import LoRAConfig, apply_lora, save_peft_adapter
from model import Llama, LlamaConfig, build_projector
from preflight import read_safetensors_header
from train_env import make_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = make_env(tmp_path_factory.mktemp("preflight"))
    # stage-2 inputs in the official layouts: a stage-1 projector and a PEFT adapter (r 4, alpha 8)
    torch.manual_seed(0)
    proj = build_projector(32, 64)
    torch.save({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}, env / "mm_projector.bin")
    write_adapter(env / "adapter", LoRAConfig.tiny())
    return env


def write_adapter(folder, cfg, vocab=300):
    llm = Llama(LlamaConfig.tiny(vocab_size=vocab))
    apply_lora(llm, cfg)
    save_peft_adapter(llm, str(folder), cfg)


def train_argv(env, out, **kw):
    flags = {"llm": env / "llm", "vision": env / "vision", "vision-heads": 2, "tokenizer": env / "data" / "tokenizer.json",
             "train-json": env / "data" / "train.json", "projector": env / "mm_projector.bin", "adapter": env / "adapter",
             "out": out, "method": "lora", "lora-r": 4, "lora-alpha": 8, "batch-size": 4, "grad-accum": 1,
             "max-length": 256}
    flags.update({k.replace("_", "-"): v for k, v in kw.items()})
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))] + ["--preflight", "--world-size", "1"]


def run(main, argv, capsys):
    """(exit status, stdout table, stderr problem lines) of a preflight."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, [line for line in err.splitlines() if line]


def copy_part(env, tmp_path, name):
    shutil.copytree(env / name, tmp_path / name)
    return tmp_path / name


def test_clean_train_run_passes(env, tmp_path, capsys):
    code, table, err = run(train.main, train_argv(env, tmp_path / "out"), capsys)
    assert code == 0 and err == [], table
    for row in ("llm checkpoint", "vision checkpoint", "projector", "adapter", "tokenizer", "image size",
                "train json", "batches per rank", "out folder"):
        assert any(line.startswith(row) and " ok " in line for line in table.splitlines()), (row, table)
    assert "race: white 12, black 7, asian 5" in table  # the per-group counts
    assert "gpu memory" in table and ("(no GPU)" in table or torch.cuda.is_available())
    assert not (tmp_path / "out").exists()  # --out is only tested for writability, never created


def test_clean_evaluate_run_passes(env, tmp_path, capsys):
    argv = ["--llm", str(env / "llm"), "--vision", str(env / "vision"), "--vision-heads", "2",
            "--tokenizer", str(env / "data" / "tokenizer.json"), "--projector", str(env / "mm_projector.bin"),
            "--adapter", str(env / "adapter"), "--test-json", str(env / "data" / "test.json"),
            "--out", str(tmp_path / "eval"), "--min-group-size", "1", "--attributes", "gender", "--preflight"]
    code, table, err = run(evaluate.main, argv, capsys)
    assert code == 0 and err == [], table
    assert not (tmp_path / "eval").exists()
    # the same test set is too small for the default --min-group-size of 30
    code, _, err = run(evaluate.main, argv[:-5] + ["--preflight"], capsys)
    assert code == 2 and len(err) == 1 and "group sizes: attribute 'race': fewer than two groups" in err[0], err


def _llm_with(env, tmp_path, key, shape):
    folder = copy_part(env, tmp_path, "llm")
    sd = load_file(folder / "model.safetensors")
    sd[key] = torch.zeros(shape)
    save_file(sd, folder / "model.safetensors")
    return folder


def _vision_with(env, tmp_path, key, shape):
    folder = copy_part(env, tmp_path, "vision")
    sd = torch.load(folder / "open_clip_pytorch_model.bin")
    sd[key] = torch.zeros(shape)
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    return folder


def _small_llm(env, tmp_path):
    from checkpoint import save_llama
    save_llama(Llama(LlamaConfig.tiny(vocab_size=256)), tmp_path / "llm")
    write_adapter(tmp_path / "adapter", LoRAConfig.tiny(), vocab=256)
    return {"llm": tmp_path / "llm", "adapter": tmp_path / "adapter"}


def _image_config(env, tmp_path):
    folder = copy_part(env, tmp_path, "vision")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": {"image_size": 64}}}))
    return {"vision": folder}


def _data_with(env, tmp_path, change):
    data = copy_part(env, tmp_path, "data")
    items = json.loads((data / "train.json").read_text())
    change(data, items)
    (data / "train.json").write_text(json.dumps(items))
    return {"train-json": data / "train.json"}


def _truncate_image(data, items):
    img = data / items[5]["image"]
    img.write_bytes(img.read_bytes()[:len(img.read_bytes()) // 2])  # header intact, pixels cut


def _unknown_race(data, items):
    items[3]["race_major"] = "martian"


def _out_under_a_file(env, tmp_path):
    (tmp_path / "afile").write_text("x")
    return {"out": tmp_path / "afile" / "run"}


PLANTED = {
    "missing path": (lambda env, t: {"vision": t / "nowhere"},
                     "path --vision: {t}/nowhere: no such file or folder"),
    "wrong llm shape": (lambda env, t: {"llm": _llm_with(env, t, "model.layers.1.mlp.up_proj.weight", (100, 64))},
                        "llm checkpoint: {t}/llm: checkpoint does not match the model; shape mismatches: "
                        "model.layers.1.mlp.up_proj.weight: checkpoint (100, 64) vs model (128, 64)"),
    "wrong vision shape": (lambda env, t: {"vision": _vision_with(env, t, "visual.trunk.blocks.2.mlp.fc1.weight", (48, 32))},
                           "vision checkpoint: {t}/vision/open_clip_pytorch_model.bin: checkpoint does not match the model; "
                           "shape mismatches: blocks.2.mlp.fc1.weight: checkpoint (48, 32) vs model (64, 32)"),
    "projector shape": (lambda env, t: torch.save({f"model.mm_projector.{k}": v for k, v in build_projector(48, 64).state_dict().items()},
                                                  t / "p.bin") or {"projector": t / "p.bin"},
                        "projector: {t}/p.bin: checkpoint does not match the model; shape mismatches: "
                        "0.weight: checkpoint (64, 48) vs model (64, 32)"),
    "adapter rank": (lambda env, t: write_adapter(t / "a", LoRAConfig.tiny(r=8, alpha=16.0)) or {"adapter": t / "a"},
                     "adapter: {t}/a/adapter_config.json: r 8 vs the flags' 4; lora_alpha 16.0 vs the flags' 8.0"),
    "adapter targets": (lambda env, t: write_adapter(t / "a", LoRAConfig.tiny(targets=("q_proj", "v_proj"))) or {"adapter": t / "a"},
                        "adapter: {t}/a/adapter_config.json: target_modules ['q_proj', 'v_proj'] vs the flags' "
                        "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    "tokenizer too big": (_small_llm, "tokenizer: {env}/data/tokenizer.json: vocabulary of 300 tokens is larger than "
                                      "the embedding matrix (256 rows): ids 256..299 would index past it"),
    "image size": (_image_config, "image size: {t}/vision/open_clip_config.json: image_size 64 but the tower's pos_embed "
                                  "holds a 4x4 grid of 8-px patches (32 px)"),
    "truncated image": (lambda env, t: _data_with(env, t, _truncate_image),
                        "train json: {t}/data/train.json: item 'train_00005': field 'image': unreadable image "
                        "{t}/data/images/train/train_00005.png"),
    "unknown demographic": (lambda env, t: _data_with(env, t, _unknown_race),
                            "train json: {t}/data/train.json: item 'train_00003': field 'race_major': unknown race 'martian'"),
    "world size": (lambda env, t: {"world-size": 8},
                   "batches per rank: {env}/data/train.json: 24 samples give 3 per rank on 8 rank(s), fewer than one "
                   "step's --batch-size 4 x --grad-accum 1 = 4"),
    "unwritable out": (_out_under_a_file, "out folder: --out {t}/afile/run: {t}/afile is a file, not a folder"),
}


@pytest.mark.parametrize("kind", list(PLANTED))
def test_planted_problem_is_one_line(env, tmp_path, capsys, kind):
    plant, expected = PLANTED[kind]
    overrides = plant(env, tmp_path)
    world = overrides.pop("world-size", 1)
    argv = train_argv(env, overrides.pop("out", tmp_path / "out"), **overrides)
    argv[-1] = str(world)  # --world-size, the last flag
    code, table, err = run(train.main, argv, capsys)
    assert code == 2, table
    assert len(err) == 1, err  # one problem, one line
    expected = expected.format(t=tmp_path, env=env)
    assert err[0].startswith("train.py: preflight: " + expected), (err[0], table)
    # printed once: the table's row says where the problem is, not the problem again
    row, detail = expected.split(": ", 1)
    assert detail not in table and any(line.startswith(row) and line.split()[-3:] == ["problem", "(on", "stderr)"]
                                       for line in table.splitlines()), table


def test_a_hub_id_not_in_the_cache_says_what_to_run(env, tmp_path, capsys):
    """huggingface_hub's own advice (pass local_files_only=False) is no flag of ours."""
    pytest.importorskip("huggingface_hub")
    repo = "preflight-test/not-downloaded"
    code, table, err = run(train.main, train_argv(env, tmp_path / "out", llm=repo), capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"train.py: preflight: path --llm: {repo}: not a local path, and not (completely) in "
                             "the local hub cache; the preflight never downloads. Download it first: python3 -c "
                             f"\"from huggingface_hub import snapshot_download; snapshot_download('{repo}', "
                             "allow_patterns=['*.json', '*.safetensors', '*.bin', 'tokenizer*'])\"; or pass a local "
                             "folder instead of the id"), err[0]
    assert "local_files_only" not in err[0] + table


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out(env, tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    code, _, err = run(train.main, train_argv(env, tmp_path / "ro" / "run"), capsys)
    assert code == 2 and len(err) == 1 and "out folder: --out" in err[0] and "cannot write" in err[0], err


def test_sparse_and_truncated_safetensors(tmp_path):
    """Headers are read, data is not: a sparse file checks in full; a cut file is named as cut."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1000, 100)}, path)
    assert read_safetensors_header(path) == {"a": ("F32", (1000, 100))}
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors_header(path)


def test_sharded_bin_layout_is_checked_on_meta(tmp_path):
    """pytorch_model.bin.index.json + pickled shards: shapes read onto the meta device."""
    from preflight import check_llama_files
    from test_model import random_llama, write_vicuna_bin_layout
    write_vicuna_bin_layout(random_llama(LlamaConfig.tiny()), tmp_path)
    cfg, sd = check_llama_files(tmp_path)
    assert cfg.hidden_size == 64 and all(v.device.type == "meta" for v in sd.values())
