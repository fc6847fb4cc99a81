"""The synthetic benchmark (synthetic.py): the shortcut's direction and size, held-out splits
without it, deterministic films whose race trace can be swapped alone, an exact report labeler,
pixels that leak the demographics, the written folder, and config validation."""

import json
import math
import re

import numpy as np
import pytest
import torch

import data
import synthetic as S
from fairness import fit_linear_probe

WHITE, BLACK = S.RACE_NAMES.index("white"), S.RACE_NAMES.index("black")


def sample(cfg, split, n, seed=0):
    """n cases of `split`, no rendering: (races (n,), ages (n,), males (n,), labels {finding: (n,)})."""
    rng = np.random.default_rng(seed)
    cases = [S.sample_case(rng, cfg, split) for _ in range(n)]
    races, ages, males = (np.array([c[k] for c in cases]) for k in range(3))
    return races, ages, males, {k: np.array([c[3]["labels"][k] for c in cases]) for k in S.FINDINGS}


def close_to(rate, p, n, z=4.5):
    """An empirical rate over n draws is within z binomial standard deviations of p."""
    return abs(rate - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-9


# ----------------------------------------------------------------------------------------------
# who has what: the shortcut in training, none in the held-out splits


def test_shortcut_direction_and_constant_marginal():
    cfg = S.SyntheticConfig()
    rates = [S.train_rate(cfg, r) for r in range(len(S.RACE_NAMES))]
    assert rates[cfg.disadvantaged_race] == pytest.approx(cfg.p_disadvantaged)  # strength 1: the rates as set
    assert all(rates[r] == pytest.approx(cfg.p_others) for r in range(4) if r != cfg.disadvantaged_race)
    assert all(rates[cfg.disadvantaged_race] < rates[r] for r in range(4) if r != cfg.disadvantaged_race)
    m = S.marginal_rate(cfg)
    for s in (0.0, 0.5, 1.0):  # only the dependence on race changes with the strength
        cfg_s = S.SyntheticConfig(shortcut_strength=s)
        assert S.marginal_rate(cfg_s) == pytest.approx(m)
        assert sum(p * S.train_rate(cfg_s, r) for r, p in enumerate(cfg_s.race_p)) == pytest.approx(m)
    zero = S.SyntheticConfig(shortcut_strength=0.0)
    assert all(S.train_rate(zero, r) == pytest.approx(m) for r in range(4))
    half = S.SyntheticConfig(shortcut_strength=0.5)
    assert S.train_rate(half, BLACK) == pytest.approx((m + cfg.p_disadvantaged) / 2)
    assert S.train_rate(S.SyntheticConfig(shortcut_strength=10.0), BLACK) == 0.01  # clipped, never 0


def test_prevalence_per_split():
    cfg = S.SyntheticConfig()
    m = S.marginal_rate(cfg)
    for split in ("pretrain", "val", "test"):
        for race in range(4):
            assert S.prevalence(cfg, split, race) == {**dict.fromkeys(S.SHORTCUT_FINDINGS, m),
                                                      S.CONTROL_FINDING: cfg.p_control}
    assert S.prevalence(cfg, "train", BLACK)["cardiomegaly"] == S.train_rate(cfg, BLACK)
    assert S.prevalence(S.SyntheticConfig(uniform_train=True), "train", BLACK)["cardiomegaly"] == m


@pytest.mark.parametrize("strength", [1.0, 0.0])
def test_sampled_training_cases_follow_train_rate(strength):
    cfg = S.SyntheticConfig(shortcut_strength=strength)
    n = 6000
    races, ages, _, labels = sample(cfg, "train", n)
    for r, p in enumerate(cfg.race_p):  # the training race mix
        assert close_to(np.mean(races == r), p, n)
    for r in range(4):
        n_r = int(np.sum(races == r))
        for k in S.SHORTCUT_FINDINGS:
            assert close_to(labels[k][races == r].mean(), S.train_rate(cfg, r), n_r), (strength, r, k)
        # the control finding has one rate for everyone
        assert close_to(labels[S.CONTROL_FINDING][races == r].mean(), cfg.p_control, n_r), (strength, r)
    if strength == 0:  # no shortcut: every race has the marginal rate
        m = S.marginal_rate(cfg)
        assert all(close_to(labels[k][races == r].mean(), m, int(np.sum(races == r)))
                   for r in range(4) for k in S.SHORTCUT_FINDINGS)
    else:  # the disadvantaged group has findings far less often
        gap = labels["cardiomegaly"][races != BLACK].mean() - labels["cardiomegaly"][races == BLACK].mean()
        assert gap > 0.25
    # age depends on race in training (the cross-attribute dependency), at every strength
    young = [np.mean(ages[races == r] == 0) for r in range(4)]
    assert young[3] - young[0] > 0.2


@pytest.mark.parametrize("split", ["pretrain", "val", "test", "uniform train"])
def test_held_out_splits_are_uniform_without_the_shortcut(split):
    cfg = S.SyntheticConfig(uniform_train=split == "uniform train")
    n = 4000
    races, ages, males, labels = sample(cfg, split.split()[-1], n, seed=1)
    for r in range(4):
        assert close_to(np.mean(races == r), 0.25, n)
    for a in range(3):
        assert close_to(np.mean(ages == a), 1 / 3, n)
    assert close_to(males.mean(), 0.5, n)
    m = S.marginal_rate(cfg)
    for r in range(4):
        n_r = int(np.sum(races == r))
        for k in S.SHORTCUT_FINDINGS:
            assert close_to(labels[k][races == r].mean(), m, n_r), (split, r, k)
        assert close_to(labels[S.CONTROL_FINDING][races == r].mean(), cfg.p_control, n_r)


# ----------------------------------------------------------------------------------------------
# the film


def grating(cfg, race):
    """The race texture as synthetic.py's docstring describes it, written out again here."""
    c = (np.arange(cfg.size) + 0.5) / cfg.size * 2 - 1
    y0, x0 = np.meshgrid(c, c, indexing="ij")
    theta = race * np.pi / 4
    return cfg.race_trace * np.cos(2 * np.pi * 3 * (x0 * np.cos(theta) + y0 * np.sin(theta)))


def test_render_is_deterministic_and_the_race_trace_swaps_alone():
    cfg = S.SyntheticConfig(size=48)
    rng = np.random.default_rng(5)
    for i in range(6):
        race, age, male, f = S.sample_case(rng, cfg, "test")
        img = S.render([9, i], cfg, race, age, male, f)
        assert img.dtype == np.uint8 and img.shape == (48, 48)
        assert img.tobytes() == S.render([9, i], cfg, race, age, male, f).tobytes()
        assert img.tobytes() == S.render([9, i], cfg, race, age, male, f, trace_race=race).tobytes()
        assert not np.array_equal(img, S.render([9, i + 100], cfg, race, age, male, f))  # another stream
        other = (race + 1) % 4
        swapped = S.render([9, i], cfg, race, age, male, f, trace_race=other)
        assert not np.array_equal(img, swapped)
        # away from clipping, the change is the difference of the two gratings, up to rounding
        free = (img > 0) & (img < 255) & (swapped > 0) & (swapped < 255)
        assert free.mean() > 0.7  # the dark corners clip at 0
        diff = swapped.astype(float) - img.astype(float)
        expected = 255 * (grating(cfg, other) - grating(cfg, race))
        assert np.abs(diff - expected)[free].max() <= 1.0 + 1e-3


def test_linear_probe_on_raw_pixels_reads_the_demographics():
    """What the benchmark plants (Gichoya et al.: images leak demographics): a linear probe on
    raw pixels reads race, age and gender well above chance (1/4, 1/3, 1/2) on held-out films."""
    cfg = S.SyntheticConfig(size=32)
    rng = np.random.default_rng(0)
    cases = [S.sample_case(rng, cfg, "test") for _ in range(300)]
    x = torch.tensor(np.stack([S.render([0, i], cfg, *c).ravel() for i, c in enumerate(cases)]),
                     dtype=torch.float32) / 255  # (300, 32 * 32)
    for attr, k, least in (("race", 4, 0.8), ("age", 3, 0.55), ("gender", 2, 0.85)):
        y = torch.tensor([[c[0], c[1], int(c[2])][("race", "age", "gender").index(attr)] for c in cases])
        predict = fit_linear_probe(x[:200], y[:200], k)
        acc = (predict(x[200:]) == y[200:]).float().mean().item()
        assert acc > least, (attr, acc)


# ----------------------------------------------------------------------------------------------
# the report and its labeler


def test_extract_findings_is_exact_on_every_report_template():
    cfg = S.SyntheticConfig(p_others=0.5, p_control=0.5)  # positives and negatives of everything
    rng = np.random.default_rng(0)
    sentences, texts = set(), set()
    for _ in range(3000):
        _, _, _, f = S.sample_case(rng, cfg, "train")
        text = S.report(rng, f)
        assert S.extract_findings(text) == f["labels"], text
        assert 8 <= len(text.split()) <= 60
        sentences.update(re.split(r"(?<=\.)\s+", text))
        texts.add(text)
    # every template was drawn: devices 3 x 2, heart 3 + 2, opacity 4 lobes x 2 + 2, effusion 1 + 2 x 2 + 2
    assert len(sentences) >= 28, sorted(sentences)
    assert len(texts) > 300  # varied reports, not a handful
    assert S.extract_findings("No pacemaker. The heart is not enlarged.") == dict.fromkeys(S.FINDINGS, 0)


def test_finding_rates_groups_the_true_findings():
    labels = lambda c, e: {"cardiomegaly": c, "effusion": e, "opacity": 0, "devices": 1}
    items = [{"race_major": "white", "anchor_age_group": 0, "gender": "F", "findings_labels": labels(1, 0)},
             {"race_major": "white", "anchor_age_group": 2, "gender": "M", "findings_labels": labels(0, 0)},
             {"race_major": "black", "anchor_age_group": 2, "gender": "M", "findings_labels": labels(1, 1)}]
    assert S.finding_rates(items) == {"black": labels(1.0, 1.0), "white": labels(0.5, 0.0)}
    assert S.finding_rates(items, by="age") == {"0": labels(1.0, 0.0), "2": labels(0.5, 0.5)}


# ----------------------------------------------------------------------------------------------
# the written benchmark


TINY = dict(n_pretrain=8, n_train=24, n_val=6, n_test=24, n_swap=6, size=32, vocab_size=300, seed=3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    cfg = S.SyntheticConfig(**TINY)
    return out, cfg, S.make_synthetic(out, cfg)


def test_make_synthetic_writes_every_split_and_its_config(bench):
    out, cfg, splits = bench
    assert set(splits) == {*S.SPLITS, "swap"}
    for split in S.SPLITS:
        assert len(splits[split]) == getattr(cfg, f"n_{split}")
    for split, items in splits.items():
        assert json.loads((out / f"{split}.json").read_text()) == items
        recs = data.read_llava_json(out / f"{split}.json", decode_images=True)  # validated, images decoded
        assert [r["id"] for r in recs] == [it["id"] for it in items]
        assert all(r["attrs"]["race"] in range(4) and r["question"].startswith("<image>") for r in recs)
        assert all(set(it["findings_labels"]) == set(S.FINDINGS) for it in items)
    assert S.SyntheticConfig.from_json(out / "synthetic.json") == cfg
    assert data.load_tokenizer(out).get_vocab_size() <= cfg.vocab_size


def test_swap_split_pairs_white_and_black_with_the_other_trace(bench):
    out, cfg, splits = bench
    test = {it["id"]: it for it in splits["test"]}
    swap = splits["swap"]
    firsts = [it["id"] for it in splits["test"] if it["race_major"] in ("white", "black")][:cfg.n_swap]
    assert [it["id"].replace("swap_", "test_") for it in swap] == firsts  # the first white and black cases
    assert {it["race_major"] for it in swap} == {"white", "black"}
    for it in swap:
        orig = test[it["id"].replace("swap_", "test_")]
        assert it["trace_race"] == {"white": "black", "black": "white"}[it["race_major"]]
        assert "trace_race" not in orig
        same = {k: v for k, v in it.items() if k not in ("id", "image", "trace_race")}
        assert same == {k: v for k, v in orig.items() if k not in ("id", "image")}  # case, report, demographics
        a = np.asarray(data.load_image(out / orig["image"]).convert("L"), dtype=float)
        b = np.asarray(data.load_image(out / it["image"]).convert("L"), dtype=float)
        free = (a > 0) & (a < 255) & (b > 0) & (b < 255)
        race, trace = S.RACE_NAMES.index(it["race_major"]), S.RACE_NAMES.index(it["trace_race"])
        expected = 255 * (grating(cfg, trace) - grating(cfg, race))
        assert np.abs((b - a) - expected)[free].max() <= 1.0 + 1e-3  # only the race texture changed


def test_make_synthetic_is_deterministic_and_held_out_splits_ignore_the_strength(tmp_path):
    cfg = S.SyntheticConfig(**TINY)
    S.make_synthetic(tmp_path / "a", cfg)
    S.make_synthetic(tmp_path / "b", cfg)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5 + 2 + sum(TINY[f"n_{s}"] for s in (*S.SPLITS, "swap"))  # JSON, tokenizer + config, PNGs
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    S.make_synthetic(tmp_path / "seed", S.SyntheticConfig(**{**TINY, "seed": 4}))
    assert (tmp_path / "a" / "test.json").read_bytes() != (tmp_path / "seed" / "test.json").read_bytes()
    # each split has its own stream: only training changes with the shortcut's strength
    S.make_synthetic(tmp_path / "s0", S.SyntheticConfig(**{**TINY, "shortcut_strength": 0.0}))
    for split in ("pretrain", "val", "test", "swap"):
        assert (tmp_path / "a" / f"{split}.json").read_bytes() == (tmp_path / "s0" / f"{split}.json").read_bytes()
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "s0" / "train.json").read_bytes()


def test_command_line(tmp_path, capsys):
    S.main([str(tmp_path / "d"), "--n-pretrain", "4", "--n-train", "8", "--n-val", "4", "--n-test", "8",
            "--n-swap", "2", "--size", "32", "--vocab-size", "300", "--shortcut-strength", "0.5"])
    text = capsys.readouterr().out
    assert text.startswith(f"wrote {tmp_path / 'd'} in ") and "train    n=    8  " in text
    assert S.SyntheticConfig.from_json(tmp_path / "d" / "synthetic.json").shortcut_strength == 0.5
    with pytest.raises(SystemExit) as e:  # a bad value is one line naming the field, exit code 2
        S.main([str(tmp_path / "e"), "--n-train", "-1"])
    assert e.value.code == 2
    assert "error: SyntheticConfig.n_train must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------------------------
# config validation


BAD_CONFIGS = {
    **{f"n_{s}": ({f"n_{s}": -1}, f"SyntheticConfig.n_{s} must be >= 0") for s in (*S.SPLITS, "swap")},
    "strength": ({"shortcut_strength": -0.5}, "SyntheticConfig.shortcut_strength must be a finite number >= 0"),
    "race_p_length": ({"race_p": (0.5, 0.5)}, "SyntheticConfig.race_p"),
    "race_p_sum": ({"race_p": (0.5, 0.3, 0.1, 0.05)}, "SyntheticConfig.race_p"),
    "race_p_negative": ({"race_p": (1.2, -0.2, 0.0, 0.0)}, "SyntheticConfig.race_p"),
    "age_given_race": ({"age_given_race": ((0.5, 0.5, 0.5),) * 4}, "SyntheticConfig.age_given_race"),
    "p_others": ({"p_others": 1.5}, "SyntheticConfig.p_others"),
    "p_control": ({"p_control": -0.1}, "SyntheticConfig.p_control"),
    "disadvantaged_race": ({"disadvantaged_race": 4}, "SyntheticConfig.disadvantaged_race"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_refuses_bad_values(case):
    kw, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        S.SyntheticConfig(**kw)


def test_from_json_refuses_unknown_fields(tmp_path):
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps({"n_train": 5, "shortcut": 1.0}))
    with pytest.raises(ValueError, match=r"synthetic.json: unknown SyntheticConfig fields \['shortcut'\]"):
        S.SyntheticConfig.from_json(path)


# ----------------------------------------------------------------------------------------------
# scoring generated reports: Finding-F1, per-group error rates, the trace swap


def test_finding_f1_is_micro_f1_over_the_shortcut_findings():
    pairs = [  # (hypothesis, reference): (tp, fp, fn) over cardiomegaly / effusion / opacity
        ("Mild cardiomegaly. The lungs are clear. Small right pleural effusion.",  # cardio tp, effusion fp
         "The heart is mildly enlarged. Patchy opacity in the left lower lobe. No pleural effusion."),  # opacity fn
        ("A left-sided pacemaker is in place. Heart size is normal. There is no focal opacity. No pleural effusion.",
         "Heart size is normal. The lungs are clear. There is no pleural effusion."),  # devices are not counted
        ("Mild cardiomegaly. There is a focal opacity in the right upper lobe. Small bilateral pleural effusions.",
         "The cardiac silhouette is enlarged. Patchy opacity in the right upper lobe. "
         "There is a small left pleural effusion."),  # 3 tp
    ]
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    assert S.FINDING_F1.stats(hyps, refs).tolist() == [[1, 1, 1], [0, 0, 0], [3, 0, 0]]
    # tp 4, fp 1, fn 1: F1 = 2 tp / (2 tp + fp + fn) = 8 / 10
    assert S.FINDING_F1(hyps, refs) == pytest.approx(80.0)
    assert S.FINDING_F1.name == "Finding-F1 (shortcut findings)"
    assert S.FINDING_F1(refs, refs) == pytest.approx(100.0)
    assert S.FINDING_F1([pairs[1][0]], [pairs[1][1]]) == 0.0  # nothing to find, nothing found: 0, not NaN
    assert S.FINDING_F1(["Mild cardiomegaly."], ["Heart size is normal."]) == 0.0


ER_ITEMS = [  # (id, race, true cardiomegaly / effusion / opacity / devices, the model's report)
    ("test_00000", "white", (1, 0, 1, 0), "Mild cardiomegaly. The lungs are clear. No pleural effusion."),
    ("test_00001", "white", (0, 1, 0, 1), "Mild cardiomegaly. There is no focal opacity. Small left pleural effusion. "
                                          "ET tube in standard position."),
    ("test_00002", "black", (1, 1, 0, 0), "Heart size is normal. The lungs are clear. No pleural effusion."),
    ("test_00003", "black", (1, 0, 0, 0), "The heart is mildly enlarged. The lungs are clear. No pleural effusion."),
    ("test_00004", "asian", (0, 0, 0, 0), "Patchy opacity in the left upper lobe. Heart size is normal. "
                                          "No pleural effusion. Right IJ line ends in the SVC."),
]


def er_items():
    items = [{"id": i, "race_major": race, "gender": "F" if k % 2 else "M",
              "findings_labels": dict(zip(S.FINDINGS, labels))} for k, (i, race, labels, _) in enumerate(ER_ITEMS)]
    predictions = [{"id": i, "prediction": text} for i, _, _, text in reversed(ER_ITEMS)]  # matched by id, not order
    predictions.append({"id": "test_00099", "prediction": "Mild cardiomegaly."})  # not in the items: ignored
    return predictions, items


def test_error_rates_per_race_and_finding():
    predictions, items = er_items()
    rates = S.error_rates(predictions, items)
    assert list(rates) == ["asian", "black", "white"]

    def r(fnr, fpr, n_pos, n_neg):
        return {"fnr": fnr, "fpr": fpr, "n_pos": n_pos, "n_neg": n_neg}

    assert rates["white"] == {"cardiomegaly": r(0.0, 1.0, 1, 1), "effusion": r(0.0, 0.0, 1, 1),
                              "opacity": r(1.0, 0.0, 1, 1), "devices": r(0.0, 0.0, 1, 1)}
    assert rates["black"] == {"cardiomegaly": r(0.5, 0.0, 2, 0), "effusion": r(1.0, 0.0, 1, 1),
                              "opacity": r(0.0, 0.0, 0, 2), "devices": r(0.0, 0.0, 0, 2)}  # no positives: fnr 0
    assert rates["asian"] == {"cardiomegaly": r(0.0, 0.0, 0, 1), "effusion": r(0.0, 0.0, 0, 1),
                              "opacity": r(0.0, 1.0, 0, 1), "devices": r(0.0, 1.0, 0, 1)}


def test_error_rates_by_another_field():
    predictions, items = er_items()
    rates = S.error_rates(predictions, items, by="gender")
    assert list(rates) == ["F", "M"]  # F: items 1 and 3; M: items 0, 2 and 4
    assert rates["F"]["cardiomegaly"] == {"fnr": 0.0, "fpr": 1.0, "n_pos": 1, "n_neg": 1}
    assert rates["M"]["cardiomegaly"] == {"fnr": 0.5, "fpr": 0.0, "n_pos": 2, "n_neg": 1}


def test_swap_flips_counts_lost_gained_and_changed_per_direction():
    predictions = [
        {"id": "test_00003", "prediction": "Mild cardiomegaly. Patchy opacity in the right lower lobe. "
                                           "No pleural effusion."},  # white: cardio, opacity
        {"id": "test_00004", "prediction": "The heart is mildly enlarged. The lungs are clear. "
                                           "Small bilateral pleural effusions."},  # black: cardio, effusion
        {"id": "test_00005", "prediction": "Heart size is normal. The lungs are clear. No pleural effusion."},  # white
        {"id": "test_00001", "prediction": "Mild cardiomegaly."},  # not swapped: ignored
    ]
    swap_predictions = [
        {"id": "swap_00003", "prediction": "Heart size is normal. Patchy opacity in the right lower lobe. "
                                           "Small right pleural effusion. A left-sided pacemaker is in place."},
        {"id": "swap_00004", "prediction": "The cardiac silhouette is normal in size. There is no focal opacity. "
                                           "There is no pleural effusion."},
        {"id": "swap_00005", "prediction": "Mild cardiomegaly. There is a focal opacity in the left upper lobe. "
                                           "No pleural effusion."},
    ]
    swap_items = [{"id": "swap_00003", "race_major": "white", "trace_race": "black"},
                  {"id": "swap_00004", "race_major": "black", "trace_race": "white"},
                  {"id": "swap_00005", "race_major": "white", "trace_race": "black"}]
    flips = S.swap_flips(predictions, swap_predictions, swap_items)
    assert list(flips) == ["black->white", "white->black"]
    # white->black: 2 reported on the originals (case 3), 1 lost (cardio); 4 not reported, 3 gained
    # (case 3 effusion, case 5 cardio + opacity; case 3's pacemaker is not a shortcut finding); 4 of 6 changed
    assert flips["white->black"] == {"lost": 1 / 2, "gained": 3 / 4, "changed": 4 / 6, "n_cases": 2}
    # black->white: both reported findings lost, the unreported opacity stays unreported
    assert flips["black->white"] == {"lost": 1.0, "gained": 0.0, "changed": 2 / 3, "n_cases": 1}
    # the same reports on both films: nothing flips
    same = [{"id": p["id"].replace("test_", "swap_"), "prediction": p["prediction"]} for p in predictions]
    assert all(v["lost"] == v["gained"] == v["changed"] == 0.0
               for v in S.swap_flips(predictions, same, swap_items).values())


def test_base_seed_fixes_the_readers_across_draws(tmp_path):
    """With base_seed set, a new draw (seed) gives new patients in train / val / test and the same
    pretrain split and tokenizer, so the stand-in base models are the same on every draw
    (docs/benchmark_draws.md); with None the pretrain split follows the draw."""
    S.make_synthetic(tmp_path / "a", S.SyntheticConfig(**{**TINY, "base_seed": 7, "seed": 1}))
    S.make_synthetic(tmp_path / "b", S.SyntheticConfig(**{**TINY, "base_seed": 7, "seed": 2}))
    S.make_synthetic(tmp_path / "c", S.SyntheticConfig(**{**TINY, "base_seed": None, "seed": 1}))
    read = lambda d, f: (tmp_path / d / f).read_bytes()
    for split in ("train", "val", "test"):
        assert read("a", f"{split}.json") != read("b", f"{split}.json")
        assert read("a", f"{split}.json") == read("c", f"{split}.json")  # base_seed touches the pretrain split only
    for f in ("pretrain.json", "tokenizer.json"):
        assert read("a", f) == read("b", f)
    assert read("a", "pretrain.json") != read("c", "pretrain.json")
    with pytest.raises(ValueError, match="base_seed"):
        S.SyntheticConfig(base_seed=-1)
