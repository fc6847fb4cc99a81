"""
Evaluation metrics for FairLLaVA: text quality, clinical correctness and fairness.

Plain Python plus numpy (no torch, no learned models), in four parts:

1. BLEU-1..4 with sacreBLEU's `corpus_score` semantics (13a tokenisation, case-sensitive,
   exponential smoothing, brevity penalty, single reference, 0-100), and sentence BLEU as
   sacreBLEU's `sentence_bleu`. ROUGE-L F-measure as Google's `rouge_score` computes it.
2. A rule-based CheXpert-style labeler (14 observations, negation and uncertainty cues) and the
   micro/macro F1 of generated vs reference labels. This is an APPROXIMATION of CheXbert-F1,
   which labels reports with a fine-tuned BERT; it needs no weights, is transparent, and its
   errors are the usual ones of keyword labelers (cue scope, unusual phrasing). Use it to
   compare systems with each other, not to quote CheXbert numbers.
3. HAM10000-style QA: the diagnosis (7 classes) is read from the answer text; accuracy,
   macro-F1 and balanced accuracy.
4. Fairness (paper, "Equity-Scaled Metric"): score every demographic group, take the gap
   Delta_a = max_g M_g - min_g M_g, and report ES-M_a = M_all / (1 + Delta_a), with
   bootstrap confidence intervals.

Every metric is a `Metric`: a per-sample vector of sufficient statistics plus a function that
turns their sum into a 0-100 score. Corpus BLEU is not a mean of sentence scores, but it is a
function of summed n-gram counts, so the expensive part (tokenising, counting) is done once
per sample; a group score or a bootstrap resample is then a sum of rows. 1000 resamples of
corpus BLEU on 1000 reports take about a second this way, tokenisation included.

Usage (the docstrings of `bleu`, `es_metric` and `fairness_report` hold worked examples):

    reports = fairness_table(hyps, refs, {"sex": sexes, "race": races}, report_metrics(),
                             min_group_size=30, n_resamples=1000)
    print(format_table(reports))
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Hashable, Sequence

import numpy as np


# -----------------------------------------------------------------------------
# Metric = per-sample sufficient statistics + a function of their sum


@dataclass(frozen=True)
class Metric:
    """A corpus-level metric, score = finish(sum over samples of sample_stats(hyp, ref))."""

    name: str
    sample_stats: Callable[[str, str], Sequence[float]]
    finish: Callable[[np.ndarray], float]

    def stats(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        check_pairs(hyps, refs)
        return np.array([self.sample_stats(h, r) for h, r in zip(hyps, refs)], dtype=np.float64)

    def __call__(self, hyps: Sequence[str], refs: Sequence[str]) -> float:
        return float(self.finish(self.stats(hyps, refs).sum(axis=0)))


def check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if isinstance(hyps, str) or isinstance(refs, str):
        raise TypeError("hyps and refs must be lists of strings, not a single string")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} predictions but {len(refs)} references")
    if len(hyps) == 0:
        raise ValueError("empty test set: no predictions to score")


def mean_metric(name: str, per_sample: Callable[[str, str], float]) -> Metric:
    """A metric that is the mean of a per-sample score in [0, 1], reported on 0-100."""
    return Metric(name, lambda h, r: (per_sample(h, r), 1.0), lambda s: 100.0 * s[0] / s[1])


# -----------------------------------------------------------------------------
# BLEU (Papineni et al. 2002) with sacreBLEU's conventions

# mteval-v13a tokenisation. The first class is all ASCII punctuation except . , - and the
# apostrophe; periods and commas are split off unless they sit between digits (3.5, 1,000),
# a dash only after a digit (5-7 -> 5 - 7, but x-ray stays one token).
_13A_RULES = [
    (re.compile("([" + re.escape("{|}~[\\]^_`!\"#$%&()*+:;<=>?@/") + "])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> list[str]:
    # sacreBLEU strips trailing whitespace before tokenising, so a final "-\n" keeps its dash
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    # undo the four XML escapes, in this order (so "&amp;lt;" becomes "<")
    for escaped, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(escaped, char)
    # pad with spaces, so that a period ending the line counts as "followed by a non-digit"
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_sample_stats(hyp: str, ref: str, max_order: int = 4) -> list[int]:
    """[hyp_len, ref_len, matches_1..N, totals_1..N]: everything corpus BLEU needs."""
    h, r = tokenize_13a(hyp), tokenize_13a(ref)
    matches, totals = [], []
    for n in range(1, max_order + 1):
        hyp_counts, ref_counts = _ngrams(h, n), _ngrams(r, n)
        # clipped counts: an n-gram is credited at most as often as it occurs in the reference
        matches.append(sum(min(c, ref_counts[g]) for g, c in hyp_counts.items()))
        totals.append(max(len(h) - n + 1, 0))
    return [len(h), len(r), *matches, *totals]


def bleu_from_stats(stats: Sequence[float], max_order: int = 4, effective_order: bool = False) -> float:
    """BLEU (0-100) from summed statistics, with sacreBLEU's 'exp' smoothing."""
    hyp_len, ref_len = stats[0], stats[1]
    matches, totals = stats[2 : 2 + max_order], stats[2 + max_order : 2 + 2 * max_order]
    # no hypothesis words, or not a single matching unigram: 0 (sacreBLEU's early exit,
    # without it the smoothing below would give a non-zero score to a wholly wrong corpus)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    log_precisions, smooth = [], 1.0
    for n in range(max_order):
        if totals[n] == 0:
            # the hypotheses are shorter than n+1 words: sacreBLEU counts this order as a
            # zero precision (score 0) unless effective_order drops it and the ones above
            if not effective_order:
                return 0.0
            break
        if matches[n] == 0:
            # 'exp' smoothing (mteval-v13a): the k-th order without matches gets 1 / (2^k total)
            smooth *= 2.0
            log_precisions.append(math.log(100.0 / (smooth * totals[n])))
        else:
            log_precisions.append(math.log(100.0 * matches[n] / totals[n]))
    # brevity penalty: short hypotheses could otherwise buy precision by saying little
    bp = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(sum(log_precisions) / len(log_precisions))


def bleu(max_order: int = 4) -> Metric:
    """Corpus BLEU-n; equals sacrebleu BLEU(max_ngram_order=n).corpus_score(hyps, [refs]).score.

    Worked example, one pair:
        hyp "The heart is normal in size."  ->  The heart is normal in size .   (7 tokens)
        ref "The heart size is normal."     ->  The heart size is normal .      (6 tokens)
        1-grams: 6 of 7 match; 2-grams: 2 of 6 ("The heart", "is normal");
        3-grams: 0 of 5, smoothed to 1 / (2 * 5); 4-grams: 0 of 4, smoothed to 1 / (4 * 4);
        the hypothesis is not shorter than the reference, so BP = 1;
        BLEU-4 = 100 * (6/7 * 2/6 * 1/10 * 1/16) ** (1/4) = 20.56 and BLEU-1 = 100 * 6/7 = 85.71.

    >>> hyp, ref = "The heart is normal in size.", "The heart size is normal."
    >>> round(bleu(4)([hyp], [ref]), 2), round(bleu(1)([hyp], [ref]), 2)
    (20.56, 85.71)
    """
    return Metric(
        f"BLEU-{max_order}",
        lambda h, r: bleu_sample_stats(h, r, max_order),
        lambda s: bleu_from_stats(s, max_order),
    )


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str], max_order: int = 4) -> float:
    return bleu(max_order)(hyps, refs)


def sentence_bleu(hyp: str, ref: str, max_order: int = 4, effective_order: bool = True) -> float:
    """One sentence, as sacrebleu.sentence_bleu(hyp, [ref]): effective order on by default, so
    a 3-word hypothesis is scored on its 1..3-grams instead of getting 0 for lacking 4-grams."""
    return bleu_from_stats(bleu_sample_stats(hyp, ref, max_order), max_order, effective_order)


# -----------------------------------------------------------------------------
# ROUGE-L (Lin 2004), F-measure, as rouge_score.RougeScorer(["rougeL"]) computes it


def tokenize_rouge(text: str) -> list[str]:
    # rouge_score's default: lowercase, anything but [a-z0-9] separates tokens. No stemming
    # (rouge_score's use_stemmer=True applies Porter stemming, which we do not implement).
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # classic dynamic programme, one row per word x of a: prev[j] is the LCS of the words of a
    # before x and b[:j]; cur[j + 1] extends it by x
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_sample(hyp: str, ref: str) -> float:
    """ROUGE-L F1 of one pair in [0, 1]; 0 if either side has no tokens."""
    h, r = tokenize_rouge(hyp), tokenize_rouge(ref)
    if not h or not r:
        return 0.0
    lcs = lcs_length(r, h)
    precision, recall = lcs / len(h), lcs / len(r)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# corpus ROUGE-L = mean of the per-report F-measures, 0-100
ROUGE_L = mean_metric("ROUGE-L", rouge_l_sample)


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
    return ROUGE_L(hyps, refs)


# -----------------------------------------------------------------------------
# Rule-based CheXpert-style labeler
#
# In the spirit of the CheXpert labeler (Irvin et al. 2019), much simplified: the report is cut
# into sentences and clauses; every phrase that mentions an observation is labelled positive,
# or negative / uncertain when a cue ("no", "cannot exclude", "is not seen") governs it; the
# mentions of an observation are then aggregated. Where CheXpert parses dependencies to find
# what a cue governs, we use the nearest cue in the same clause. CheXbert, which the official
# evaluation uses, is a BERT model trained on such labels; this labeler agrees with it on plain
# phrasing, but its F1 is an approximation of CheXbert-F1, not a replacement.

CHEXPERT_14 = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices", "No Finding",
)
CHEXPERT_5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _any(*alternatives: str) -> re.Pattern:
    """One regex matching any of the phrases, as whole words."""
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b")


# Size statements: "<subject> ... <state>" or "<state> ... <subject>", up to four words apart,
# none of them "not" ("heart size is mildly enlarged", "enlargement of the cardiac silhouette").
_GAP = r"(?:(?!not\b)\w+[ -]){0,4}?"
_BIG = r"enlarged|enlargement|increased|large|prominent|widened|widening"
_NORMAL = r"(?:(?:top|high|upper limits? of)[- ])?normal|unremarkable|within normal limits|not (?:enlarged|widened)"
_HEART = r"heart size|heart|cardiac silhouette|cardiac size|cardiac contours?"
_MEDIASTINUM = r"(?:cardio)?mediastinal (?:silhouette|contours?)|mediastinum"


def _statement(subject: str, state: str) -> str:
    return rf"(?:{subject}) {_GAP}(?:{state})\b|\b(?:{state}) {_GAP}(?:{subject})"


# observation -> phrases that mention the finding. No Finding is derived from the others.
_MENTIONS = {
    "Enlarged Cardiomediastinum": _any(_statement(_MEDIASTINUM, _BIG)),
    "Cardiomegaly": _any("cardiomegaly", _statement(_HEART, _BIG)),
    "Lung Opacity": _any(r"opacit(?:y|ies)", "opacification", r"infiltrat\w*", r"air-?space (?:disease|process)",
                         "haziness", "ground[- ]glass"),
    "Lung Lesion": _any(r"nodul\w*", "mass(?:es)?", "lesions?", "tumou?rs?", "neoplasms?", "carcinoma",
                        r"malignan\w*", r"metasta\w*"),
    "Edema": _any("edema", "(?:pulmonary |vascular )+congestion", "fluid overload", "(?:congestive )?heart failure",
                  "chf"),
    "Consolidation": _any(r"consolidat\w*"),
    "Pneumonia": _any("pneumonias?", "infection", "infectious process"),
    "Atelectasis": _any(r"atelecta\w*", "collapsed?"),
    "Pneumothorax": _any("pneumothora(?:x|ces)"),
    # a pericardial effusion is not a pleural effusion
    "Pleural Effusion": _any("(?<!pericardial )effusions?", "hydrothorax", "pleural fluid",
                             r"blunt\w* (?:of )?(?:the )?(?:\w+ )?costophrenic"),
    "Pleural Other": _any("pleural (?:thickening|plaques?|scarring|calcifications?)", "fibrothorax"),
    "Fracture": _any(r"fractur\w*"),
    "Support Devices": _any(
        "(?:picc|central venous|central|midline|arterial|port)[- ]?(?:line|catheter)s?", "lines and tubes",
        "tubes and lines", "(?:et|endotracheal|enteric|feeding|nasogastric|ng|og|chest|tracheostomy) tubes?",
        "catheters?", "pacemakers?", "pacers?", "(?:pacing|pacer) (?:leads?|wires?)",
        "(?:sternal|sternotomy) wires",
        "stents?", "icd", "defibrillators?", "drains?", "swan-ganz", "(?:support|monitoring) devices?",
        "valve replacement", "prosthetic valves?", "port-?a-?cath"),
}
assert tuple(_MENTIONS) == CHEXPERT_14[:-1]
# statements that a structure is normal: negative, or uncertain when "top-normal"
_NORMAL_STATEMENTS = {
    "Enlarged Cardiomediastinum": _any(_statement(_MEDIASTINUM, _NORMAL)),
    "Cardiomegaly": _any(_statement(_HEART, _NORMAL)),
}

# Cues before a mention ("no pleural effusion", "cannot exclude pneumonia"); the nearest one wins.
_NEG_BEFORE = _any("no", "not", "without", "negative for", "free of", "absence of", "resolution of", "resolved",
                   "clear of", "removal of", "rather than", "nor")
_UNC_BEFORE = _any(
    "may", "might", "could", "possible", "possibly", "probable", "probably", "likely", "questionable",
    "question of", "suspicious for", "suspected", "concerning for", "concern for", "differential", "versus", "vs",
    "(?:cannot|can not|not|difficult to) (?:be )?(?:exclude|excluded|rule out|ruled out)", "rule out",
    r"suggest\w*", "borderline", "equivocal", "indeterminate", "worrisome for", "(?:top|high)[- ]normal",
    "upper limits? of")
# Cues in the few words after a mention ("pneumothorax is not seen", "pneumonia cannot be
# excluded"). "may represent" leaves the mention before it certain: "opacity may represent
# atelectasis" is a positive opacity and an uncertain atelectasis.
_NEG_AFTER = _any("not (?:seen|identified|present|visualized|demonstrated|evident|appreciated|noted)",
                  "absent", "resolved", "removed", "cleared", "no longer")
_UNC_AFTER = _any("(?:may|might|could)(?! (?:represent|reflect|indicate|be due to))",
                  "(?:cannot|can not|not) (?:be )?(?:excluded|ruled out)",
                  "is (?:possible|suspected|questioned|likely)", "versus", "vs")
# Cues do not reach past a sentence or these clause breaks ("no effusion, but there is edema").
# A period between digits ("1.5 cm") does not end a sentence.
_SENTENCE = re.compile(r"(?<!\d)\.(?!\d)|[;!?\n]|:(?!\d)")
_CLAUSE = _any("but", "however", "although", "though", "whereas", "except", "which", "and there")


def _mention_status(clause: str, start: int, end: int) -> int:
    """1, 0 or -1 for the mention clause[start:end]."""
    after = " ".join(clause[end:].split(",")[0].split()[:6])  # up to 6 words, not past a comma
    if _UNC_AFTER.search(after) or _UNC_BEFORE.search(clause[start:end]):
        return -1
    if _NEG_AFTER.search(after):
        return 0
    # before the mention the nearest cue decides: "possible pneumonia, no effusion" gives an
    # uncertain pneumonia and a negative effusion; in "can not exclude" the uncertainty cue ends
    # after the negation "not", so it is the nearer one
    before = clause[:start]
    cues = [(m.end(), -1) for m in _UNC_BEFORE.finditer(before)]
    cues += [(m.end(), 0) for m in _NEG_BEFORE.finditer(before)]
    return max(cues)[1] if cues else 1


@lru_cache(maxsize=100_000)
def _label_tuple(report: str) -> tuple:
    found: dict[str, set] = {k: set() for k in _MENTIONS}
    for sentence in _SENTENCE.split(report.lower()):
        for clause in _CLAUSE.split(sentence):
            for name, pattern in _MENTIONS.items():
                for m in pattern.finditer(clause):
                    found[name].add(_mention_status(clause, m.start(), m.end()))
            for name, pattern in _NORMAL_STATEMENTS.items():
                for m in pattern.finditer(clause):
                    found[name].add(-1 if _UNC_BEFORE.search(m.group()) else 0)
    # CheXpert's aggregation: any positive mention wins, then any uncertain, then negative
    labels = [1 if 1 in s else -1 if -1 in s else 0 if s else None for s in found.values()]
    # No Finding: nothing positive or uncertain apart from devices (CheXpert's rule)
    pathology = [l for name, l in zip(_MENTIONS, labels) if name != "Support Devices"]
    no_finding = 1 if report.strip() and not any(l in (1, -1) for l in pathology) else None
    return (*labels, no_finding)


def chexpert_labels(report: str) -> dict[str, int | None]:
    """The 14 CheXpert observations: 1 positive, 0 negative, -1 uncertain, None not mentioned.

    >>> chexpert_labels("No pleural effusion. Cannot exclude pneumonia.")["Pleural Effusion"]
    0
    """
    return dict(zip(CHEXPERT_14, _label_tuple(report)))


def chexpert_f1(
    average: str = "micro", conditions: Sequence[str] = CHEXPERT_14, uncertain_as_positive: bool = False
) -> Metric:
    """F1 of generated vs reference labels, as the CheXbert-F1 evaluation scores them: an
    observation is 'positive' when labelled 1 (optionally also -1), anything else is negative;
    micro F1 pools TP/FP/FN over the observations, macro F1 averages the per-observation F1s.
    Like scikit-learn, an observation with no positives on either side has F1 = 0."""
    if average not in ("micro", "macro"):
        raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")
    idx = [CHEXPERT_14.index(c) for c in conditions]
    positive = (1, -1) if uncertain_as_positive else (1,)

    def sample_stats(hyp: str, ref: str) -> list[int]:
        p, t = _label_tuple(hyp), _label_tuple(ref)
        out = []
        for i in idx:
            yp, yt = p[i] in positive, t[i] in positive
            out += [yp and yt, yp and not yt, yt and not yp]  # TP, FP, FN
        return out

    def f1(tp, fp, fn):
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    def finish(s: np.ndarray) -> float:
        tp, fp, fn = s[0::3], s[1::3], s[2::3]
        if average == "micro":
            return 100.0 * f1(tp.sum(), fp.sum(), fn.sum())
        return 100.0 * float(np.mean([f1(*x) for x in zip(tp, fp, fn)]))

    suffix = "" if len(idx) == 14 else f"-{len(idx)}"
    return Metric(f"CheXpert-F1{suffix} ({average})", sample_stats, finish)


# -----------------------------------------------------------------------------
# HAM10000 QA: the diagnosis named in the answer

HAM_CLASSES = {  # HAM10000 codes -> how answers name them
    "akiec": r"akiec|actinic keratos[ie]s|intraepithelial carcinoma|bowen'?s disease",
    "bcc": r"bcc|basal cell carcinoma",
    "bkl": r"bkl|benign keratos[ie]s(?:-like)?|seborr?h?eic keratos[ie]s|solar lentig\w*"
           r"|lichen[- ]planus[- ]like keratos[ie]s",
    "df": r"df|dermatofibromas?",
    "mel": r"mel|melanomas?",
    "nv": r"nv|(?:melanocytic )?n(?:a)?ev(?:us|i)",
    "vasc": r"vasc|vascular lesions?|angiomas?|angiokeratomas?|pyogenic granulomas?|ha?emorrhage",
}
_HAM_CODES = tuple(HAM_CLASSES)
_HAM_PATTERN = re.compile("|".join(rf"\b(?P<{c}>{p})\b" for c, p in HAM_CLASSES.items()))


def ham_diagnosis(answer: str) -> str | None:
    """The first HAM10000 class named in the answer (its code), or None if none is named.

    >>> ham_diagnosis("The lesion is most consistent with a melanocytic nevus.")
    'nv'
    """
    m = _HAM_PATTERN.search(answer.lower())
    return m.lastgroup if m else None


def _ham_stats(hyp: str, ref: str) -> np.ndarray:
    # one-hot cell of a 7 x 8 confusion matrix; the 8th column is "no diagnosis found"
    truth = ham_diagnosis(ref)
    if truth is None:
        raise ValueError(f"reference names no HAM10000 class: {ref!r}")
    pred = ham_diagnosis(hyp)
    cell = np.zeros((7, 8))
    cell[_HAM_CODES.index(truth), 7 if pred is None else _HAM_CODES.index(pred)] = 1
    return cell.ravel()


def _ham_finish(kind: str) -> Callable[[np.ndarray], float]:
    def finish(s: np.ndarray) -> float:
        cm = s.reshape(7, 8)
        support, predicted, tp = cm.sum(1), cm[:, :7].sum(0), np.diag(cm[:, :7])
        if kind == "accuracy":
            return 100.0 * tp.sum() / support.sum()
        if kind == "balanced":  # mean recall over the classes present in the references
            seen = support > 0
            return 100.0 * float(np.mean(tp[seen] / support[seen]))
        # macro-F1 over the classes that occur in references or predictions (scikit-learn's
        # default label set); an unreadable answer is a miss for its true class, not a class
        used = (support > 0) | (predicted > 0)
        return 100.0 * float(np.mean(2 * tp[used] / (support[used] + predicted[used])))

    return finish


HAM_ACCURACY = Metric("Accuracy", _ham_stats, _ham_finish("accuracy"))
HAM_MACRO_F1 = Metric("Macro-F1", _ham_stats, _ham_finish("macro_f1"))
HAM_BALANCED_ACCURACY = Metric("Balanced accuracy", _ham_stats, _ham_finish("balanced"))


def report_metrics() -> dict[str, Metric]:
    """The report-generation metrics evaluate.py reports, by display name."""
    ms = [bleu(1), bleu(4), ROUGE_L, chexpert_f1("micro"), chexpert_f1("macro"),
          chexpert_f1("micro", CHEXPERT_5), chexpert_f1("macro", CHEXPERT_5)]
    return {m.name: m for m in ms}


def ham_metrics() -> dict[str, Metric]:
    ms = [HAM_ACCURACY, HAM_MACRO_F1, HAM_BALANCED_ACCURACY,
          mean_metric("Sentence BLEU", lambda h, r: sentence_bleu(h, r) / 100.0)]
    return {m.name: m for m in ms}


# -----------------------------------------------------------------------------
# Fairness: group scores, gap, equity-scaled metric, bootstrap intervals


def es_metric(m_all: float, group_scores: Sequence[float] | dict) -> dict[str, float]:
    """Equity-scaled metric (paper): ES-M = M_all / (1 + Delta), Delta = max_g M_g - min_g M_g.

    Scores are on the 0-100 scale, so a 5-point gap divides M_all by 6. Uniformly poor
    performance does not score well: a model at 2 for every group has no gap, and ES 2, while
    one at 40 and 44 (M_all 42) has a 4-point gap and ES 42 / 5 = 8.4.

    >>> es_metric(2.0, [2.0, 2.0])
    {'gap': 0.0, 'es': 2.0}
    >>> es_metric(42.0, {"F": 40.0, "M": 44.0})
    {'gap': 4.0, 'es': 8.4}
    """
    named = group_scores.items() if isinstance(group_scores, dict) else enumerate(group_scores)
    scores = []
    for name, v in named:
        # max/min over a NaN depend on where it sits, so a NaN would give an order-dependent gap
        if not math.isfinite(v):
            raise ValueError(f"es_metric: the score of group {name!r} is {v}; leave the group out or fix its score")
        scores.append(float(v))
    if not math.isfinite(m_all):
        raise ValueError(f"es_metric: M_all is {m_all}")
    if len(scores) < 2:
        raise ValueError(f"a gap needs at least two groups, got {len(scores)}")
    gap = max(scores) - min(scores)
    return {"gap": gap, "es": m_all / (1.0 + gap)}


@dataclass(frozen=True)
class GroupScore:
    score: float
    n: int
    small: bool  # fewer than min_group_size samples: reported, but left out of the gap and ES


@dataclass
class FairnessReport:
    metric: str
    attribute: str
    n: int
    overall: float  # the metric on the whole test set
    m_all: float  # numerator of ES: `overall` (paper) or the mean of the compared groups (official script)
    groups: dict[Hashable, GroupScore]
    gap: float  # Delta, over the groups that are not small
    es: float
    # bootstrap percentile intervals (empty without resampling): keys "overall", "m_all", "gap", "es"
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    group_ci: dict[Hashable, tuple[float, float]] = field(default_factory=dict)
    # with resampling: the gap when the groups do not differ (labels shuffled: mean, 95th percentile,
    # mean square), and the gap with that part taken out (see _null_corrected)
    gap_null: dict[str, float] = field(default_factory=dict)
    gap_corrected: float = math.nan

    @property
    def small_groups(self) -> list:
        return [g for g, s in self.groups.items() if s.small]


def _scorer(metric, hyps: Sequence[str], refs: Sequence[str]) -> Callable[[np.ndarray], float]:
    """score(indices) for any subset or resample of the test set. A Metric sums its precomputed
    rows; any other callable (hyps, refs) -> float is re-run on the selected samples (slower)."""
    check_pairs(hyps, refs)
    if isinstance(metric, Metric):
        stats = metric.stats(hyps, refs)  # (n_samples, n_stats), computed once
        return lambda idx: float(metric.finish(stats[idx].sum(axis=0)))
    return lambda idx: float(metric([hyps[i] for i in idx], [refs[i] for i in idx]))


def _group_codes(groups: Sequence[Hashable], n: int, attribute: str) -> tuple[list, np.ndarray]:
    """The sorted group names and, per sample, the index of its group."""
    if len(groups) != n:
        raise ValueError(f"attribute {attribute!r} has {len(groups)} labels for {n} samples")
    missing = [i for i, g in enumerate(groups) if g is None or g == "" or (isinstance(g, float) and math.isnan(g))]
    if missing:
        raise ValueError(
            f"attribute {attribute!r} is missing for {len(missing)} samples (first indices {missing[:5]}); "
            "drop those samples or give them an explicit group such as 'unknown'"
        )
    names = sorted(set(groups), key=str)
    index = {g: k for k, g in enumerate(names)}
    return names, np.array([index[g] for g in groups])


def group_scores(
    metric, hyps: Sequence[str], refs: Sequence[str], groups: Sequence[Hashable], min_group_size: int = 30
) -> dict[Hashable, GroupScore]:
    """The metric on each group's samples (for BLEU: corpus BLEU over that group's reports).

    >>> scores = group_scores(bleu(1), ["a b", "a x", "a b"], ["a b"] * 3, ["F", "M", "M"], min_group_size=2)
    >>> {g: (round(s.score, 2), s.n, s.small) for g, s in scores.items()}
    {'F': (100.0, 1, True), 'M': (75.0, 2, False)}
    """
    score = _scorer(metric, hyps, refs)
    names, codes = _group_codes(groups, len(hyps), "groups")
    out = {}
    for k, g in enumerate(names):
        idx = np.flatnonzero(codes == k)
        out[g] = GroupScore(score(idx), len(idx), len(idx) < min_group_size)
    return out


def _fairness_report_for(score, n, name, attribute, groups, min_group_size, m_all, n_resamples, seed, confidence):
    """The FairnessReport of one metric and one attribute, for fairness_report and fairness_table:
    score(indices) scores a subset of the n samples, groups labels each of them."""
    if m_all not in ("whole_set", "group_mean"):
        raise ValueError(f"m_all must be 'whole_set' (paper) or 'group_mean' (official script), got {m_all!r}")
    names, codes = _group_codes(groups, n, attribute)
    sizes = np.bincount(codes, minlength=len(names))
    eligible = [k for k in range(len(names)) if sizes[k] >= min_group_size]
    if len(eligible) < 2:
        raise ValueError(
            f"attribute {attribute!r}: fewer than two groups with at least {min_group_size} samples "
            f"(sizes {dict(zip(names, sizes.tolist()))}); lower min_group_size (evaluate.py --min-group-size) "
            "to compare them"
        )

    def evaluate(idx: np.ndarray) -> dict:
        # every number of the report for one (re)sample; a group absent from it scores NaN
        out = {"overall": score(idx)}
        for k in range(len(names)):
            members = idx[codes[idx] == k]
            out[k] = score(members) if len(members) else math.nan
        kept = [out[k] for k in eligible]
        out["m_all"] = out["overall"] if m_all == "whole_set" else float(np.mean(kept))
        if any(math.isnan(x) for x in kept):  # a resample that lacks a compared group has no gap
            out["gap"] = out["es"] = math.nan
        else:
            out.update(es_metric(out["m_all"], kept))
        return out

    point = evaluate(np.arange(n))
    report = FairnessReport(
        metric=name, attribute=attribute, n=n, overall=point["overall"], m_all=point["m_all"],
        groups={g: GroupScore(point[k], int(sizes[k]), k not in eligible) for k, g in enumerate(names)},
        gap=point["gap"], es=point["es"],
    )
    if n_resamples > 0:
        rng = np.random.default_rng(seed)
        members = [np.flatnonzero(codes == k) for k in range(len(names))]
        # the gap's null: the same groups' sizes with the labels shuffled, i.e. what max - min comes to
        # when the groups do not differ at all (it is not 0: max - min of noisy scores is biased up)
        null = np.array([_gap_of(score, rng.permutation(n), members, eligible) for _ in range(n_resamples)])
        q0 = float(np.nanmean(null ** 2))
        report.gap_null = {"mean": float(np.nanmean(null)), "q95": float(np.nanpercentile(null, 95)), "mean_sq": q0}
        report.gap_corrected = _null_corrected(point["gap"], q0)
        # stratified bootstrap: each group resampled within itself, its size kept, everything redone
        reps = [evaluate(np.concatenate([rng.choice(m, size=len(m)) for m in members])) for _ in range(n_resamples)]
        for key in ("overall", "m_all", "gap", "es"):
            report.ci[key] = percentile_interval([r[key] for r in reps], confidence)
        report.ci["gap_corrected"] = percentile_interval([_null_corrected(r["gap"], q0) for r in reps], confidence)
        for k, g in enumerate(names):
            report.group_ci[g] = percentile_interval([r[k] for r in reps], confidence)
    return report


def _gap_of(score, perm, members, eligible):
    """max - min over the eligible groups when each group's members are replaced by the samples
    at the same positions of a permutation: groups of the same sizes, drawn from everyone."""
    scores = [score(perm[members[k]]) for k in eligible]
    return max(scores) - min(scores)


def _null_corrected(gap, null_mean_sq):
    """sqrt(max(0, gap^2 - E_null[gap^2])): the gap with the part that noise alone gives it taken
    out. With no difference between groups it is 0 more often than not (the plug-in max - min is
    biased up by about 2 standard errors of a group score); with one large difference it is within
    a few tenths of the plug-in value. No estimator of max - min is unbiased at every gap (it is a
    non-smooth function of the group means): tests/test_metrics.py measures bias and coverage."""
    return math.sqrt(max(0.0, gap * gap - null_mean_sq)) if math.isfinite(gap) else math.nan


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom, for any df >= 1 (a mean's 95%
    interval over n seeds is mean +- t_quantile(0.975, n - 1) sd / sqrt(n)): bisection on the CDF
    F(t) = 1 - I_x(df / 2, 1 / 2) / 2 for t >= 0, x = df / (df + t^2), I the regularized incomplete
    beta function."""
    if not (0 < p < 1) or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    cdf = lambda t: 1 - 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, from its continued fraction (evaluated
    by the modified Lentz method; the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps it converging)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),          # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h / a


def percentile_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap replicates; NaN replicates are skipped."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (math.nan, math.nan)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return (float(low), float(high))


def fairness_report(
    metric, hyps: Sequence[str], refs: Sequence[str], groups: Sequence[Hashable], *, attribute: str = "group",
    min_group_size: int = 30, m_all: str = "whole_set", n_resamples: int = 0, seed: int = 0,
    confidence: float = 0.95,
) -> FairnessReport:
    """Group scores, gap and ES-M of one metric (a Metric, or any (hyps, refs) -> 0-100 callable)
    for one attribute.

    Groups smaller than `min_group_size` are scored and flagged but take no part in the gap or
    in ES: a score over a handful of reports is mostly noise, and would decide max - min. With
    n_resamples > 0 each group is resampled with replacement within itself (a stratified
    bootstrap: the group sizes stay those of the test set), every number is recomputed on each
    resample, and the percentile intervals go into `ci` and `group_ci`. Beside them: the gap's
    null (`gap_null`: max - min when the group labels are shuffled, what "no gap" looks like at
    these group sizes) and the gap with that part taken out (`gap_corrected`, ci["gap_corrected"]).

    >>> hyps = ["a b c", "a b x", "a b c", "x y z"]
    >>> refs = ["a b c", "a b c", "a b c", "a b c"]
    >>> r = fairness_report(bleu(1), hyps, refs, ["F", "F", "M", "M"], attribute="sex", min_group_size=1)
    >>> round(r.overall, 2), {g: round(s.score, 2) for g, s in r.groups.items()}
    (66.67, {'F': 83.33, 'M': 50.0})
    >>> round(r.gap, 2), round(r.es, 2)
    (33.33, 1.94)

    (BLEU-1 counts matching words: F 5 of 6, M 3 of 6, all 8 of 12; ES = 66.67 / (1 + 33.33).)
    """
    score = _scorer(metric, hyps, refs)
    name = getattr(metric, "name", getattr(metric, "__name__", "metric"))
    return _fairness_report_for(score, len(hyps), name, attribute, groups, min_group_size, m_all, n_resamples,
                                seed, confidence)


def fairness_table(
    hyps: Sequence[str], refs: Sequence[str], attrs: dict[str, Sequence[Hashable]], metrics: dict[str, object], *,
    min_group_size: int = 30, m_all: str = "whole_set", n_resamples: int = 0, seed: int = 0,
    confidence: float = 0.95,
) -> list[FairnessReport]:
    """A report for every (attribute, metric) pair, named by the keys of `attrs` and `metrics`.
    Per-sample statistics are computed once per metric, and all reports draw the same resamples
    (same seed), so their intervals are paired."""
    check_pairs(hyps, refs)
    for attribute, groups in attrs.items():  # fail on bad metadata before any scoring
        _group_codes(groups, len(hyps), attribute)
    scorers = {name: _scorer(metric, hyps, refs) for name, metric in metrics.items()}
    return [
        _fairness_report_for(scorers[name], len(hyps), name, attribute, groups, min_group_size, m_all, n_resamples,
                             seed, confidence)
        for attribute, groups in attrs.items()
        for name in metrics
    ]


def paired_difference(
    metric, hyps_a: Sequence[str], hyps_b: Sequence[str], refs: Sequence[str], groups: Sequence[Hashable], *,
    min_group_size: int = 30, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
) -> dict[str, tuple[float, float, float]]:
    """Two systems' reports on the same test cases (a, b): the differences a - b of the gap and of
    the whole-set score, each as (point, low, high) from a paired stratified bootstrap. Every
    resample draws each group's cases within that group and scores both systems on the same draw,
    so the case-level noise the two share cancels; what is left is the difference the test set can
    resolve for this pair of runs (not the spread over training seeds: demo.py's paired
    t-intervals over runs are for that).

    >>> refs = ["a b"] * 4
    >>> d = paired_difference(bleu(1), ["a b", "a b", "a x", "a b"], ["a b"] * 4, refs, ["F", "F", "M", "M"],
    ...                       min_group_size=1, n_resamples=0)
    >>> round(d["gap"][0], 2), round(d["overall"][0], 2)
    (25.0, -12.5)
    """
    score_a, score_b = _scorer(metric, hyps_a, refs), _scorer(metric, hyps_b, refs)  # each checks its pairs
    names, codes = _group_codes(groups, len(refs), "groups")
    members = [np.flatnonzero(codes == k) for k in range(len(names))]
    kept = [k for k, m in enumerate(members) if len(m) >= min_group_size]
    if len(kept) < 2:
        raise ValueError(f"paired_difference: fewer than two groups with at least {min_group_size} samples "
                         f"(sizes {[len(m) for m in members]})")

    every_case = np.arange(len(refs))

    def diffs(sample):  # sample: one index array per group; the gap over the kept ones
        every = np.concatenate(sample)
        return (_gap_of(score_a, every_case, sample, kept) - _gap_of(score_b, every_case, sample, kept),
                score_a(every) - score_b(every))

    point = diffs(members)
    rng = np.random.default_rng(seed)
    reps = np.array([diffs([rng.choice(m, size=len(m)) for m in members]) for _ in range(n_resamples)]).reshape(-1, 2)
    out = {}
    for j, key in enumerate(("gap", "overall")):
        lo, hi = percentile_interval(reps[:, j], confidence) if n_resamples > 0 else (math.nan, math.nan)
        out[key] = (float(point[j]), lo, hi)
    return out


def bootstrap_ci(
    metric, hyps: Sequence[str], refs: Sequence[str], *, n_resamples: int = 1000, seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the whole-set score, resampling samples."""
    score = _scorer(metric, hyps, refs)
    rng = np.random.default_rng(seed)
    n = len(hyps)
    return percentile_interval([score(rng.integers(0, n, size=n)) for _ in range(n_resamples)], confidence)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table of already formatted cells: the project's one table renderer."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def format_table(reports: Sequence[FairnessReport]) -> str:
    """One line per report: M_all, gap, ES and the group scores (* = small group, not in the gap)."""
    lines = [f"{'attribute':<12} {'metric':<24} {'M_all':>7} {'gap':>7} {'ES':>7}  groups"]
    for r in reports:
        groups = "  ".join(f"{g}={s.score:.2f} (n={s.n}){'*' if s.small else ''}" for g, s in r.groups.items())
        lines.append(f"{r.attribute:<12} {r.metric:<24} {r.m_all:7.2f} {r.gap:7.2f} {r.es:7.2f}  {groups}")
    return "\n".join(lines)
