"""The demo's plumbing (demo.py), without running the demo: flags, the config-keyed folders, the
settings of each method, the seed statistics and the line charts."""

import json
import math
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo
import outputs
from fairness import FairnessConfig
import evaluate
import metrics
from demo import DemoConfig, DemoError


# ----------------------------------------------------------------------------------------------
# flags


def test_parse_args_defaults_are_the_demo_config():
    assert demo.parse_args([]) == DemoConfig()


def test_parse_args_user_flags_win():
    cfg = demo.parse_args(["--lr", "1e-3", "--epochs", "2", "--batch-size", "8", "--lora-r", "4", "--seeds", "0", "1",
                           "--methods", "lora", "fairllava", "--overwrite", "--dir", "runs/x"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.lora_r) == (1e-3, 2.0, 8, 4)
    assert cfg.seeds == (0, 1) and cfg.methods == ("lora", "fairllava")  # tuples, as in DemoConfig
    assert cfg.overwrite is True and cfg.dir == "runs/x"
    changed = {"lr", "epochs", "batch_size", "lora_r", "seeds", "methods", "overwrite", "dir"}
    for f in fields(DemoConfig):  # everything else keeps its default
        if f.name not in changed:
            assert getattr(cfg, f.name) == getattr(DemoConfig(), f.name), f.name


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in fields(DemoConfig):
        assert "--" + f.name.replace("_", "-") in text and f.metadata["help"], f.name


BAD_FLAGS = [
    (["--methods", "nope"], "--methods"),
    (["--methods", "lora", "nope"], "--methods"),
    (["--workers", "0"], "--workers"),
    (["--batch-size", "0"], "--batch-size"),
    (["--variant-dac-steps", "0"], "--variant-dac-steps"),
    (["--lr", "-1"], "--lr"),
    (["--stage1-lr", "0"], "--stage1-lr"),
    (["--variant-dac-lr", "nan"], "--variant-dac-lr"),
    (["--lambda-scale", "-1"], "--lambda-scale"),
    (["--shortcut-strength", "-0.5"], "--shortcut-strength"),
    (["--variant-lambda-scale", "-1"], "--variant-lambda-scale"),
    (["--workers", "two"], "--workers"),  # argparse's own type check
    (["--lambda-scale", "nan"], "--lambda-scale"),
    (["--shortcut-strength", "nan"], "--shortcut-strength"),
    (["--lr", "inf"], "--lr"),
    (["--n-test", "100"], "--n-test"),
    (["--variant-dac-memory", "-1"], "--variant-dac-memory"),
]


@pytest.mark.parametrize("argv, flag", BAD_FLAGS)
def test_parse_args_refuses_bad_values_with_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("demo.py: error: ") and flag in last, err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# config-keyed folders


KEY = {"lr": 0.001, "seed": 0, "methods": ("lora", "fairllava"), "nested": {"dims": (2, 3)}}


def make(folder, key):
    """What a unit of work does when unit() says False: fill the folder, then stamp it."""
    folder.mkdir(parents=True)
    (folder / "model.bin").write_text("weights")
    demo.done(folder, key)


def test_new_folder_is_made_then_reused(tmp_path):
    folder = tmp_path / "run"
    assert demo.unit(folder, KEY, overwrite=False) is False
    make(folder, KEY)
    assert demo.unit(folder, KEY, overwrite=False) is True
    assert demo.unit(folder, dict(KEY), overwrite=True) is True  # same settings: reused even with --overwrite
    assert (folder / "model.bin").read_text() == "weights"


def test_tuples_compare_equal_to_their_json_lists(tmp_path):
    folder = tmp_path / "run"
    make(folder, KEY)
    assert json.loads((folder / "demo_key.json").read_text())["methods"] == ["lora", "fairllava"]
    as_lists = {**KEY, "methods": ["lora", "fairllava"], "nested": {"dims": [2, 3]}}
    assert demo.unit(folder, as_lists, overwrite=False) is True
    assert demo.unit(folder, KEY, overwrite=False) is True


def test_other_settings_are_refused_naming_the_fields(tmp_path):
    folder = tmp_path / "run"
    make(folder, KEY)
    other = {**KEY, "lr": 0.002, "methods": ("lora",), "extra": 1}
    del other["seed"]
    with pytest.raises(DemoError, match=r"\(extra, lr, methods, seed differ\).*--overwrite") as e:
        demo.unit(folder, other, overwrite=False)
    assert str(folder) in str(e.value)
    assert isinstance(e.value, ValueError)  # demo.main's handler prints it as one line
    assert (folder / "model.bin").read_text() == "weights"  # refused: nothing touched
    assert demo.unit(folder, KEY, overwrite=False) is True


def test_overwrite_removes_a_folder_made_with_other_settings(tmp_path):
    folder = tmp_path / "run"
    make(folder, KEY)
    assert demo.unit(folder, {**KEY, "lr": 0.002}, overwrite=True) is False
    assert not folder.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_unfinished_folder_of_the_demo_is_removed(tmp_path, overwrite):
    folder = tmp_path / "run"
    assert demo.unit(folder, KEY, overwrite=overwrite) is False  # the claim is written beside it first
    folder.mkdir()
    (folder / "half_written.bin").write_text("x")  # a run killed before done()
    assert demo.unit(folder, KEY, overwrite=overwrite) is False
    assert not folder.exists()
    make(folder, KEY)
    assert not (tmp_path / "run.demo_unfinished").exists()  # done() drops the claim
    assert demo.unit(folder, KEY, overwrite=overwrite) is True


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_the_demo_did_not_make_is_refused_untouched(tmp_path, overwrite):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match=r"data exists but was not made by the demo"):
        demo.unit(folder, KEY, overwrite=overwrite)
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_file_or_link_in_place_of_a_folder_is_refused(tmp_path, kind):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "thesis.tex").write_text("y")
    folder = tmp_path / "base"
    folder.write_text("a file") if kind == "file" else folder.symlink_to(target)
    with pytest.raises(DemoError, match=r"base is a (file|symbolic link), not a folder"):
        demo.unit(folder, KEY, overwrite=True)
    assert (target / "thesis.tex").read_text() == "y"
    assert folder.is_symlink() or folder.read_text() == "a file"


def test_a_torn_key_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "run"
    make(folder, KEY)
    (folder / "demo_key.json").write_text('{"lr": 0.001, ')
    with pytest.raises(DemoError, match=r"run/demo_key.json: not readable JSON"):
        demo.unit(folder, KEY, overwrite=True)
    assert (folder / "model.bin").read_text() == "weights"


def test_outputs_are_written_only_over_the_demos_own(tmp_path):
    demo.write_output(tmp_path, "results.md", lambda p: p.write_text("run 1"))
    outputs.check(tmp_path, demo.OUTPUTS, "the demo")  # the demo's own file: may be replaced
    demo.write_output(tmp_path, "results.md", lambda p: p.write_text("run 2"))
    assert (tmp_path / "results.md").read_text() == "run 2"
    (tmp_path / "results.md").write_text("edited by hand")
    (tmp_path / "summary.json").write_text("the user's")
    for name in ("results.md", "summary.json"):
        with pytest.raises(outputs.OutputError, match=rf"{name} was not written by the demo"):
            outputs.check(tmp_path, [name], "the demo")
        with pytest.raises(outputs.OutputError, match=rf"{name} was not written by the demo"):
            demo.write_output(tmp_path, name, lambda p: p.write_text("x"))
    assert (tmp_path / "results.md").read_text() == "edited by hand"
    assert (tmp_path / "summary.json").read_text() == "the user's"


# ----------------------------------------------------------------------------------------------
# the methods


def effective(cfg, method, tmp_path=Path("/nonexistent")):
    """The stage-2 TrainConfig the demo trains `method` with."""
    paths = {"base": tmp_path / "base", "data": tmp_path / "data", "stage1": tmp_path / "stage1"}
    return demo.train_config(cfg, paths, 0, 2, tmp_path / "out", **demo.method_settings(cfg, method))


def test_paper_protocol_uses_the_official_lambdas_times_the_scale_and_raw_h():
    """Algorithm 1 as the paper writes it; phi at the backbone's lr and initialised N(0, 0.02), as in
    the official code (the paper gives neither)."""
    official = FairnessConfig().lambdas
    cfg = DemoConfig(lambda_scale=0.5, lr=2e-3)
    t = effective(cfg, "fairllava")
    assert t.method == "fairllava"
    assert t.fair.lambdas == {a: v * 0.5 for a, v in official.items()}
    assert t.fair.h_norm == "none" and t.dac_lr == 2e-3 == t.lr and t.fair.dac_init == "normal"
    assert (t.fair.protocol, t.fair.pool, t.fair.smooth_abs) == ("alternating", "mean", True)  # official penalty
    assert t.fair.dac_steps == FairnessConfig().dac_steps and t.fair.dac_memory == FairnessConfig().dac_memory  # the paper's step
    assert effective(DemoConfig(), "fairllava").fair.lambdas == official  # default scale 1


def test_batch_variant_uses_its_own_settings():
    official, cfg = FairnessConfig().lambdas, DemoConfig()
    t = effective(cfg, "fairllava_batch")
    assert t.method == "fairllava" and t.fair.h_norm == "batch"
    assert (t.dac_lr, t.fair.dac_steps) == (cfg.variant_dac_lr, cfg.variant_dac_steps)
    assert t.fair.dac_memory == getattr(cfg, "variant_dac_memory", FairnessConfig().dac_memory)
    assert t.fair.lambdas == pytest.approx({a: v * cfg.variant_lambda_scale for a, v in official.items()})
    # --lambda-scale is the paper protocol's; the variant has its own
    assert effective(DemoConfig(lambda_scale=3.0), "fairllava_batch").fair.lambdas == t.fair.lambdas
    assert effective(DemoConfig(variant_lambda_scale=0.0), "fairllava_batch").fair.lambdas == dict.fromkeys(official, 0.0)


def test_official_code_arm_trains_as_the_official_code():
    """REFERENCE.md: one optimizer step (phi in the same AdamW at the backbone's lr), one random image
    token per sample L2-normalised, smooth |CLUB|, phi initialised as HF does (normal, std 0.02)."""
    cfg = DemoConfig(lr=2e-3, lambda_scale=0.5)
    t = effective(cfg, "fairllava_official")
    assert t.method == "fairllava" and t.dac_lr == cfg.lr
    f = t.fair
    assert (f.protocol, f.pool, f.h_norm, f.smooth_abs, f.dac_init) == ("single_step", "random_token", "l2", True, "normal")
    assert f.lambdas == {a: v * 0.5 for a, v in FairnessConfig().lambdas.items()}
    assert (f.layer, f.tokens, f.dac_weight) == ("mid", "image", 1.0)


def test_official_init_of_phi():
    from fairness import FairnessRegularizer
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reg = FairnessRegularizer(FairnessConfig(dac_init="normal"), 4096)
    w = torch.cat([h.weight.flatten() for h in reg.dac.heads.values()])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert all((h.bias == 0).all() for h in reg.dac.heads.values())
    with pytest.raises(ValueError, match="dac_init"):
        FairnessConfig(dac_init="xavier")


@pytest.mark.parametrize("method", ["lora", "resample", "reweight"])
def test_baselines_are_plain(method):
    assert demo.method_settings(DemoConfig(lambda_scale=7.0), method) == {"method": method}
    t = effective(DemoConfig(), method)
    assert t.method == method and t.fair.h_norm == FairnessConfig().h_norm


@pytest.mark.parametrize("arm", list(demo.FAIR_ARMS))
def test_lambda_zero_arm_is_its_arm_with_every_lambda_zero(arm):
    cfg = DemoConfig()
    on, off = effective(cfg, arm), effective(cfg, arm + "_l0")
    assert set(off.fair.lambdas.values()) == {0.0} and min(on.fair.lambdas.values()) > 0
    assert off.fair.dac_weight == on.fair.dac_weight == 1.0  # phi still trains
    assert replace(off, fair=replace(off.fair, lambdas=on.fair.lambdas)) == on  # nothing else differs


def test_monitor_is_off_unless_asked_and_leaves_everything_else_alone():
    paths = {"base": Path("/b"), "data": Path("/d"), "stage1": Path("/s")}
    on = demo.train_config(DemoConfig(), paths, 0, 2, Path("/o"), monitor=True)
    off = demo.train_config(DemoConfig(), paths, 0, 2, Path("/o"), monitor=False)
    assert on.monitor_json == "/d/val.json" and off.monitor_json == ""
    assert replace(off, monitor_json=on.monitor_json) == on


def test_the_arms_table_reads_the_settings_the_demo_trains_with():
    rows = {r[0]: r for r in demo.arms_rows(DemoConfig(lr=2e-3))}
    assert set(rows) == {demo.LABELS[m] for m in demo.HEADLINE_ARMS}
    official = rows[demo.LABELS["fairllava_official"]]
    assert official[1:8] == ["single_step", "random_token, l2", "0.002", "1 x, memory 0", "normal", "sqrt(CLUB² + eps)",
                             "0.2 / 0.6 / 0.1"]
    assert rows[demo.LABELS["fairllava_batch"]][7] == "0.06 / 0.18 / 0.03"


def test_every_method_has_a_label_and_the_defaults_are_valid():
    assert set(DemoConfig().methods) <= set(demo.LABELS)
    for m in demo.LABELS:
        assert effective(DemoConfig(), m).method in ("lora", "resample", "reweight", "fairllava")


# ----------------------------------------------------------------------------------------------
# statistics over seeds


def test_mean_ci_of_one_value_has_no_interval():
    mu, half = demo.mean_ci([3.5])
    assert mu == 3.5 and math.isnan(half)


def test_mean_ci_is_a_t_interval():
    mu, half = demo.mean_ci([1.0, 2.0, 3.0])  # sample sd 1, t(0.975, 2 df) = 4.3027
    assert mu == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    mu, half = demo.mean_ci([1.0, 3.0])  # sd sqrt(2), t = 12.7062
    assert mu == 2.0 and half == pytest.approx(12.706205, rel=1e-6)
    assert demo.mean_ci(np.full(4, 7.0)) == (7.0, 0.0)
    v = np.arange(12.0)  # 12 seeds: t(0.975, 11) = 2.2010, not the normal 1.96 used before for n > 10
    assert demo.mean_ci(v)[1] == pytest.approx(2.200985 * v.std(ddof=1) / math.sqrt(12), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the line charts


def test_draw_lines_writes_a_png_with_every_series(tmp_path):
    nan = float("nan")
    panels = [("probe", {"LoRA": [(0, 0.5), (25, nan), (50, 0.7)], "FairLLaVA": [(25, 0.4)]}),  # NaN point, one point
              ("flat", {"LoRA": [(0, 1.0), (50, 1.0)], "FairLLaVA": [(25, nan)]})]  # constant; a NaN-only series
    path = tmp_path / "curves.png"
    demo.draw_lines(panels, path, "title", "step")
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (3 * 420, 70 + 300)  # 3 panels per row, one row
    # below the legend, in the first panel: both series are drawn in their colours
    first = np.asarray(img.convert("RGB"))[100:, :420].reshape(-1, 3)
    colours = {tuple(c) for c in first}
    assert evaluate.COLORS[0] in colours and evaluate.COLORS[1] in colours


def test_draw_lines_grows_a_row_per_three_panels_and_skips_empty_panels(tmp_path):
    panels = [(f"p{i}", {"a": [(0, float(i)), (1, i + 1.0)]}) for i in range(4)] + [("empty", {"a": []})]
    demo.draw_lines(panels, tmp_path / "grid.png", "title", "step")
    assert Image.open(tmp_path / "grid.png").size == (3 * 420, 70 + 2 * 300)


# ----------------------------------------------------------------------------------------------
# the report


HEADLINE = {"BLEU4": "BLEU-4", "F1": "CheXpert-F1 (micro)", "FindF1": "Finding-F1 (shortcut findings)"}


def fake_results(gap, score=60.0, probe=40.0):
    """The parts of one run's evaluation (evaluate.score + probe, error rates, swap) the report reads."""
    report = lambda: {"m_all": score, "gap": gap, "es": score / (1 + gap / 100),
                      "ci": {"m_all": [score - 1, score + 1], "gap": [gap - 1, gap + 1], "es": [50.0, 60.0]},
                      "groups": {"white": {"score": score + gap, "n": 600, "small": False, "ci": [55.0, 70.0]},
                                 "black": {"score": score, "n": 600, "small": False, "ci": [50.0, 65.0]}}}
    rates = {"fnr": 0.25, "fpr": 0.1, "n_pos": 8, "n_neg": 10}
    return {"headline": dict(HEADLINE), "overall": {n: {"score": score, "ci": [score - 2, score + 2]}
                                                    for n in HEADLINE.values()},
            "fairness": {"race": {n: report() for n in HEADLINE.values()}},
            "probe": {"race": {"accuracy": probe}},
            "error_rates": {g: dict.fromkeys(("cardiomegaly", "effusion", "opacity", "devices"), rates)
                            for g in ("black", "white")},
            "swap": {"white->black": {"lost": 0.5, "gained": 0.25, "changed": 0.125, "n_cases": 4}}}


def test_write_report_tables_summary_and_curves(tmp_path, capsys):
    gaps = {(1, 0, "lora"): 10.0, (1, 1, "lora"): 12.0, (1, 0, "fairllava"): 4.0, (1, 1, "fairllava"): 8.0}
    results = {k: fake_results(g) for k, g in gaps.items()}
    for s in (0, 1):
        for m in ("lora", "fairllava"):  # the mechanism, as train.py's monitor logs it
            (tmp_path / "draw1" / f"seed{s}" / m).mkdir(parents=True)
            (tmp_path / "draw1" / f"seed{s}" / m / "monitor.jsonl").write_text("\n".join(json.dumps(
                {"step": t, "probe/race": 0.5 + s / 10, "dac_acc/race": 0.4, "club/race": 0.1, "h_rms": 1.0})
                for t in (0, 25)))
    demo.write_report(DemoConfig(seeds=(0, 1)), tmp_path, results, ["lora", "fairllava", "reweight"],
                      curves=[(1, 0), (1, 1)])
    md = (tmp_path / "results.md").read_text()
    assert "| metric | LoRA (LLaVA-Rad baseline) | FairLLaVA (paper protocol) |" in md  # reweight: no results
    lo, hi = demo.mean_ci([10.0, 12.0]), demo.mean_ci([4.0, 8.0])
    assert f"| Δ-FindF1(R) | {lo[0]:.2f} ± {lo[1]:.2f} | {hi[0]:.2f} ± {hi[1]:.2f} |" in md
    d = demo.mean_ci([4.0 - 10.0, 8.0 - 12.0])  # paired: per-run differences
    assert (f"| FairLLaVA (paper protocol) | Δ Finding-F1, race | {d[0]:+.2f} ± {d[1]:.2f} | "
            f"[{d[0] - d[1]:+.2f}, {d[0] + d[1]:+.2f}] | no difference shown | 2/2 | -6.0 … -4.0 |") in md
    # the key numbers: the disadvantaged group against the others, the swap in percent, over runs
    assert f"| Δ Finding-F1, race | {lo[0]:.1f} ± {lo[1]:.1f} | {hi[0]:.1f} ± {hi[1]:.1f} |" in md
    assert "| Finding-F1, black patients | 60.0 ± 0.0 | 60.0 ± 0.0 |" in md
    assert "| Finding-F1, other races (mean) | 71.0 ± 12.7 | 66.0 ± 25.4 |" in md  # white = 60 + gap
    assert "| trace swap: findings lost, white→black | 50.0 ± 0.0 | 50.0 ± 0.0 |" in md
    d = demo.mean_ci([(60 + 4.0) - (60 + 10.0), (60 + 8.0) - (60 + 12.0)])
    assert f"| FairLLaVA (paper protocol) | Finding-F1, other races (mean) | {d[0]:+.2f} ± {d[1]:.2f} |" in md
    assert "| black | 0.25 / 0.10 |" in md and "| LoRA (LLaVA-Rad baseline) | white->black | 0.500 ± 0.000 |" in md
    assert "| LoRA (LLaVA-Rad baseline) | 0/2 | 60.0 |" in md  # nobody collapsed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"lora", "fairllava"}
    assert summary["runs"]["fairllava"]["draw1/seed1"]["fairness"]["race"]["Finding-F1 (shortcut findings)"]["gap"] == 8.0
    assert summary["config"]["seeds"] == [0, 1]
    assert Image.open(tmp_path / "curves.png").format == "PNG"
    assert "results.md" in capsys.readouterr().out


def test_paired_bootstrap_rows_read_each_runs_predictions(tmp_path):
    """Per run: the change in the race gap against LoRA on the same test cases, with its paired
    interval; a method that drops black patients' findings widens the gap, significantly."""
    import synthetic
    cfg = synthetic.SyntheticConfig(n_pretrain=8, n_train=8, n_val=4, n_test=240, n_swap=4, size=32, vocab_size=300)
    synthetic.make_synthetic(tmp_path / "draw1" / "data", cfg)
    items = json.loads((tmp_path / "draw1" / "data" / "test.json").read_text())
    answer = lambda it: it["conversations"][1]["value"]
    for m, text in (("lora", answer), ("fairllava", lambda it: "No acute findings." if it["race_major"] == "black" else answer(it))):
        (tmp_path / "draw1" / "seed0" / m / "eval").mkdir(parents=True)
        (tmp_path / "draw1" / "seed0" / m / "eval" / "predictions_test.jsonl").write_text("".join(
            json.dumps({"id": it["id"], "prediction": text(it)}) + "\n" for it in items))
    [[name, cell]] = demo.paired_bootstrap_rows(tmp_path, ["lora", "fairllava"], [(1, 0)], n_resamples=50)
    assert name == "draw 1, seed 0" and cell.startswith("+100.0 [") and cell.endswith("*")


def test_collapse_counts_runs_below_the_threshold():
    results = {(1, s, "fairllava"): fake_results(5.0, score=sc) for s, sc in enumerate((60.0, demo.COLLAPSE - 1, 50.0))}
    [row] = demo.collapse_rows(results, ["fairllava"], [(1, 0), (1, 1), (1, 2)])
    assert row[1:3] == ["1/3", f"{demo.COLLAPSE - 1:.1f}"]


def test_one_run_key_table_gives_the_race_gap_its_bootstrap_interval(tmp_path):
    demo.write_report(DemoConfig(), tmp_path, {(1, 0, "lora"): fake_results(10.0)}, ["lora"])
    md = (tmp_path / "results.md").read_text()
    assert "| Δ Finding-F1, race | 10.0 [9.0, 11.0] |" in md and "| ES-Finding-F1, race | 54.5 |" in md
    assert "Paired differences" not in md


def test_band_is_mean_and_range_over_runs_at_shared_steps():
    runs = [[{"step": 0, "x": 1.0}, {"step": 25, "x": 3.0}], [{"step": 0, "x": 3.0}, {"step": 25, "x": 5.0},
                                                               {"step": 50, "x": 9.0}]]
    assert demo._band(runs, "x") == [(0, 2.0, 1.0, 3.0), (25, 4.0, 3.0, 5.0)]


def test_draw_lines_draws_error_bars_on_an_even_categorical_axis(tmp_path):
    panels = [("gap", {"a": [(i, 10.0 - i, 8.0 - i, 12.0 - i) for i in range(4)]})]
    demo.draw_lines(panels, tmp_path / "t.png", "title", "scale", xticks=[(0, "0"), (1, "0.1"), (2, "0.3"), (3, "1")])
    img = np.asarray(Image.open(tmp_path / "t.png").convert("RGB"))[100:, :420]
    cols = np.flatnonzero((img == evaluate.COLORS[0]).all(-1).any(0))
    assert cols.max() - cols.min() > 200  # the four points spread over the panel


def test_a_copied_dir_is_reused_as_it_stands(tmp_path):
    """Keys with paths under the --dir compare relative to it: a copy of runs/demo is reused."""
    a, b = tmp_path / "a", tmp_path / "b"
    key = {"out": str(a / "seed0" / "lora"), "train_json": str(a / "data" / "train.json"), "other": "/elsewhere/x"}
    (a / "seed0" / "lora").mkdir(parents=True)
    demo.done(a / "seed0" / "lora", key, a)
    stored = json.loads((a / "seed0" / "lora" / "demo_key.json").read_text())
    assert stored["out"] == "$DIR/seed0/lora" and stored["other"] == "/elsewhere/x"
    import shutil
    shutil.copytree(a, b)
    moved = {"out": str(b / "seed0" / "lora"), "train_json": str(b / "data" / "train.json"), "other": "/elsewhere/x"}
    assert demo.unit(b / "seed0" / "lora", moved, False, b) is True
    with pytest.raises(DemoError, match="other"):
        demo.unit(b / "seed0" / "lora", {**moved, "other": "/elsewhere/y"}, False, b)


# ----------------------------------------------------------------------------------------------
# the demo at the command line never deletes or overwrites what it did not write


def demo_refusal(args, cwd):
    r = subprocess.run([sys.executable, str(Path(demo.__file__)), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("demo.py: error: "), r.stderr
    return lines[0]


def test_demo_refuses_folders_and_files_of_the_user(tmp_path):
    d = tmp_path / "D"
    (d / "draw1" / "data").mkdir(parents=True)
    (d / "base").mkdir()
    (d / "draw1" / "data" / "notes.txt").write_text("x")
    (d / "base" / "thesis.tex").write_text("y")
    (d / "results.md").write_text("my results")
    message = demo_refusal(["--dir", str(d), "--n-test", "240", "--workers", "1"], tmp_path)
    assert f"{d / 'results.md'} was not written by the demo" in message
    (d / "results.md").unlink()
    message = demo_refusal(["--dir", str(d), "--n-test", "240", "--workers", "1"], tmp_path)
    assert f"{d / 'draw1' / 'data'} exists but was not made by the demo" in message
    assert (d / "draw1" / "data" / "notes.txt").read_text() == "x" and (d / "base" / "thesis.tex").read_text() == "y"
    assert sorted(p.name for p in d.iterdir()) == ["base", "draw1"]


def test_axes_step_at_round_values():
    assert [evaluate.round_step(s) for s in (1.0, 0.385, 42.1, 100.0, 375.0, 8.87)] == [0.2, 0.1, 10.0, 20.0, 100.0, 2.0]


def test_a_long_legend_wraps_onto_a_second_line_and_open_markers_stay_white_inside(tmp_path):
    names = [f"a rather long series name number {i}" for i in range(6)]
    panels = [("p", {n: [(0, 1.0 + i), (1, 2.0 + i)] for i, n in enumerate(names)})]
    demo.draw_lines(panels, tmp_path / "wide.png", "title", "step", hollow={names[0]})
    img = Image.open(tmp_path / "wide.png")
    assert img.size[1] > 70 + 300  # the panels moved down to make room for the legend's second line
    legend = np.asarray(img.convert("RGB"))[42:57, 15:32]  # the first legend key: outlined, white inside
    assert (legend[7, 8] == 255).all() and (legend[0, 0] == evaluate.COLORS[0]).all()


def test_paired_rows_are_per_run_differences_with_a_t_interval_and_say_no_difference_when_it_holds_0(monkeypatch):
    monkeypatch.setattr(demo, "key_numbers", lambda r: r)  # the runs below are their key numbers already
    units = [(1, 10), (1, 11), (2, 10), (2, 11)]
    gap, whole = "Δ Finding-F1, race", "Finding-F1, whole test set"
    base = {u: {gap: 30.0 + i, whole: 60.0 - i} for i, u in enumerate(units)}
    results = {u + ("lora",): base[u] for u in units}
    results |= {u + ("fairllava",): {gap: base[u][gap] - d, whole: base[u][whole] + e}
                for u, d, e in zip(units, (10.0, 12.0, 14.0, 16.0), (-1.0, 1.0, -2.0, 2.0))}
    results |= {u + ("fairllava_batch",): {gap: results[u + ("fairllava",)][gap] - 1.0, whole: 40.0} for u in units}
    rows = demo.paired_rows(results, ["lora", "fairllava"], units, (gap, whole))
    diffs = np.array([-10.0, -12.0, -14.0, -16.0])
    half = metrics.t_quantile(0.975, 3) * diffs.std(ddof=1) / 2
    assert rows[0][:2] == [demo.LABELS["fairllava"], gap]
    assert rows[0][2] == f"{-13.0:+.2f} ± {half:.2f}" and rows[0][4] == "lower" and rows[0][5] == "4/4"
    assert rows[0][6] == "-16.0 … -10.0"
    assert rows[1][1] == whole and rows[1][4] == "no difference shown" and rows[1][5] == "2/4"
    # against another arm: the same differences taken from that arm, not from LoRA
    rows = demo.paired_rows(results, ["fairllava_batch"], units, (gap,), against="fairllava")
    assert rows[0][2].startswith("-1.00 ± 0.00") and rows[0][5] == "4/4"
