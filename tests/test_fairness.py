"""Tests for fairness.py: pooling, the DAC, CLUB / DIM, the stop-gradients and the paper's step."""

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fairness import (DAC, H_NORMS, FairnessConfig, FairnessRegularizer, club, dac_loss, dim_penalty, leak_report,
                      normalize_h, pool_hidden, select_layers, token_mask)


@pytest.fixture(autouse=True)
def one_thread():
    # the tensors here are tiny: one thread is faster, and keeps the reductions deterministic
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(**overrides):
    kw = dict(attributes=("race", "gender"), num_classes={"race": 3, "gender": 2},
              lambdas={"race": 0.5, "gender": 0.25})
    kw.update(overrides)
    return FairnessConfig(**kw)


def backbone_and_h(batch=6, hidden=8, seed=0):
    torch.manual_seed(seed)
    enc = nn.Linear(5, hidden)
    x = torch.randn(batch, 5)
    return enc, enc(x)


def mixed_attrs(batch=6):
    g = torch.Generator().manual_seed(1)
    return {"race": torch.randint(0, 3, (batch,), generator=g),
            "gender": torch.randint(0, 2, (batch,), generator=g)}


# -----------------------------------------------------------------------------
# the DAC's size

def test_default_dac_has_57358_parameters():
    # official heads: race 9 + age 3 + gender 2 = 14 classes on h of size 4096 -> the paper's "~57K"
    fair = FairnessRegularizer(FairnessConfig(), hidden_size=4096)
    assert sum(p.numel() for p in fair.parameters()) == 14 * 4096 + 14 == 57_358


def test_dac_is_one_linear_head_per_attribute():
    dac = DAC(16, {"race": 9, "gender": 2})
    assert sum(p.numel() for p in dac.parameters()) == (16 * 9 + 9) + (16 * 2 + 2)
    assert all(isinstance(head, nn.Linear) for head in dac.heads.values())
    fair = FairnessRegularizer(FairnessConfig(), hidden_size=16)  # unknown is left out, not a class of its own
    assert {a: x.shape for a, x in fair.dac(torch.zeros(1, 16)).items()} == {
        "race": (1, 9), "age": (1, 3), "gender": (1, 2)}


# -----------------------------------------------------------------------------
# h(x)

def test_select_layers_follows_the_hf_hidden_list():
    hidden = [torch.full((1, 1, 1), float(i)) for i in range(33)]  # Vicuna-7B: embeddings + 32 layers
    pick = lambda layer: [int(x.item()) for x in select_layers(hidden, layer)]
    assert pick("first") == [1]
    assert pick("mid") == [16]  # official hidden_states[int(0.5 * 33)]
    assert pick("last") == [32]
    assert pick("mean") == [1, 16, 32]
    assert pick(5) == [5] and pick(-2) == [31]
    with pytest.raises(IndexError, match="layer=33"):
        select_layers(hidden, 33)


def test_token_masks():
    image = torch.tensor([[0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert token_mask("image", image, attn, labels).tolist() == [[0, 1, 1, 0, 0, 0]]
    assert token_mask("answer", image, attn, labels).tolist() == [[0, 0, 0, 1, 1, 0]]
    assert token_mask("all", image, attn, labels).tolist() == [[1, 1, 1, 1, 1, 0]]
    labels_on_pad = torch.tensor([[-100, -100, -100, 7, 8, 9]])  # padding never counts
    assert token_mask("answer", image, attn, labels_on_pad).tolist() == [[0, 0, 0, 1, 1, 0]]
    with pytest.raises(ValueError, match="needs image_mask"):
        token_mask("image", None, attn, labels)


def test_masked_mean_pooling_and_layer_mean():
    torch.manual_seed(0)
    hidden = [torch.randn(3, 5, 4) for _ in range(5)]
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    h, nonempty = pool_hidden(hidden, mask, layer="mid")
    assert torch.allclose(h[0], hidden[2][0, :2].mean(0))
    assert torch.allclose(h[1], hidden[2][1, 4])
    assert h[2].abs().sum() == 0 and nonempty.tolist() == [True, True, False]  # empty mask -> 0
    h_mean, _ = pool_hidden(hidden, mask, layer="mean")  # first = 1, mid = 2, last = 4
    expected = torch.stack([pool_hidden(hidden, mask, layer=i)[0] for i in (1, 2, 4)]).mean(0)
    assert torch.allclose(h_mean, expected)
    h_bf16, _ = pool_hidden([x.bfloat16() for x in hidden], mask, layer="mid")
    assert h_bf16.dtype == torch.float32


def test_random_token_pooling_picks_one_masked_token_l2_normalised():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    hidden = [torch.zeros_like(x), x]
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    candidates = F.normalize(x[0, [1, 3, 4]], dim=-1)
    picked = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        h, nonempty = pool_hidden(hidden, mask, layer="last", pool="random_token", generator=g)
        match = (candidates - h[0]).abs().amax(dim=-1) < 1e-6
        assert match.sum() == 1, "h must be one masked token, L2-normalised"
        picked.add(int(match.nonzero()))
        assert h[1].abs().sum() == 0 and nonempty.tolist() == [True, False]
    assert picked == {0, 1, 2}  # every masked token can be drawn
    same_a = pool_hidden(hidden, mask, "last", "random_token", torch.Generator().manual_seed(3))[0]
    same_b = pool_hidden(hidden, mask, "last", "random_token", torch.Generator().manual_seed(3))[0]
    assert torch.equal(same_a, same_b)


def test_regularizer_pool_uses_config():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 4, 3) for _ in range(3)]
    image = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    attn = torch.ones(2, 4, dtype=torch.long)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 6]])
    fair = FairnessRegularizer(small_cfg(tokens="answer", layer="last"), hidden_size=3)
    h, _ = fair.pool(hidden, image_mask=image, attention_mask=attn, labels=labels)
    assert torch.allclose(h[0], hidden[2][0, 2:].mean(0)) and torch.allclose(h[1], hidden[2][1, 3])


# -----------------------------------------------------------------------------
# CLUB

def club_by_pairs(logits, labels, negatives):
    """CLUB written as the paper reads: explicit positive and negative pairs."""
    keep = labels >= 0
    log_q, y = logits[keep].log_softmax(-1), labels[keep]
    n = len(y)
    positive = sum(log_q[i, y[i]] for i in range(n)) / n
    pairs = [(i, j) for i in range(n) for j in range(n) if negatives == "all" or i != j]
    negative = sum(log_q[i, y[j]] for i, j in pairs) / len(pairs)
    return positive - negative


@pytest.mark.parametrize("negatives", ["off_diagonal", "all"])
def test_club_matches_the_pairwise_definition(negatives):
    torch.manual_seed(0)
    logits = torch.randn(9, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, -1, 1, 2, 0, -1, 3])
    assert club(logits, labels, negatives).item() == pytest.approx(
        club_by_pairs(logits, labels, negatives).item(), abs=1e-6)


def mixture_mi(mu):
    """I(h; a) for a ~ Bernoulli(1/2), h | a ~ N((2a - 1) mu, 1), by quadrature (nats)."""
    h = torch.linspace(-mu - 12, mu + 12, 200_001, dtype=torch.float64)
    p0, p1 = (torch.exp(-0.5 * (h - m) ** 2) / math.sqrt(2 * math.pi) for m in (-mu, mu))
    ph = 0.5 * (p0 + p1)
    integrand = 0.5 * p0 * torch.log(p0 / ph) + 0.5 * p1 * torch.log(p1 / ph)
    return torch.trapezoid(integrand, h).item()


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])  # 3.0: a is almost exactly recoverable from h
def test_club_with_the_true_posterior_is_at_least_the_true_mi(mu):
    n = 4000
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (n,), generator=g)
    h = (2 * a - 1) * mu + torch.randn(n, generator=g)
    # true posterior: log p(a | h) = (2a - 1) mu h - log(e^{mu h} + e^{-mu h})
    logits = torch.stack([-mu * h, mu * h], dim=1)
    mi = mixture_mi(mu)
    estimate = club(logits, a).item()
    assert estimate >= mi
    # here E[CLUB] = mu^2 exactly (the log-partition cancels between positive and negative pairs);
    # the per-sample term has std mu, hence the tolerance
    assert estimate == pytest.approx(mu ** 2, abs=5 * mu / math.sqrt(n))
    assert mi < math.log(2)


def test_club_is_near_zero_when_h_is_independent_of_a():
    n = 4000
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 2, (n,), generator=g)
    h = torch.randn(n, 1, generator=g)  # carries nothing about a
    fixed_q = torch.cat([-h, h], dim=1)  # a confident but wrong belief that h tells a
    for negatives in ("off_diagonal", "all"):
        assert abs(club(fixed_q, a, negatives).item()) < 0.06
    # and with a DAC fitted on these samples
    fair = FairnessRegularizer(FairnessConfig.single("gender", num_classes={"gender": 2},
                                                     lambdas={"gender": 1.0}), hidden_size=1)
    opt = torch.optim.LBFGS(fair.parameters(), max_iter=50, line_search_fn="strong_wolfe")
    fair.alternating_step(h, {"gender": a}, opt)
    _, stats = fair.dim_loss(h, {"gender": a})
    assert abs(stats["club/gender"].item()) < 0.01


def test_dim_penalty():
    c = torch.tensor([-0.3, 0.0, 0.2])
    assert torch.allclose(dim_penalty(c), torch.sqrt(c ** 2 + 1e-6))
    assert torch.equal(dim_penalty(c, smooth_abs=False), c)


# -----------------------------------------------------------------------------
# stop-gradients and the paper's step

def grads(module):
    return [p.grad for p in module.parameters()]


def test_dac_loss_gives_no_gradient_to_the_backbone():
    enc, h = backbone_and_h()
    fair = FairnessRegularizer(small_cfg(), hidden_size=8)
    loss, _ = fair.dac_loss(h, mixed_attrs())
    loss.backward()
    assert all(g is None for g in grads(enc))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(fair))


def test_dim_loss_gives_no_gradient_to_phi():
    enc, h = backbone_and_h()
    fair = FairnessRegularizer(small_cfg(), hidden_size=8)
    loss, _ = fair.dim_loss(h, mixed_attrs())
    loss.backward()
    assert all(g is None for g in grads(fair))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(enc))


def test_single_step_keeps_the_two_terms_apart():
    cfg = small_cfg(protocol="single_step", dac_weight=0.5)
    attrs = mixed_attrs()

    def run(which):
        enc, h = backbone_and_h()
        torch.manual_seed(5)
        fair = FairnessRegularizer(cfg, hidden_size=8)
        if which == "total":
            loss, stats = fair(h, attrs)
        elif which == "dac":
            loss = cfg.dac_weight * fair.dac_loss(h, attrs)[0]
        else:
            loss = fair.dim_loss(h, attrs)[0]
        loss.backward()
        return grads(enc), grads(fair)

    enc_total, phi_total = run("total")
    enc_dac, phi_dac = run("dac")
    enc_dim, phi_dim = run("dim")
    assert all(g is None for g in enc_dac + phi_dim)
    for a, b in zip(phi_total, phi_dac):  # phi learns from lambda1 L_DAC only
        assert torch.allclose(a, b)
    for a, b in zip(enc_total, enc_dim):  # the backbone learns from L_DIM only
        assert torch.allclose(a, b)


def test_alternating_step_updates_phi_then_returns_dim_with_phi_frozen():
    enc, h = backbone_and_h()
    attrs = mixed_attrs()
    fair = FairnessRegularizer(small_cfg(dac_steps=2), hidden_size=8)
    opt = torch.optim.SGD(fair.parameters(), lr=0.5)
    before = [p.detach().clone() for p in fair.parameters()]
    first_dac, _ = fair.dac_loss(h, attrs)
    dim, stats = fair(h, attrs, opt)  # one backbone forward, phi stepped inside
    assert all(g is None for g in grads(enc)), "phi's update must not touch the backbone"
    assert any(not torch.equal(p, q) for p, q in zip(fair.parameters(), before)), "phi was not updated"
    assert stats["dac_loss"] == pytest.approx(first_dac.item())  # measured before the update
    assert fair.dac_loss(h, attrs)[0] < first_dac
    assert dim.item() == pytest.approx(fair.dim_loss(h, attrs)[0].item())  # with the updated phi
    opt.zero_grad(set_to_none=True)
    dim.backward()
    assert all(g is None for g in grads(fair))
    assert all(g is not None and torch.isfinite(g).all() for g in grads(enc))
    assert set(stats) == {"dac_loss/race", "dac_acc/race", "n/race", "club/race", "dac_loss/gender",
                          "dac_acc/gender", "n/gender", "club/gender", "dac_loss", "dim_loss"}
    with pytest.raises(ValueError, match="needs a dac_optimizer"):
        fair(h, attrs)


def test_joint_mode_sums_weighted_attributes_and_single_mode_keeps_one():
    _, h = backbone_and_h()
    attrs = mixed_attrs()
    fair = FairnessRegularizer(small_cfg(), hidden_size=8)
    total, stats = fair.dim_loss(h, attrs)
    expected = 0.5 * dim_penalty(stats["club/race"]) + 0.25 * dim_penalty(stats["club/gender"])
    assert total.item() == pytest.approx(expected.item())
    single = FairnessRegularizer(FairnessConfig.single("gender", num_classes={"gender": 2},
                                                       lambdas={"gender": 1.0}), hidden_size=8)
    _, single_stats = single.dim_loss(h, {"gender": attrs["gender"]})  # race is not needed
    assert "club/race" not in single_stats and list(single.dac.heads) == ["gender"]


# -----------------------------------------------------------------------------
# unknown labels and edge cases

def test_unknown_labels_are_left_out():
    _, h = backbone_and_h(batch=6)
    attrs = {"race": torch.tensor([0, -1, 2, 1, -1, 2]), "gender": torch.tensor([1, 0, -1, 0, 1, 1])}
    fair = FairnessRegularizer(small_cfg(), hidden_size=8)
    logits = fair.dac(h)
    for a in ("race", "gender"):
        keep = attrs[a] >= 0
        assert dac_loss(logits[a], attrs[a]).item() == pytest.approx(F.cross_entropy(logits[a][keep], attrs[a][keep]).item())
        assert club(logits[a], attrs[a]).item() == pytest.approx(club(logits[a][keep], attrs[a][keep]).item())
    _, stats = fair.dac_loss(h, attrs)
    assert stats["n/race"] == 4 and stats["n/gender"] == 5
    ys = fair.labels(attrs, 6, h.device)  # unknown stays -1: never a class of its own
    assert ys["race"].tolist() == [0, -1, 2, 1, -1, 2] and ys["gender"].tolist() == [1, 0, -1, 0, 1, 1]


def test_sample_with_empty_token_mask_is_left_out():
    torch.manual_seed(0)
    hidden = [torch.randn(4, 3, 8, requires_grad=True) for _ in range(3)]
    image = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    attrs = {"race": torch.tensor([0, 1, 2, 1]), "gender": torch.tensor([1, 0, 0, 1])}
    fair = FairnessRegularizer(small_cfg(), hidden_size=8)
    h, valid = fair.pool(hidden, image_mask=image)
    loss, _ = fair.dim_loss(h, attrs, valid=valid)
    keep = torch.tensor([0, 2, 3])
    ref, _ = fair.dim_loss(h[keep], {a: v[keep] for a, v in attrs.items()})
    assert loss.item() == pytest.approx(ref.item())


EDGE_CASES = {
    # name: (num_classes, attrs); each gives CLUB = 0 by definition (see fairness.club)
    "batch_of_one": ({"race": 3, "gender": 2}, {"race": [2], "gender": [1]}),
    "one_group": ({"race": 3, "gender": 2}, {"race": [1, 1, 1, 1], "gender": [0, 0, 0, 0]}),
    "one_class_attribute": ({"race": 1, "gender": 1}, {"race": [0, 0, 0], "gender": [0, 0, 0]}),
    "all_unknown": ({"race": 3, "gender": 2}, {"race": [-1, -1, -1], "gender": [-1, -1, -1]}),
}


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("protocol", ["alternating", "single_step"])
def test_edge_cases_give_defined_values(case, protocol):
    num_classes, attrs = EDGE_CASES[case]
    attrs = {a: torch.tensor(v) for a, v in attrs.items()}
    batch = len(attrs["race"])
    enc, h = backbone_and_h(batch=batch)
    cfg = small_cfg(num_classes=num_classes, protocol=protocol)
    fair = FairnessRegularizer(cfg, hidden_size=8)
    opt = torch.optim.SGD(fair.parameters(), lr=0.1)
    loss, stats = fair(h, attrs, opt)
    loss.backward()
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert all(g is None or torch.isfinite(g).all() for g in grads(enc) + grads(fair))
    for a in cfg.attributes:
        assert abs(stats[f"club/{a}"].item()) < 1e-6
    # smooth |CLUB| at CLUB = 0 is sqrt(eps) per attribute; its gradient there is zero
    assert stats["dim_loss"].item() == pytest.approx((0.5 + 0.25) * math.sqrt(1e-6), rel=1e-3)
    assert all(g is None or g.abs().max() < 1e-6 for g in grads(enc))
    if case == "all_unknown":
        assert stats["dac_loss"] == 0 and stats["n/race"] == 0 and stats["dac_acc/race"] == 0


def test_config_and_label_errors():
    with pytest.raises(ValueError, match="lambdas has no entry for attribute 'age'"):
        FairnessConfig(lambdas={"race": 1.0, "gender": 1.0})
    with pytest.raises(ValueError, match="layer must be one of"):
        FairnessConfig(layer="middle")
    with pytest.raises(ValueError, match="negatives must be one of"):
        FairnessConfig(negatives="diag")
    fair = FairnessRegularizer(small_cfg(), hidden_size=8)
    _, h = backbone_and_h(batch=2)
    with pytest.raises(KeyError, match="'gender'"):
        fair.dim_loss(h, {"race": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match=r"outside \[-1, 1\]"):
        fair.dim_loss(h, {"race": torch.tensor([0, 1]), "gender": torch.tensor([0, 2])})


# -----------------------------------------------------------------------------
# DIM removes what a fresh probe can read

D, SIGNAL = 16, 3.0


def planted_data(n, g):
    """Tokens (n, 4, D) of unit noise with a 4-way task label in dims 0-1, gender (2 groups) in
    dim 2 and age (3 groups) in dim 3, the same in every token; token 4 is padding."""
    y = torch.randint(0, 4, (n,), generator=g)
    attrs = {"gender": torch.randint(0, 2, (n,), generator=g), "age": torch.randint(0, 3, (n,), generator=g)}
    x = torch.randn(n, 4, D, generator=g)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    x[:, :, 0:2] += centers[y].unsqueeze(1)
    x[:, :, 2] += SIGNAL * (2 * attrs["gender"] - 1).float().unsqueeze(1)
    x[:, :, 3] += SIGNAL * (attrs["age"] - 1).float().unsqueeze(1)
    mask = torch.ones(n, 4, dtype=torch.bool)
    mask[:, 3] = False
    return x, mask, y, attrs


def probe_accuracy(h, labels, k):
    """A fresh logistic probe, fitted on the first half of h (standardised), scored on the second."""
    half = len(h) // 2
    h = (h - h[:half].mean(0)) / (h[:half].std(0) + 1e-6)
    torch.manual_seed(0)
    probe = nn.Linear(h.shape[1], k)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(h[:half]), labels[:half])
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (probe(h[half:]).argmax(-1) == labels[half:]).float().mean().item()


@functools.cache
def train_and_probe(attributes, steps=100, n=1024, seed=0):
    """
    A small encoder (per-token MLP, then h = masked mean) trained on a task loss, plus L_DIM for
    `attributes` through FairnessRegularizer's alternating step. Full batch, so what is measured
    is DIM rather than minibatch noise; phi is refit each step (LBFGS, warm-started) so that it
    stays near its best response, as the CLUB bound needs q close to p(a | h). With one Adam step
    on phi instead, the encoder learns to fool the lagging phi and a fresh probe still reads the
    attribute (see the caveat in fairness.py).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, 8))
    task = nn.Linear(8, 4)
    opt = torch.optim.Adam([*enc.parameters(), *task.parameters()], lr=3e-3)
    fair, dac_opt = None, None
    if attributes:
        cfg = FairnessConfig(attributes=attributes, num_classes={"gender": 2, "age": 3},
                             lambdas={"gender": 1.0, "age": 1.0})
        fair = FairnessRegularizer(cfg, hidden_size=8)
        dac_opt = torch.optim.LBFGS(fair.parameters(), max_iter=10, line_search_fn="strong_wolfe")
    x, mask, y, attrs = planted_data(n, g)
    for _ in range(steps):
        h, valid = pool_hidden([x, enc(x)], mask, layer="last")
        loss = F.cross_entropy(task(h), y)
        if fair is not None:
            dim, _ = fair(h, attrs, dac_opt, valid=valid)
            loss = loss + dim
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    x, mask, y, attrs = planted_data(4000, torch.Generator().manual_seed(1234))  # fresh samples
    with torch.no_grad():
        h, _ = pool_hidden([x, enc(x)], mask, layer="last")
        task_acc = (task(h).argmax(-1) == y).float().mean().item()
    return {"task": task_acc, "gender": probe_accuracy(h, attrs["gender"], 2),
            "age": probe_accuracy(h, attrs["age"], 3)}


def test_dim_drives_a_fresh_probe_to_chance():
    plain = train_and_probe(())
    joint = train_and_probe(("gender", "age"))
    assert plain["gender"] > 0.85 and plain["age"] > 0.6  # chance: 0.5 and 0.33
    assert joint["gender"] < 0.6 and joint["age"] < 0.45
    assert plain["task"] > 0.9 and joint["task"] > 0.9  # the task is kept


def test_single_attribute_debiasing_leaves_the_other_attribute():
    # the paper's "seesaw": debiasing gender alone does nothing for age
    plain = train_and_probe(())
    gender_only = train_and_probe(("gender",))
    assert gender_only["gender"] < 0.6
    assert gender_only["age"] > 0.6 and plain["age"] > 0.6


def test_batch_h_norm_lets_a_one_step_phi_read_a_small_dimension():
    """Not in the paper (h_norm="batch"): h dominated by large dimensions, the attribute in a tiny
    one. One Adam step per batch, as Algorithm 1: raw h keeps phi near chance; h standardised over
    the batch lets it read the attribute. DIM still reaches h only, through the statistics too."""
    def planted(n, g):
        a = torch.randint(0, 2, (n,), generator=g)
        h = torch.randn(n, 16, generator=g) * 100.0
        h[:, 0] = (a.float() * 2 - 1) * 0.05 + torch.randn(n, generator=g) * 0.01
        return h, {"gender": a}

    def run(h_norm):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        fair = FairnessRegularizer(FairnessConfig.single("gender", h_norm=h_norm), hidden_size=16)
        opt = torch.optim.Adam(fair.parameters(), lr=1e-2)
        for _ in range(300):
            h, a = planted(16, g)
            opt.zero_grad()
            fair.dac_loss(h, a)[0].backward()
            opt.step()
        with torch.no_grad():  # held out, through the same view of h (batch: the held-out set's statistics)
            return fair, fair.dac_loss(*planted(2000, g))[1]["dac_acc/gender"].item()

    _, raw = run("none")
    fair, normed = run("batch")
    assert raw < 0.65 and normed > 0.95, (raw, normed)
    fair.zero_grad(set_to_none=True)
    h = (torch.randn(8, 16) * 100).requires_grad_()
    dim, _ = fair.dim_loss(h, {"gender": torch.tensor([0, 1] * 4)})
    dim.backward()
    assert all(p.grad is None for p in fair.parameters())
    assert h.grad is not None and h.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# normalize_h: the view of h that phi and DIM share

SCALES = (1e-3, 0.5, 7.0, 1e4)


def scaled_losses(h_norm, c):
    """(L_DIM, L_DAC) of c * h for one random phi, h and batch with both attributes known."""
    _, h = backbone_and_h(batch=12)
    torch.manual_seed(3)
    fair = FairnessRegularizer(small_cfg(h_norm=h_norm), hidden_size=8)
    attrs = mixed_attrs(batch=12)
    return fair.dim_loss(c * h.detach(), attrs)[0].item(), fair.dac_loss(c * h.detach(), attrs)[0].item()


@pytest.mark.parametrize("c", SCALES)
@pytest.mark.parametrize("h_norm", ["l2", "batch"])
def test_l2_and_batch_h_norm_are_blind_to_the_scale_of_h(h_norm, c):
    # the backbone cannot lower L_DIM (or change what phi learns) by shrinking or growing h
    dim1, dac1 = scaled_losses(h_norm, 1.0)
    dim_c, dac_c = scaled_losses(h_norm, c)
    assert dim_c == pytest.approx(dim1, rel=1e-5) and dac_c == pytest.approx(dac1, rel=1e-5)


@pytest.mark.parametrize("c", SCALES)
def test_raw_h_losses_depend_on_the_scale_of_h(c):
    dim1, dac1 = scaled_losses("none", 1.0)
    dim_c, dac_c = scaled_losses("none", c)
    assert dim_c != pytest.approx(dim1, rel=1e-3) and dac_c != pytest.approx(dac1, rel=1e-3)


def test_normalize_h_by_hand():
    h = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert torch.equal(normalize_h(h, "none"), h)
    torch.testing.assert_close(normalize_h(h, "l2"), h / h.norm(dim=1, keepdim=True))
    z = normalize_h(h, "batch")
    mu, var = h.mean(0), h.var(0, unbiased=False)
    torch.testing.assert_close(z, (h - mu) / torch.sqrt(var + 1e-5 * var.mean()))
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="h_norm must be one of"):
        normalize_h(h, "layer")
    with pytest.raises(ValueError, match="FairnessConfig.h_norm must be one of"):
        FairnessConfig(h_norm="layer")
    assert H_NORMS == ("none", "l2", "batch")


def test_batch_h_norm_dim_gradient_reaches_h_and_never_phi():
    enc, h = backbone_and_h(batch=8)
    fair = FairnessRegularizer(small_cfg(h_norm="batch"), hidden_size=8)
    loss, _ = fair.dim_loss(h, mixed_attrs(batch=8))
    loss.backward()
    assert all(g is None for g in grads(fair))
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads(enc))
    # and L_DAC the other way round: phi only, even though the statistics come from h
    enc, h = backbone_and_h(batch=8)
    fair.zero_grad(set_to_none=True)
    fair.dac_loss(h, mixed_attrs(batch=8))[0].backward()
    assert all(g is None for g in grads(enc)) and all(g is not None for g in grads(fair))


def test_batch_h_norm_statistics_ignore_invalid_rows():
    _, h = backbone_and_h(batch=8)
    h = h.detach()
    valid = torch.tensor([True, True, False, True, True, False, True, True])
    z = normalize_h(h, "batch", valid)
    torch.testing.assert_close(z[valid], normalize_h(h[valid], "batch"))
    garbage = h.clone()
    garbage[~valid] = 1e6  # an empty-mask row (h = 0 in practice) or anything else
    torch.testing.assert_close(normalize_h(garbage, "batch", valid)[valid], z[valid])
    fair = FairnessRegularizer(small_cfg(h_norm="batch"), hidden_size=8)
    attrs = mixed_attrs(batch=8)
    for method in (fair.dim_loss, fair.dac_loss):
        assert method(garbage, attrs, valid=valid)[0].item() == pytest.approx(method(h, attrs, valid=valid)[0].item())
    # one valid row: no statistics, so h contributes nothing (and CLUB is 0 anyway)
    one = torch.tensor([True] + [False] * 7)
    hg = h.clone().requires_grad_()
    z1 = normalize_h(hg, "batch", one)
    assert torch.equal(z1, torch.zeros_like(h))
    z1.sum().backward()
    assert hg.grad is not None


# -----------------------------------------------------------------------------
# leak_report: the leak on held-out h

def leaky_h(n=400, seed=0, signal=3.0):
    """h (n, 8) of unit noise; gender in dimension 0 and age (3 levels) in dimension 1 when signal > 0."""
    g = torch.Generator().manual_seed(seed)
    attrs = {"gender": torch.randint(0, 2, (n,), generator=g), "age": torch.randint(0, 3, (n,), generator=g)}
    h = torch.randn(n, 8, generator=g)
    h[:, 0] += signal * (2 * attrs["gender"] - 1).float()
    h[:, 1] += signal * (attrs["age"] - 1).float()
    return h, attrs


def test_leak_report_probe_reads_a_planted_attribute():
    h, attrs = leaky_h()
    r = leak_report(h, attrs)
    assert r["probe/gender"] > 0.95 and r["probe/age"] > 0.85
    assert r["h_rms"] == pytest.approx(h.var(0, unbiased=False).mean().sqrt().item(), rel=1e-6)
    assert set(r) == {"h_rms", "probe/gender", "probe/age"}


def test_leak_report_probe_is_near_chance_on_noise():
    h, attrs = leaky_h(signal=0.0)
    r = leak_report(h, attrs)
    assert abs(r["probe/gender"] - 0.5) < 0.12 and abs(r["probe/age"] - 1 / 3) < 0.12, r


def test_leak_report_with_phi_covers_the_debiased_attributes_only():
    h, attrs = leaky_h()
    cfg = FairnessConfig.single("gender", num_classes={"gender": 2, "age": 3}, lambdas={"gender": 1.0})
    torch.manual_seed(0)
    fair = FairnessRegularizer(cfg, hidden_size=8)
    opt = torch.optim.Adam(fair.parameters(), lr=0.05)
    for _ in range(100):  # fit phi on the set: its accuracy and CLUB then show the leak
        opt.zero_grad()
        fair.dac_loss(h, attrs)[0].backward()
        opt.step()
    attrs_with_unknown = {**attrs, "gender": torch.where(torch.arange(len(h)) % 10 == 0, -1, attrs["gender"])}
    r = leak_report(h, attrs_with_unknown, fair)
    assert set(r) == {"h_rms", "probe/gender", "probe/age", "dac_acc/gender", "club/gender"}
    assert r["dac_acc/gender"] > 0.95 and r["club/gender"] > 0.3
    known = attrs_with_unknown["gender"] >= 0
    with torch.no_grad():
        logits = fair.dac(h)["gender"]
    assert r["dac_acc/gender"] == pytest.approx((logits.argmax(-1)[known] == attrs["gender"][known]).float().mean().item())
    assert r["club/gender"] == pytest.approx(club(logits, attrs_with_unknown["gender"]).item(), rel=1e-5)


# -----------------------------------------------------------------------------
# normalize_h("batch"): the statistics are constants to the gradient

def test_batch_h_norm_gradient_does_not_flow_through_the_statistics():
    # with mu and var as constants, d z_ij / d h_ij = r_j = 1 / sqrt(var_j + eps * mean(var)), and no
    # other entry of h moves z_ij: the gradient of z.sum() is r_j in every row. Through mu and var it
    # would be 0 instead (each column of z sums to 0 whatever h is).
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(7, 4, generator=g, dtype=torch.float64) * torch.tensor([1e-2, 1.0, 3.0, 50.0],
                                                                            dtype=torch.float64)).requires_grad_()
    normalize_h(h, "batch").sum().backward()
    var = h.detach().var(0, unbiased=False)
    r = 1 / torch.sqrt(var + 1e-5 * var.mean())  # (H,)
    torch.testing.assert_close(h.grad, r.expand(7, 4))
    # with a valid mask the statistics come from the valid rows, and every row gets the same r
    valid = torch.tensor([True, False, True, True, False, True, True])
    hv = h.detach().clone().requires_grad_()
    normalize_h(hv, "batch", valid).sum().backward()
    var_v = h.detach()[valid].var(0, unbiased=False)
    torch.testing.assert_close(hv.grad, (1 / torch.sqrt(var_v + 1e-5 * var_v.mean())).expand(7, 4))


# -----------------------------------------------------------------------------
# dac_memory: phi also fits a FIFO of earlier batches' normalised sg(h)

def memory_fair(size, h_norm="none", hidden=3, seed=0, **overrides):
    torch.manual_seed(seed)
    return FairnessRegularizer(small_cfg(dac_memory=size, h_norm=h_norm, **overrides), hidden_size=hidden)


def rows(first, n, hidden=3):
    """n rows of h whose entries all equal first, first + 1, ...: easy to find in the memory."""
    return torch.arange(first, first + n, dtype=torch.float32).unsqueeze(1).repeat(1, hidden)


def test_memory_starts_empty_and_is_off_by_default():
    fair = memory_fair(4)
    assert torch.equal(fair.memory_h, torch.zeros(4, 3))
    assert torch.equal(fair.memory_y, torch.full((4, 2), -1)) and fair.memory_y.dtype == torch.long
    assert int(fair.memory_next) == 0
    plain = FairnessRegularizer(small_cfg(), hidden_size=3)
    assert not any(k.startswith("memory") for k in plain.state_dict())
    plain.remember(rows(1, 2), {"race": torch.tensor([0, 1]), "gender": torch.tensor([0, 1])})  # a no-op


def test_memory_fills_in_fifo_order_and_wraps_around():
    fair = memory_fair(5)
    fair.remember(rows(1, 3), {"race": torch.tensor([0, 1, 2]), "gender": torch.tensor([1, 0, 1])})
    assert torch.equal(fair.memory_h, torch.cat([rows(1, 3), torch.zeros(2, 3)]))
    assert fair.memory_y.tolist() == [[0, 1], [1, 0], [2, 1], [-1, -1], [-1, -1]]
    assert int(fair.memory_next) == 3
    # the second batch fills slots 3, 4, then overwrites the oldest (slot 0)
    fair.remember(rows(4, 3), {"race": torch.tensor([2, 2, 0]), "gender": torch.tensor([0, 0, 0])})
    assert torch.equal(fair.memory_h, torch.cat([rows(6, 1), rows(2, 2), rows(4, 2)]))
    assert fair.memory_y.tolist() == [[0, 0], [1, 0], [2, 1], [2, 0], [2, 0]]
    assert int(fair.memory_next) == 1
    # a batch larger than the memory keeps its last rows, in slot order
    fair.remember(rows(10, 7), {"race": torch.arange(7) % 3, "gender": torch.arange(7) % 2})
    assert int(fair.memory_next) == (1 + 7) % 5
    assert torch.equal(fair.memory_h, torch.cat([rows(14, 1), rows(15, 2), rows(12, 2)]))
    assert fair.memory_y[:, 0].tolist() == [r % 3 for r in (4, 5, 6, 2, 3)]


def test_memory_holds_h_as_phi_sees_it():
    _, h = backbone_and_h(batch=6, hidden=3)
    attrs = mixed_attrs(batch=6)
    valid = torch.tensor([True, True, False, True, True, True])
    for h_norm in ("l2", "batch"):
        fair = memory_fair(6, h_norm=h_norm)
        fair.remember(h, attrs, valid)
        torch.testing.assert_close(fair.memory_h, normalize_h(h.detach(), h_norm, valid))
        assert not fair.memory_h.requires_grad


def test_memory_stores_left_out_rows_as_unknown_and_l_dac_skips_them():
    fair = memory_fair(8)
    attrs = {"race": torch.tensor([0, 1, 2, 1]), "gender": torch.tensor([1, -1, 0, 1])}
    valid = torch.tensor([True, True, False, True])
    _, h_old = backbone_and_h(batch=4, hidden=3, seed=1)
    fair.remember(h_old.detach(), attrs, valid)
    assert fair.memory_y[:4].tolist() == [[0, 1], [1, -1], [-1, -1], [1, 1]]  # invalid row 2: both unknown
    _, h = backbone_and_h(batch=6, hidden=3, seed=2)
    cur = mixed_attrs(batch=6)
    loss, stats = fair.dac_loss(h, cur)
    # by hand: cross-entropy over the current batch plus the memory rows with a known label
    with torch.no_grad():
        logits = fair.dac(torch.cat([h.detach(), fair.memory_h]))
    expected = 0.0
    for i, a in enumerate(("race", "gender")):
        y = torch.cat([cur[a], fair.memory_y[:, i]])
        known = y >= 0
        assert int(known.sum()) == 6 + (3 if a == "race" else 2)
        expected += F.cross_entropy(logits[a][known], y[known]).item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # whatever sits in an unknown row (the invalid one, the empty slots) does not count
    fair.memory_h[2] = 1e4
    fair.memory_h[4:] = -1e4
    assert fair.dac_loss(h, cur)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # the stats count the current batch only
    assert all(int(stats[f"n/{a}"]) == 6 for a in ("race", "gender"))


@pytest.mark.parametrize("h_norm", ["none", "batch"])
def test_empty_memory_gives_the_memoryless_l_dac(h_norm):
    _, h = backbone_and_h(batch=6, hidden=3)
    attrs = mixed_attrs(batch=6)
    valid = torch.tensor([True, True, True, False, True, True])
    fair = memory_fair(4, h_norm=h_norm)
    plain = FairnessRegularizer(small_cfg(h_norm=h_norm), hidden_size=3)
    plain.load_state_dict({k: v for k, v in fair.state_dict().items() if not k.startswith("memory")})
    loss, stats = fair.dac_loss(h, attrs, valid)
    loss_plain, stats_plain = plain.dac_loss(h, attrs, valid)
    assert loss.item() == pytest.approx(loss_plain.item(), rel=1e-6)
    assert stats.keys() == stats_plain.keys()
    for k in stats:
        assert stats[k].item() == pytest.approx(stats_plain[k].item(), rel=1e-6), k
    loss.backward()
    loss_plain.backward()
    for p, q in zip(fair.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_memory_changes_l_dac_but_phi_stats_describe_the_current_batch():
    _, h = backbone_and_h(batch=6, hidden=3)
    attrs = mixed_attrs(batch=6)
    fair = memory_fair(4)
    plain = FairnessRegularizer(small_cfg(), hidden_size=3)
    plain.load_state_dict({k: v for k, v in fair.state_dict().items() if not k.startswith("memory")})
    _, h_old = backbone_and_h(batch=4, hidden=3, seed=7)
    fair.remember(h_old, {"race": torch.tensor([2, 2, 2, 2]), "gender": torch.tensor([0, 0, 0, 0])})
    loss, stats = fair.dac_loss(h, attrs)
    loss_plain, stats_plain = plain.dac_loss(h, attrs)
    assert loss.item() != pytest.approx(loss_plain.item(), rel=1e-4)  # the memory is fitted too
    for a in ("race", "gender"):
        assert torch.equal(stats[f"n/{a}"], stats_plain[f"n/{a}"])
        assert torch.equal(stats[f"dac_acc/{a}"], stats_plain[f"dac_acc/{a}"])


@pytest.mark.parametrize("protocol", ["alternating", "single_step"])
def test_each_step_pushes_the_batch_into_the_memory(protocol):
    enc, h = backbone_and_h(batch=6, hidden=3)
    attrs = mixed_attrs(batch=6)
    fair = memory_fair(10, protocol=protocol)
    opt = torch.optim.SGD(fair.parameters(), lr=0.1)
    fair(h, attrs, opt if protocol == "alternating" else None)
    assert int(fair.memory_next) == 6
    torch.testing.assert_close(fair.memory_h[:6], h.detach())
    assert fair.memory_y[:6].tolist() == torch.stack([attrs["race"], attrs["gender"]], 1).tolist()
    assert (fair.memory_y[6:] == -1).all()


def test_l_dim_never_reaches_phi_or_the_memory():
    enc, h = backbone_and_h(batch=6, hidden=3)
    attrs = mixed_attrs(batch=6)
    fair = memory_fair(8, h_norm="batch")
    opt = torch.optim.SGD(fair.parameters(), lr=0.1)
    _, h_old = backbone_and_h(batch=6, hidden=3, seed=3)
    fair.remember(h_old, attrs)
    dim, _ = fair(h, attrs, opt)  # alternating: phi stepped, the batch remembered, L_DIM returned
    opt.zero_grad(set_to_none=True)
    dim.backward()
    assert all(p.grad is None for p in fair.parameters())
    assert all(g is not None and g.abs().sum() > 0 for g in grads(enc))
    for name, buf in fair.named_buffers():
        assert not buf.requires_grad and buf.grad_fn is None and buf.grad is None, name
    # the single-step loss: its L_DAC part reaches phi (through the memory rows too), never the memory
    fair_s = memory_fair(8, h_norm="batch", protocol="single_step")
    fair_s.remember(h_old, attrs)
    enc, h = backbone_and_h(batch=6, hidden=3)
    loss, _ = fair_s(h, attrs)
    loss.backward()
    assert all(p.grad is not None for p in fair_s.parameters())
    assert all(not buf.requires_grad and buf.grad is None for buf in fair_s.buffers())


def test_memory_is_checkpointed_and_a_restored_regulariser_continues_identically(tmp_path):
    batches = [backbone_and_h(batch=6, hidden=3, seed=s)[1].detach() for s in range(4)]
    attrs = [{"race": torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(s)),
              "gender": torch.randint(0, 2, (6,), generator=torch.Generator().manual_seed(10 + s))} for s in range(4)]

    def make(seed):
        fair = memory_fair(8, h_norm="batch", dac_steps=2, seed=seed)
        return fair, torch.optim.AdamW(fair.parameters(), lr=0.05, weight_decay=0.0)

    a, opt_a = make(0)
    for h, y in zip(batches[:2], attrs[:2]):
        a(h, y, opt_a)
    assert {"memory_h", "memory_y", "memory_next"} <= set(a.state_dict())
    torch.save({"fair": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")  # as train.py does
    st = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    b, opt_b = make(seed=1)  # other phi, empty memory: everything must come from the checkpoint
    b.load_state_dict(st["fair"])  # strict
    opt_b.load_state_dict(st["opt"])
    for h, y in zip(batches[2:], attrs[2:]):  # wraps the memory around (6 + 6 + 6 > 8)
        dim_a, stats_a = a(h, y, opt_a)
        dim_b, stats_b = b(h, y, opt_b)
        assert torch.equal(dim_a, dim_b)
        assert all(torch.equal(stats_a[k], stats_b[k]) for k in stats_a)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert int(a.memory_next) == (4 * 6) % 8


def test_negative_dac_memory_is_refused():
    with pytest.raises(ValueError, match=r"FairnessConfig\.dac_memory must be >= 0, got -1"):
        small_cfg(dac_memory=-1)
    assert FairnessConfig().dac_memory == 0  # the paper: phi sees the current batch only
