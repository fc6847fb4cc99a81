"""Exercise 10 (core): corpus BLEU with the brevity penalty.

Read: Papineni et al. 2002, "BLEU", Sec. 2; metrics.py `bleu` (its worked example),
`bleu_sample_stats`, `bleu_from_stats`. The check compares with the project's BLEU and with
sacreBLEU's corpus_score when sacrebleu is installed (pip install sacrebleu).
Write: `corpus_bleu` below. Tokenise with metrics.tokenize_13a (sacreBLEU's default tokeniser);
counting, clipping, smoothing and the brevity penalty are yours.
Check: python exercises/check.py bleu path/to/your/bleu.py
"""

import math
from collections import Counter

from metrics import tokenize_13a  # noqa: F401  (str -> list of tokens)


def corpus_bleu(hyps, refs, max_order=4):
    """
    Corpus BLEU-N on 0-100, one reference per hypothesis, as sacreBLEU computes it:
      - p_n = (sum over sentences of clipped n-gram matches) / (sum of hypothesis n-grams):
        counts are summed over the corpus first (not a mean of sentence scores); an n-gram is
        credited at most as often as it occurs in its reference (clipping).
      - no hypothesis word, or no matching unigram in the whole corpus: 0.
      - an order with no hypothesis n-gram at all (every hypothesis shorter than n words): 0.
      - 'exp' smoothing: the k-th order (k = 1, 2, ...) that has n-grams but no match gets
        p_n = 1 / (2^k * total_n) instead of 0.
      - BP = 1 if c >= r else exp(1 - r / c), c and r the total hypothesis and reference lengths.
      - BLEU = 100 * BP * exp(mean over n of log p_n).
    """
    raise NotImplementedError("write corpus_bleu")
