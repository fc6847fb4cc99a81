"""Exercise 4 (warm-up): the equity-scaled metric ES-M.

Read: the paper's "Equity-Scaled Metric" (why a small gap alone is not enough: uniformly poor
performance has no gap); metrics.py `es_metric` and `fairness_report`.
Write: `es_metric` below.
Check: python exercises/check.py es_metric path/to/your/es_metric.py
"""


def es_metric(m_all, group_scores):
    """
    ES-M = M_all / (1 + Delta), Delta = max_g M_g - min_g M_g (scores on the 0-100 scale).

    group_scores: a list of group scores, or a dict {group name: score}. Returns
    {"gap": Delta, "es": ES-M}. Fewer than two groups: raise ValueError (there is no gap).
    """
    raise NotImplementedError("write es_metric")
