"""Tests for metrics.py: parity with sacreBLEU and rouge_score, hand-checked worked examples,
labeler cases with negation and uncertainty, ES-M and the fairness tables, bad input."""

import doctest
import math
import random
import time
import warnings

import numpy as np
import pytest

import metrics as M


def sacre_bleu(**kw):
    # sacreBLEU is the test-only oracle: without it the parity tests skip, the others still run
    return pytest.importorskip("sacrebleu.metrics").BLEU(**kw)


def sacre_corpus(hyps, refs, n):
    return sacre_bleu(max_ngram_order=n).corpus_score(hyps, [refs]).score


def test_docstring_examples():
    # the worked examples in metrics.py's docstrings are part of the documentation: keep them true
    result = doctest.testmod(M)
    assert result.failed == 0 and result.attempted >= 10


# -----------------------------------------------------------------------------
# BLEU

CORPORA = {
    "worked_example": (["The heart is normal in size."], ["The heart size is normal."]),
    "punctuation": (
        ['No effusion; (left) lung: clear! "Stable" heart?', "Tubes/lines {unchanged} & [stable]..."],
        ['No effusion, left lung clear. "Stable" heart.', "Tubes / lines unchanged & stable."],
    ),
    "numbers": (
        ["Nodule of 3.5 cm at T7-T8, 1,000 mL, 5-7 ribs, 2.", "Level 3,4 and 10.5.6 x-ray"],
        ["Nodule of 3.5cm at T7 - T8, 1000 mL, ribs 5-7, 2.", "Level 3, 4 and 10.5.6 x - ray"],
    ),
    "xml_escapes_and_newlines": (
        ["a &amp;lt; b &quot;x&quot; <skipped> hyphen-\nated\nline", "trailing dash-\n"],
        ['a < b "x" hyphenated line', "trailing dash"],
    ),
    "empty_hypothesis_among_others": (
        ["", "The lungs are clear.", "Mild cardiomegaly is present without edema."],
        ["No acute process.", "The lungs are clear.", "Mild cardiomegaly. No edema."],
    ),
    "all_empty_hypotheses": (["", "  "], ["The lungs are clear.", "No effusion."]),
    "empty_reference": (["The lungs are clear."], [""]),
    "hyp_longer_than_ref": (
        ["There is a small left pleural effusion with adjacent atelectasis and the heart is normal in size ."],
        ["Small left pleural effusion ."],
    ),
    "hyp_shorter_than_ref": (["Small effusion."],
                             ["There is a small left pleural effusion with adjacent atelectasis."]),
    "no_unigram_match": (["alpha beta gamma delta"], ["one two three four"]),
    "no_higher_order_match": (["effusion heart lungs clear"], ["clear lungs heart effusion"]),
    "shorter_than_max_order": (["clear lungs", "ok"], ["clear lungs", "ok"]),
    "clipping": (["the the the the the the"], ["the cat is on the mat"]),
    "identical": (["Lungs are clear. No effusion."] * 3, ["Lungs are clear. No effusion."] * 3),
    "case_sensitive": (["LUNGS ARE CLEAR"], ["lungs are clear"]),
    "unicode": (["Épanchement pleural — minime; cœur normal.", "naïve café\u00a0x"],
                ["épanchement pleural minime, cœur normal.", "naive café x"]),
}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpus_bleu_matches_sacrebleu(name, n):
    hyps, refs = CORPORA[name]
    assert M.corpus_bleu(hyps, refs, max_order=n) == pytest.approx(sacre_corpus(hyps, refs, n), abs=1e-6)


PIECES = ["the", "heart", "is", "normal", "lungs", "clear", "No", "no", "effusion", "3.5", "1,000", "x-ray",
          "5-7", "it's", "(left)", ",", ".", "..", "-", "--", ";", ":", '"', "&amp;", "&lt;", "<skipped>",
          "a.b", "a,b", "7.x", "x.7", "T7-T8", "-\n", "\n", "é", "cœur", "#1", "$", "%", "@", "~"]


def random_text(rng):
    words = [rng.choice(PIECES) for _ in range(rng.randint(0, 14))]
    return "".join(w + rng.choice([" ", " ", " ", "", "  "]) for w in words)


def mutate(rng, text):
    # keep some n-grams, break others, so every order has partial matches
    words = text.split(" ")
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            continue
        out.append(rng.choice(PIECES) if r < 0.3 else w)
        if rng.random() < 0.1:
            out.append(rng.choice(PIECES))
    return " ".join(out)


@pytest.mark.parametrize("seed", range(25))
def test_corpus_bleu_matches_sacrebleu_random(seed):
    rng = random.Random(seed)
    refs = [random_text(rng) for _ in range(rng.randint(1, 12))]
    hyps = [mutate(rng, r) if rng.random() < 0.8 else random_text(rng) for r in refs]
    for n in (1, 2, 3, 4):
        assert M.corpus_bleu(hyps, refs, n) == pytest.approx(sacre_corpus(hyps, refs, n), abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_tokenize_13a_matches_sacrebleu(seed):
    rng = random.Random(1000 + seed)
    tokenizer = pytest.importorskip("sacrebleu.tokenizers.tokenizer_13a").Tokenizer13a()
    for _ in range(200):
        line = random_text(rng)
        assert M.tokenize_13a(line) == tokenizer(line.rstrip()).split()


def test_tokenize_13a_examples():
    assert M.tokenize_13a("Hello, world! 3.5 cm, 1,000 x-ray 5-7.") == \
        ["Hello", ",", "world", "!", "3.5", "cm", ",", "1,000", "x-ray", "5", "-", "7", "."]
    assert M.tokenize_13a("&amp;lt; it's") == ["<", "it's"]


def test_bleu_worked_example_by_hand():
    # hyp  "The heart is normal in size ." (7 tokens), ref "The heart size is normal ." (6)
    # 1-grams 6/7; 2-grams 2/6 ("The heart", "is normal"); 3-grams 0/5 -> smoothed 1/(2*5);
    # 4-grams 0/4 -> smoothed 1/(4*4); no brevity penalty (7 >= 6)
    hyps, refs = CORPORA["worked_example"]
    p = [100 * 6 / 7, 100 * 2 / 6, 100 / 10, 100 / 16]
    assert M.corpus_bleu(hyps, refs, 4) == pytest.approx(math.prod(p) ** 0.25, abs=1e-9)
    assert M.corpus_bleu(hyps, refs, 1) == pytest.approx(600 / 7, abs=1e-9)
    assert round(M.corpus_bleu(hyps, refs, 4), 2) == 20.56


def test_bleu_brevity_penalty_by_hand():
    # every hypothesis word is right but the corpus is 2 words short of 4: BP = exp(1 - 4/2)
    assert M.corpus_bleu(["a b"], ["a b c d"], 2) == pytest.approx(100 * math.exp(-1), abs=1e-9)


SENTENCES = [(h, r) for hyps, refs in CORPORA.values() for h, r in zip(hyps, refs)]


@pytest.mark.parametrize("hyp,ref", SENTENCES)
def test_sentence_bleu_matches_sacrebleu(hyp, ref):
    sacrebleu = pytest.importorskip("sacrebleu")
    assert M.sentence_bleu(hyp, ref) == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score, abs=1e-6)
    plain = sacre_bleu(effective_order=False).corpus_score([hyp], [[ref]]).score
    assert M.sentence_bleu(hyp, ref, effective_order=False) == pytest.approx(plain, abs=1e-6)


def test_sentence_bleu_effective_order_by_hand():
    # 2 words, both right: orders 3 and 4 are dropped, precision 100, BP = exp(1 - 4/2)
    assert M.sentence_bleu("a b", "a b c d") == pytest.approx(100 * math.exp(-1), abs=1e-9)
    assert M.sentence_bleu("a b", "a b c d", effective_order=False) == 0.0


def test_bleu_is_a_function_of_summed_sample_stats():
    hyps, refs = CORPORA["empty_hypothesis_among_others"]
    per_sample = [M.bleu_sample_stats(h, r) for h, r in zip(hyps, refs)]
    assert M.bleu_from_stats(np.sum(per_sample, axis=0)) == pytest.approx(sacre_corpus(hyps, refs, 4), abs=1e-6)


# -----------------------------------------------------------------------------
# ROUGE-L

ROUGE_TEXTS = SENTENCES + [
    ("The heart size is normal.", "The heart is normal in size."),
    ("", "Lungs are clear."),
    ("!!!", "Lungs are clear."),
    ("A B C B D A B", "B D C A B A"),
    ("Heart: NORMAL; lungs-clear (2021)", "heart normal lungs clear 2021"),
]


def brute_force_lcs(a, b):
    # independent check: longest common subsequence by memoised recursion
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def lcs(i, j):
        if i == len(a) or j == len(b):
            return 0
        return lcs(i + 1, j + 1) + 1 if a[i] == b[j] else max(lcs(i + 1, j), lcs(i, j + 1))

    return lcs(0, 0)


@pytest.mark.parametrize("seed", range(10))
def test_lcs_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(50):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        assert M.lcs_length(a, b) == brute_force_lcs(tuple(a), tuple(b))


def test_rouge_l_worked_example_by_hand():
    # tokens: "the heart is normal in size" vs "the heart size is normal"; LCS "the heart is normal"
    # P = 4/6, R = 4/5, F = 2PR / (P + R) = 8/11
    assert M.rouge_l(["The heart is normal in size."], ["The heart size is normal."]) == pytest.approx(800 / 11)
    assert M.rouge_l(["", "lungs clear"], ["lungs clear", "Lungs clear."]) == pytest.approx(50.0)


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(7)
    pairs = ROUGE_TEXTS + [(random_text(rng), random_text(rng)) for _ in range(100)]
    official = [scorer.score(r, h)["rougeL"].fmeasure for h, r in pairs]
    for (h, r), f in zip(pairs, official):
        assert M.rouge_l_sample(h, r) == pytest.approx(f, abs=1e-12)
    hyps, refs = zip(*pairs)
    assert M.rouge_l(list(hyps), list(refs)) == pytest.approx(100 * np.mean(official), abs=1e-9)


# -----------------------------------------------------------------------------
# CheXpert-style labeler

LABEL_CASES = [
    ("No pleural effusion.", {"Pleural Effusion": 0, "No Finding": 1}),
    ("Cannot exclude pneumonia.", {"Pneumonia": -1}),
    ("Can not exclude a small pneumothorax.", {"Pneumothorax": -1}),
    ("No evidence of pneumonia.", {"Pneumonia": 0, "No Finding": 1}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("No focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("Possible pneumonia, no effusion.", {"Pneumonia": -1, "Pleural Effusion": 0}),
    ("Moderate cardiomegaly. Small left pleural effusion.", {"Cardiomegaly": 1, "Pleural Effusion": 1}),
    ("Heart size is normal.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("The heart is not enlarged.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": 1}),
    ("Heart size is top-normal.", {"Cardiomegaly": -1}),
    ("Heart size and mediastinal contours are normal.",
     {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1}),
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": 1}),
    ("There is no pneumothorax, but there is a small effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("Pneumothorax is not seen.", {"Pneumothorax": 0, "No Finding": 1}),
    ("Right basal opacity may represent atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
    ("Left basilar atelectasis versus consolidation.", {"Atelectasis": -1, "Consolidation": -1}),
    ("Small pericardial effusion.", {"No Finding": 1}),
    ("Endotracheal tube ends 4 cm above the carina. No acute process.", {"Support Devices": 1, "No Finding": 1}),
    ("Pulmonary edema has resolved.", {"Edema": 0, "No Finding": 1}),
    ("Old healed rib fracture. 1.5 cm nodule in the right upper lobe.", {"Fracture": 1, "Lung Lesion": 1}),
    ("Apical pleural thickening.", {"Pleural Other": 1}),
    ("", {}),
]


@pytest.mark.parametrize("report,expected", LABEL_CASES)
def test_chexpert_labeler_examples(report, expected):
    labels = M.chexpert_labels(report)
    assert list(labels) == list(M.CHEXPERT_14)
    assert {k: v for k, v in labels.items() if v is not None} == expected


# one phrase per observation (No Finding is derived), written positive, negated and uncertain
PHRASES = {
    "Enlarged Cardiomediastinum": "widened mediastinum", "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "patchy opacity", "Lung Lesion": "pulmonary nodule", "Edema": "pulmonary edema",
    "Consolidation": "consolidation", "Pneumonia": "pneumonia", "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax", "Pleural Effusion": "pleural effusion", "Pleural Other": "pleural thickening",
    "Fracture": "rib fracture", "Support Devices": "central venous catheter",
}
TEMPLATES = {1: "There is {}.", 0: "No {}.", -1: "Cannot exclude {}."}


def synthetic_report(rng):
    labels = {name: rng.choice([None, None, 1, 0, -1]) for name in PHRASES}
    sentences = [TEMPLATES[v].format(PHRASES[k]) for k, v in labels.items() if v is not None]
    rng.shuffle(sentences)
    pathology = [v for k, v in labels.items() if k != "Support Devices"]
    labels["No Finding"] = 1 if sentences and not any(v in (1, -1) for v in pathology) else None
    return " ".join(sentences), labels


def test_chexpert_labeler_recovers_synthetic_labels():
    rng = random.Random(0)
    for _ in range(200):
        report, labels = synthetic_report(rng)
        assert M.chexpert_labels(report) == labels, report


def test_chexpert_f1_by_hand():
    # Cardiomegaly: TP; Edema: FP; Pleural Effusion: FN (uncertain in the hypothesis is not positive)
    hyps = ["Cardiomegaly. Pulmonary edema. Possible pleural effusion."]
    refs = ["Cardiomegaly. Pleural effusion."]
    # micro over 14: TP 1, FP 1, FN 1 -> 2/(2+1+1) = 0.5; macro over 14: only Cardiomegaly has F1 1
    assert M.chexpert_f1("micro")(hyps, refs) == pytest.approx(50.0)
    assert M.chexpert_f1("macro")(hyps, refs) == pytest.approx(100 / 14)
    assert M.chexpert_f1("macro", M.CHEXPERT_5)(hyps, refs) == pytest.approx(100 / 5)
    # counting uncertain as positive turns the Pleural Effusion FN into a TP: micro 2*2/(4+1+0)
    assert M.chexpert_f1("micro", uncertain_as_positive=True)(hyps, refs) == pytest.approx(80.0)


@pytest.mark.parametrize("uncertain_as_positive", [False, True])
@pytest.mark.parametrize("average", ["micro", "macro"])
@pytest.mark.parametrize("conditions", [M.CHEXPERT_14, M.CHEXPERT_5])
def test_chexpert_f1_matches_sklearn(average, conditions, uncertain_as_positive):
    metrics_sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(3)
    hyps = [synthetic_report(rng)[0] for _ in range(60)]
    refs = [synthetic_report(rng)[0] for _ in range(60)]
    positive = (1, -1) if uncertain_as_positive else (1,)

    def binarize(texts):
        return np.array([[M.chexpert_labels(t)[c] in positive for c in conditions] for t in texts], dtype=int)

    expected = 100 * metrics_sk.f1_score(binarize(refs), binarize(hyps), average=average, zero_division=0)
    got = M.chexpert_f1(average, conditions, uncertain_as_positive)(hyps, refs)
    assert got == pytest.approx(expected, abs=1e-9)


# -----------------------------------------------------------------------------
# HAM10000 QA


@pytest.mark.parametrize("answer,code", [
    ("The lesion is most consistent with a melanocytic nevus.", "nv"),
    ("Melanoma.", "mel"),
    ("mel", "mel"),
    ("This is a basal cell carcinoma.", "bcc"),
    ("Actinic keratoses / intraepithelial carcinoma (Bowen's disease)", "akiec"),
    ("Benign keratosis-like lesion (seborrheic keratosis).", "bkl"),
    ("Dermatofibroma", "df"),
    ("A vascular lesion such as an angioma.", "vasc"),
    ("Melanocytic nevi rather than melanoma", "nv"),  # the first named class is the answer
    ("I cannot tell.", None),
])
def test_ham_diagnosis(answer, code):
    assert M.ham_diagnosis(answer) == code


def test_ham_metrics_by_hand():
    refs = ["mel", "mel", "nv", "nv", "nv", "bcc"]
    hyps = ["Melanoma.", "Nevus.", "Nevus.", "Nevus.", "No idea.", "Melanoma."]
    # correct: 1 mel + 2 nv = 3/6; recalls mel 1/2, nv 2/3, bcc 0 -> balanced (1/2 + 2/3 + 0)/3
    # F1: mel 2*1/(2+2) = 1/2, nv 2*2/(3+3) = 2/3, bcc 0 -> macro (1/2 + 2/3 + 0)/3
    assert M.HAM_ACCURACY(hyps, refs) == pytest.approx(50.0)
    assert M.HAM_BALANCED_ACCURACY(hyps, refs) == pytest.approx(100 * (1 / 2 + 2 / 3) / 3)
    assert M.HAM_MACRO_F1(hyps, refs) == pytest.approx(100 * (1 / 2 + 2 / 3) / 3)


def test_ham_metrics_match_sklearn():
    metrics_sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(5)
    codes = list(M.HAM_CLASSES)
    refs = [rng.choice(codes[:5]) for _ in range(80)]  # vasc and df never true: tests the label set
    hyps = [r if rng.random() < 0.5 else rng.choice(codes + ["unsure"]) for r in refs]
    y_true, y_pred = refs, [M.ham_diagnosis(h) or "none" for h in hyps]
    labels = sorted((set(y_true) | set(y_pred)) - {"none"})
    assert M.HAM_ACCURACY(hyps, refs) == pytest.approx(100 * metrics_sk.accuracy_score(y_true, y_pred))
    assert M.HAM_MACRO_F1(hyps, refs) == pytest.approx(
        100 * metrics_sk.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    with warnings.catch_warnings():  # sklearn warns about predicted classes absent from y_true
        warnings.simplefilter("ignore")
        balanced = metrics_sk.balanced_accuracy_score(y_true, y_pred)
    assert M.HAM_BALANCED_ACCURACY(hyps, refs) == pytest.approx(100 * balanced)


def test_ham_reference_without_class_is_an_error():
    with pytest.raises(ValueError, match="names no HAM10000 class"):
        M.HAM_ACCURACY(["melanoma"], ["unknown lesion"])


# -----------------------------------------------------------------------------
# ES-M and fairness


def test_es_metric_by_hand():
    assert M.es_metric(30.0, [28.0, 33.0]) == {"gap": 5.0, "es": 5.0}
    assert M.es_metric(30.0, {"F": 30.0, "M": 30.0}) == {"gap": 0.0, "es": 30.0}


def test_es_metric_uniformly_poor_does_not_score_well():
    # the paper's point: a model that is equally bad for everyone has no gap but a low ES
    poor = M.es_metric(2.0, [2.0, 2.0, 2.0])
    good = M.es_metric(42.0, [40.0, 44.0, 42.0])
    assert poor == {"gap": 0.0, "es": 2.0}
    assert good == {"gap": 4.0, "es": pytest.approx(8.4)}
    assert good["es"] > poor["es"] and good["gap"] > poor["gap"]


@pytest.mark.parametrize("scores, name", [([math.nan, 40.0], "0"), ([40.0, math.nan], "1"),
                                           ({"F": 40.0, "M": math.inf}, "'M'")])
def test_es_metric_refuses_a_nan_group_whatever_its_place(scores, name):
    # max/min over a NaN depend on its position: [nan, 40] and [40, nan] once gave different gaps
    with pytest.raises(ValueError, match=f"group {name} is"):
        M.es_metric(50.0, scores)


def test_es_metric_refuses_a_nan_m_all():
    with pytest.raises(ValueError, match="M_all is nan"):
        M.es_metric(math.nan, [40.0, 41.0])


def test_es_metric_needs_two_groups():
    with pytest.raises(ValueError, match="at least two groups"):
        M.es_metric(10.0, [10.0])


EXACT = M.mean_metric("Exact match", lambda h, r: float(h == r))


def test_fairness_report_by_hand():
    # group A: 3/4 right, group B: 1/4 right, whole set 4/8
    hyps = ["x", "x", "x", "y", "x", "y", "y", "y"]
    refs = ["x"] * 8
    groups = ["A"] * 4 + ["B"] * 4
    r = M.fairness_report(EXACT, hyps, refs, groups, attribute="sex", min_group_size=1)
    assert (r.metric, r.attribute, r.n) == ("Exact match", "sex", 8)
    assert r.overall == 50.0 and r.m_all == 50.0
    assert {g: s.score for g, s in r.groups.items()} == {"A": 75.0, "B": 25.0}
    assert r.gap == 50.0 and r.es == pytest.approx(50.0 / 51.0)
    assert r.ci == {} and r.small_groups == []


def test_fairness_report_group_mean_variant():
    # unbalanced groups: whole-set score differs from the mean of group scores (official script)
    hyps = ["x", "x", "x", "x", "x", "y", "x", "y"]
    refs = ["x"] * 8
    groups = ["A"] * 6 + ["B"] * 2
    paper = M.fairness_report(EXACT, hyps, refs, groups, min_group_size=1)
    official = M.fairness_report(EXACT, hyps, refs, groups, min_group_size=1, m_all="group_mean")
    # A: 5/6, B: 1/2, whole set 6/8
    assert paper.m_all == pytest.approx(75.0) and official.m_all == pytest.approx(100 * (5 / 6 + 1 / 2) / 2)
    gap = 100 * (5 / 6 - 1 / 2)
    assert paper.gap == official.gap == pytest.approx(gap)
    assert paper.es == pytest.approx(75.0 / (1 + gap))
    assert official.es == pytest.approx(official.m_all / (1 + gap))


@pytest.mark.parametrize("m_all", ["whole_set", "group_mean"])
def test_fairness_report_uses_es_metric(m_all):
    # the report's gap and ES are es_metric's on the compared groups' scores, to the last bit
    rng = random.Random(14)
    refs = [random_text(rng) for _ in range(60)]
    hyps = [mutate(rng, r) for r in refs]
    groups = [rng.choice(["A", "B", "C", "D"]) for _ in refs[:-2]] + ["E", "E"]  # E is too small to compare
    r = M.fairness_report(M.bleu(4), hyps, refs, groups, min_group_size=5, m_all=m_all)
    compared = {g: s.score for g, s in r.groups.items() if not s.small}
    assert set(compared) == {"A", "B", "C", "D"}
    assert {"gap": r.gap, "es": r.es} == M.es_metric(r.m_all, compared)


def test_small_groups_are_flagged_and_left_out_of_the_gap():
    hyps = ["x"] * 5 + ["y"] * 5 + ["y"]
    refs = ["x"] * 11
    groups = ["A"] * 5 + ["B"] * 5 + ["C"]
    r = M.fairness_report(EXACT, hyps, refs, groups, min_group_size=3)
    assert r.groups["C"] == M.GroupScore(0.0, 1, True)
    assert r.small_groups == ["C"]
    assert r.gap == 100.0  # A (100) vs B (0); C is scored but not used
    assert "C=0.00 (n=1)*" in M.format_table([r])
    with pytest.raises(ValueError, match="fewer than two groups"):
        M.fairness_report(EXACT, hyps, refs, groups, min_group_size=6)


def test_group_bleu_is_corpus_bleu_of_the_group():
    rng = random.Random(11)
    refs = [random_text(rng) for _ in range(40)]
    hyps = [mutate(rng, r) for r in refs]
    groups = [rng.choice(["white", "black", "asian"]) for _ in refs]
    scores = M.group_scores(M.bleu(4), hyps, refs, groups, min_group_size=1)
    assert set(scores) == set(groups)
    for g, s in scores.items():
        idx = [i for i, x in enumerate(groups) if x == g]
        assert s.n == len(idx) and not s.small
        assert s.score == pytest.approx(sacre_corpus([hyps[i] for i in idx], [refs[i] for i in idx], 4), abs=1e-6)


def test_bootstrap_fast_path_equals_rerunning_sacrebleu():
    # the same seed draws the same resamples, so summing precomputed statistics must give
    # exactly what sacreBLEU gives when re-run on each resampled corpus
    rng = random.Random(12)
    refs = [random_text(rng) for _ in range(30)]
    hyps = [mutate(rng, r) for r in refs]
    fast = M.bootstrap_ci(M.bleu(4), hyps, refs, n_resamples=40, seed=3)
    slow = M.bootstrap_ci(lambda h, r: sacre_corpus(h, r, 4), hyps, refs, n_resamples=40, seed=3)
    assert fast == pytest.approx(slow, abs=1e-6)
    assert fast != M.bootstrap_ci(M.bleu(4), hyps, refs, n_resamples=40, seed=4)


def test_fairness_report_intervals():
    rng = random.Random(13)
    refs = [random_text(rng) for _ in range(120)]
    hyps = [mutate(rng, r) for r in refs]
    groups = [rng.choice(["F", "M"]) for _ in refs]
    r = M.fairness_report(M.bleu(4), hyps, refs, groups, min_group_size=10, n_resamples=200, seed=0)
    assert set(r.ci) == {"overall", "m_all", "gap", "es", "gap_corrected"} and set(r.group_ci) == {"F", "M"}
    for key, value in [("overall", r.overall), ("es", r.es)]:
        low, high = r.ci[key]
        assert low < value < high
    for g, s in r.groups.items():
        assert r.group_ci[g][0] < s.score < r.group_ci[g][1]
    # stratified: the resamples keep each group's size, so the whole-set interval is a little
    # narrower than that of resampling the test set as a whole
    whole = M.bootstrap_ci(M.bleu(4), hyps, refs, n_resamples=200, seed=0)
    assert abs((r.ci["overall"][1] - r.ci["overall"][0]) - (whole[1] - whole[0])) < 0.5 * (whole[1] - whole[0])
    assert 0 < r.gap_null["mean"] < r.gap_null["q95"] and r.gap_corrected <= r.gap
    again = M.fairness_report(M.bleu(4), hyps, refs, groups, min_group_size=10, n_resamples=200, seed=0)
    assert again.ci == r.ci and again.group_ci == r.group_ci


def test_resamples_missing_a_group_give_no_gap():
    # B is a single wrong answer: when a resample misses it there is no gap to measure, and
    # that resample must be skipped (not counted as a gap of 0)
    hyps, refs = ["x"] * 20 + ["y"], ["x"] * 21
    groups = ["A"] * 20 + ["B"]
    r = M.fairness_report(EXACT, hyps, refs, groups, min_group_size=1, n_resamples=100, seed=0)
    assert r.gap == 100.0 and r.ci["gap"] == (100.0, 100.0)
    assert r.group_ci == {"A": (100.0, 100.0), "B": (0.0, 0.0)}
    low, high = r.ci["es"]
    assert 0 < low <= high < 1


def test_bootstrap_of_corpus_bleu_is_fast():
    rng = random.Random(14)
    refs = [" ".join(rng.choice(PIECES[:12]) for _ in range(40)) for _ in range(1000)]
    hyps = [mutate(rng, r) for r in refs]
    groups = [rng.choice(["0", "1", "2"]) for _ in refs]
    start = time.perf_counter()
    M.fairness_report(M.bleu(4), hyps, refs, groups, n_resamples=1000)
    assert time.perf_counter() - start < 20.0


def test_fairness_table():
    hyps, refs = ["x", "y", "x", "x", "y", "x"], ["x"] * 6
    attrs = {"sex": ["F", "M", "F", "M", "F", "M"], "age": ["0", "0", "0", "1", "1", "1"]}
    table = M.fairness_table(hyps, refs, attrs, {"EM": EXACT, "BLEU-1": M.bleu(1)}, min_group_size=1)
    assert table[0].metric == "EM"  # reports are named by the keys of `metrics`
    pairs = [(r.attribute, r.metric) for r in table]
    assert pairs == [("sex", "EM"), ("sex", "BLEU-1"), ("age", "EM"), ("age", "BLEU-1")]
    single = M.fairness_report(EXACT, hyps, refs, attrs["age"], attribute="age", min_group_size=1)
    assert table[2] == M.FairnessReport(**{**vars(single), "metric": "EM"})


def test_markdown_table():
    assert M.markdown_table(["Method", "ES"], [["LoRA", "1.00"], ["FairLLaVA", "–"]]) == (
        "| Method | ES |\n|---|---|\n| LoRA | 1.00 |\n| FairLLaVA | – |")
    assert M.markdown_table(["a"], []) == "| a |\n|---|"


def test_default_metric_sets_score():
    hyps = ["No pleural effusion. Mild cardiomegaly.", "Small left effusion."]
    refs = ["Mild cardiomegaly. No effusion.", "Left pleural effusion."]
    scores = {name: m(hyps, refs) for name, m in M.report_metrics().items()}
    assert set(scores) >= {"BLEU-1", "BLEU-4", "ROUGE-L", "CheXpert-F1 (micro)", "CheXpert-F1-5 (macro)"}
    assert all(0.0 <= s <= 100.0 for s in scores.values())
    assert scores["CheXpert-F1 (micro)"] == 100.0
    ham = M.ham_metrics()
    assert ham["Sentence BLEU"](["a b"], ["a b c d"]) == pytest.approx(100 * math.exp(-1))


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("metric", [M.bleu(4), M.ROUGE_L, M.chexpert_f1(), M.HAM_ACCURACY])
def test_count_mismatch_and_empty_set(metric):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty test set"):
        metric([], [])
    with pytest.raises(TypeError):
        metric("a b", "a b")


def test_fairness_bad_input():
    hyps, refs = ["x", "y", "x"], ["x"] * 3
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        M.fairness_report(EXACT, hyps, refs[:2], ["A", "B", "A"])
    with pytest.raises(ValueError, match="empty test set"):
        M.fairness_table([], [], {"sex": []}, {"EM": EXACT})
    with pytest.raises(ValueError, match="'race' has 2 labels for 3 samples"):
        M.fairness_report(EXACT, hyps, refs, ["A", "B"], attribute="race", min_group_size=1)
    for missing in (None, "", float("nan")):
        with pytest.raises(ValueError, match="'race' is missing for 1 samples"):
            M.fairness_table(hyps, refs, {"race": ["A", missing, "B"]}, {"EM": EXACT}, min_group_size=1)
    with pytest.raises(ValueError, match="missing"):
        M.group_scores(EXACT, hyps, refs, ["A", None, "B"])
    with pytest.raises(ValueError, match="m_all must be"):
        M.fairness_report(EXACT, hyps, refs, ["A", "B", "A"], min_group_size=1, m_all="mean")
    with pytest.raises(ValueError, match="average must be"):
        M.chexpert_f1("weighted")


# ----------------------------------------------------------------------------------------------
# The statistics of the study: Student's t for any n, and the gap's bootstrap checked by simulation


@pytest.mark.parametrize("df", [1, 2, 3, 5, 11, 12, 29, 30, 31, 100, 10 ** 5])
def test_t_quantile_equals_scipy(df):
    stats = pytest.importorskip("scipy.stats")
    for p in (0.5, 0.8, 0.95, 0.975, 0.995, 0.025):
        assert M.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8, abs=1e-10)


HIT = M.mean_metric("hit", lambda h, r: float(h == r))


def _simulated_gap(true_gap, n_sims, seed, n=600, k=4):
    """Four groups of n cases scored 0 / 100 each (a group score's standard error is ~2 points, as
    one race group's Finding-F1 on the demo's test set): one group at 50 + gap / 2, one at
    50 - gap / 2, the others at 50. -> (mean plug-in gap, mean corrected gap, coverage of each
    interval) over n_sims test sets."""
    rng = np.random.default_rng(seed)
    p = np.full(k, 0.5)
    p[0], p[-1] = 0.5 + true_gap / 200, 0.5 - true_gap / 200
    groups = np.repeat(np.arange(k), n).tolist()
    plug, corrected, cover_plug, cover_corr = [], [], 0, 0
    for _ in range(n_sims):
        hits = rng.random(k * n) < np.repeat(p, n)
        hyps = ["y" if h else "n" for h in hits]
        r = M.fairness_report(HIT, hyps, ["y"] * (k * n), groups, min_group_size=30, n_resamples=200,
                              seed=int(rng.integers(1 << 30)))
        plug.append(r.gap)
        corrected.append(r.gap_corrected)
        cover_plug += r.ci["gap"][0] <= true_gap <= r.ci["gap"][1]
        cover_corr += r.ci["gap_corrected"][0] <= true_gap <= r.ci["gap_corrected"][1]
    return np.mean(plug), np.mean(corrected), np.median(corrected), cover_plug / n_sims, cover_corr / n_sims


def test_the_gap_by_simulation_no_gap():
    """True gap 0: the plug-in max - min is ~4 points too high and its interval never covers 0; the
    null-corrected gap is 0 in most test sets (median) and its interval covers 0."""
    plug, corr_mean, corr_median, cover_plug, cover_corr = _simulated_gap(0.0, n_sims=40, seed=1)
    assert 3.0 < plug < 5.5 and cover_plug < 0.1  # the bias and the miss the study used to have
    assert corr_median == 0.0 and corr_mean < 2.0  # mean bias ~1.5: see metrics._null_corrected
    assert cover_corr >= 0.9


def test_the_gap_by_simulation_gap_20():
    """True gap 20 between two of four groups: both estimates within 1 point, both intervals near 95%."""
    plug, corr_mean, _, cover_plug, cover_corr = _simulated_gap(20.0, n_sims=40, seed=2)
    assert abs(plug - 20) < 1.0 and abs(corr_mean - 20) < 1.0
    assert 0.85 <= cover_plug <= 1.0 and 0.85 <= cover_corr <= 1.0
