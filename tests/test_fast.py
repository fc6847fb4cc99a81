"""fast.py: each speed path gives what its plain version gives (the model's tests against HF
transformers and PEFT also run through them)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from model import IGNORE_INDEX, causal_lm_loss, lm_loss

# ---------------------------------------------------------------------------------------------
# linear: F.linear


@pytest.mark.parametrize("rows", [1, 4, 16, 17])  # the few-row path up to 16 rows, F.linear beyond
def test_linear_equals_f_linear(rows):
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(rows, 3, 48, generator=g)[:, 0], torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    for bias in (None, b):
        torch.testing.assert_close(fast.linear(x, W, bias), F.linear(x, W, bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.linear(x[None], W, bias)[0], F.linear(x, W, bias), atol=1e-5, rtol=1e-5)
    unaligned = torch.randn(40 * 48 + 1, generator=g)[1:].view(40, 48)  # 4 bytes off: F.linear itself
    assert torch.equal(fast.linear(x, unaligned), F.linear(x, unaligned))
    layer = fast.Linear(48, 40)
    assert set(layer.state_dict()) == {"weight", "bias"} and isinstance(layer, nn.Linear)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy (behind model.causal_lm_loss): the full logits + cross-entropy


def test_linear_cross_entropy_equals_the_plain_version():
    g = torch.Generator().manual_seed(1)
    rows, W = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    y, w = torch.randint(0, 50, (37,), generator=g), torch.rand(37, generator=g)
    plain = F.cross_entropy(F.linear(rows, W).float(), y, reduction="none") @ w
    for chunk_elements in (1, 7 * 50, 2 ** 24):
        torch.testing.assert_close(fast.linear_cross_entropy(rows, W, y, w, chunk_elements), plain,
                                   atol=1e-5, rtol=1e-6)


def _loss_and_grads(fn, h0, W0):
    h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
    loss = fn(h, W)
    loss.backward()
    return loss.detach(), h.grad, W.grad


@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 2 ** 24])  # one row, a few rows, one chunk
@pytest.mark.parametrize("weighting", ["plain", "sample_weight", "normalizer"])
def test_fused_loss_equals_full_logits(chunk_elements, weighting):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 9, 16, 50
    h0, W0 = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 6:] = IGNORE_INDEX  # padding
    labels[2] = IGNORE_INDEX  # nothing supervised in this sample
    kw = {"plain": {}, "sample_weight": {"sample_weight": torch.tensor([0.5, 2.0, 3.0])},
          "normalizer": {"normalizer": torch.tensor(40.0)}}[weighting]
    want = _loss_and_grads(lambda h, W: lm_loss(h @ W.T, labels, **kw), h0, W0)
    got = _loss_and_grads(lambda h, W: causal_lm_loss(h, W, labels, chunk_elements=chunk_elements, **kw), h0, W0)
    for a, b, what in zip(got, want, ("loss", "grad hidden", "grad lm_head")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=what)
    with torch.no_grad():  # evaluation: the same loss, no autograd function
        torch.testing.assert_close(causal_lm_loss(h0, W0, labels, chunk_elements=chunk_elements, **kw), want[0],
                                   atol=1e-6, rtol=1e-6)


def test_fused_loss_edge_cases():
    h, W = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8)
    none = torch.full((2, 5), IGNORE_INDEX)
    loss = causal_lm_loss(h, W, none)  # nothing supervised: 0, and a zero gradient
    loss.backward()
    assert loss.item() == 0 and torch.equal(h.grad, torch.zeros_like(h))
    with pytest.raises(ValueError, match="disagree"):
        causal_lm_loss(h, W, none[:, :4])
    # bf16 hidden state and head: the logits in bf16, the cross-entropy in fp32, like lm_loss
    labels = torch.randint(0, 11, (2, 5))
    hb, Wb = h.detach().bfloat16(), W.bfloat16()
    torch.testing.assert_close(causal_lm_loss(hb, Wb, labels), lm_loss(hb @ Wb.T, labels), atol=1e-6, rtol=1e-6)


def test_fused_loss_never_holds_the_logits():
    """Peak memory of the loss's forward + backward: under one chunk of logits, where the full
    cross-entropy holds several (N, V) tensors (bench/bench_speed.py's LiveBytes counter)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_speed.py")
    spec = importlib.util.spec_from_file_location("bench_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    B, T, H, V = 2, 64, 16, 1000
    W, labels = torch.randn(V, H), torch.randint(0, V, (B, T))
    logits_bytes = B * (T - 1) * V * 4
    peaks = {}
    for name, fn in (("full", lambda h: lm_loss(h @ W.T, labels)),
                     ("fused", lambda h: causal_lm_loss(h, W, labels, chunk_elements=16 * V))):
        h = torch.randn(B, T, H, requires_grad=True)
        peaks[name], _ = bench.peak_tensor_memory(lambda: fn(h).backward())
    assert peaks["full"] >= 2 * logits_bytes  # the counter sees the logits and their gradient
    assert peaks["fused"] < 16 * V * 4 + 4 * B * T * H * 4  # one 16-row chunk + a few (B, T, H) tensors


# ---------------------------------------------------------------------------------------------
# LoRA: Dropout (nn.Dropout) and lora_linear (W x + scaling * B A dropout(x))


def test_lora_dropout_draws_the_right_distribution():
    torch.manual_seed(0)
    x = torch.ones(1000, 1001)  # odd count: the last int64 draw is half used
    for p in (0.05, 0.5):
        y = fast.Dropout(p)(x)
        kept = y != 0
        # kept entries carry 1 / (1 - p), dropped ones 0: E[y] = x
        assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
        rate, n = kept.float().mean().item(), x.numel()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 binomial sd
        # rows and columns alike (no structure from packing two draws in an int64)
        assert abs(kept[:, 0::2].float().mean().item() - kept[:, 1::2].float().mean().item()) < 0.01
    a, b = fast.Dropout(0.5)(x), fast.Dropout(0.5)(x)
    assert 0.4 < (a != b).float().mean().item() < 0.6  # fresh, independent draws
    assert fast.Dropout(0.5).eval()(x) is x and fast.Dropout(0.0)(x) is x
    # gradients flow through the kept entries only, scaled like the values
    xg = torch.randn(64, 64, requires_grad=True)
    torch.manual_seed(3)
    y = fast.Dropout(0.2)(xg)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, (y != 0).float() / 0.8)


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_lora_linear_equals_the_plain_sum(dtype, autocast):
    g = torch.Generator().manual_seed(2)
    W, b = torch.randn(24, 48, generator=g).to(dtype), torch.randn(24, generator=g).to(dtype)
    A, B = nn.Linear(48, 4, bias=False), nn.Linear(4, 24, bias=False)
    nn.init.normal_(B.weight)
    x = torch.randn(3, 5, 48, generator=g).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = fast.lora_linear(x, W, b, A, B, 2.0, nn.Identity())
        plain = F.linear(x, W, b) + (2.0 * B(A(x.to(A.weight.dtype)))).to(F.linear(x, W, b).dtype)
    tol = 1e-5 if dtype == torch.float32 and not autocast else 3e-2
    assert got.shape == (3, 5, 24) and got.dtype == plain.dtype
    torch.testing.assert_close(got.float(), plain.float(), atol=tol * 10, rtol=tol)
