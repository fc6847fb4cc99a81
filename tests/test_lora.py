"""LoRA (lora.py): invariants on our Llama, and parity with PEFT on HF's LlamaForCausalLM."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import checkpoint
import fast
import lora
from lora import LoRAConfig, LoRALinear
from model import Llama, LlamaConfig, LlavaModel, VisionConfig

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.tiny(**overrides)).eval()


def tokens(B=2, T=7, seed=1, vocab=256):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_B(model, std=0.2, seed=2):
    # B = 0 after init makes the adapter a no-op; give it a real update for the tests that need one
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def lora_numel(model):
    return sum(m.r * (m.in_features + m.out_features) for m in lora.lora_layers(model).values())


# ---------------------------------------------------------------------------------------------
# The layer


def test_lora_linear_keys_init_and_formula():
    torch.manual_seed(0)
    base = nn.Linear(48, 24)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.0)
    # the wrapped layer's own parameters, under their own keys
    assert layer.weight is base.weight and layer.bias is base.bias
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (8, 48) and layer.lora_B.weight.shape == (24, 8)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    # kaiming-uniform with a=sqrt(5): U(-b, b) with b = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(48)
    A = layer.lora_A.weight
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    # y = x W^T + b + (alpha / r) x A^T B^T
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 48)
    want = base(x) + 2.0 * (x @ A.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_dropout_only_on_the_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(4, 32)
    # B = 0: whatever dropout does to the adapter input, the frozen path sees x untouched
    assert torch.equal(layer(x), fast.linear(x, base.weight, base.bias))
    nn.init.normal_(layer.lora_B.weight)
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    mask = fast.Dropout(0.5)(torch.ones_like(x))  # the same draw as inside the layer
    want = base(x) + layer.scaling * ((x * mask) @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y1, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer(x), y1)  # a fresh dropout draw
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_dropout_rate_must_be_below_one():
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=1.0)


# ---------------------------------------------------------------------------------------------
# Applying, freezing, counting


def test_apply_wraps_every_decoder_linear_but_not_lm_head():
    model = tiny_llama()
    names = lora.apply_lora(model, LoRAConfig.tiny(dropout=0.1))
    n_layers = model.config.num_hidden_layers
    assert len(names) == 7 * n_layers
    assert {n.rsplit(".", 1)[-1] for n in names} == set(ALL7)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    keys = set(model.state_dict())
    # base keys unchanged (an HF checkpoint still loads), adapter keys next to them
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert not any("base_layer" in k or ".default" in k for k in keys)
    # the new modules follow the model's mode: an eval model must not get adapter dropout
    assert not any(m.training for m in lora.lora_layers(model).values())
    model.train()
    assert all(m.dropout.training for m in lora.lora_layers(model).values())


def test_zero_B_gives_exactly_the_base_output():
    model = tiny_llama()
    ids = tokens()
    with torch.no_grad():
        before = model(ids)
    lora.apply_lora(model, LoRAConfig.tiny(dropout=0.05))
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before, after)


def test_one_step_changes_only_lora_parameters():
    model = tiny_llama()
    lora.apply_lora(model, LoRAConfig.tiny(dropout=0.05))
    lora.mark_only_lora_as_trainable(model)
    trainable = lora.trainable_parameters(model)
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n, _ in trainable)
    assert len(trainable) == 2 * len(lora.lora_layers(model))
    assert lora.count_parameters(model) == (lora_numel(model),
                                            sum(p.numel() for p in model.parameters()) - lora_numel(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2, weight_decay=0.0)
    ids = tokens()
    loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    # with B = 0 the gradient reaching A is B^T (...) = 0 exactly: the first step only moves B
    for m in lora.lora_layers(model).values():
        assert torch.count_nonzero(m.lora_A.weight.grad) == 0
        assert torch.count_nonzero(m.lora_B.weight.grad) > 0
    opt.step()

    after = model.state_dict()
    for k in before:
        if k.endswith("lora_B.weight"):
            assert not torch.equal(before[k], after[k]), k
        else:  # base weights bit-identical (and lora_A, see above)
            assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_llava_projector_stays_trainable_and_adapter_paths_are_llama_relative(tmp_path):
    torch.manual_seed(0)
    llava = LlavaModel(LlamaConfig.tiny(), VisionConfig.tiny())
    lora.apply_lora(llava.llm, LoRAConfig.tiny())
    lora.mark_only_lora_as_trainable(llava, extra=("mm_projector",))
    names = {n for n, _ in lora.trainable_parameters(llava)}
    assert {"mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight", "mm_projector.2.bias"} <= names
    assert all(n.startswith("mm_projector.") or (n.startswith("llm.model.layers.") and "lora_" in n) for n in names)
    assert not any(p.requires_grad for p in llava.vision_tower.parameters())
    assert not llava.llm.model.embed_tokens.weight.requires_grad and not llava.llm.lm_head.weight.requires_grad
    # PEFT paths are relative to the Llama, as in LLaVA-Rad's released adapter
    lora.save_peft_adapter(llava.llm, str(tmp_path))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2


# ---------------------------------------------------------------------------------------------
# Merge / unmerge


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply_lora(model, LoRAConfig.tiny(alpha=12.0))
    randomize_B(model)
    ids = tokens()
    with torch.no_grad():
        unmerged = model(ids)
        lora.merge_lora(model)
        merged = model(ids)
        lora.merge_lora(model)  # merging twice must not add B A twice
        merged_twice = model(ids)
    assert all(m.merged for m in lora.lora_layers(model).values())
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, base["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged, merged_twice)
    lora.unmerge_lora(model)
    for k, v in base.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# bf16 base, gradient checkpointing, DDP


def test_bf16_base_with_fp32_lora():
    ref = tiny_llama()
    model = tiny_llama().to(torch.bfloat16)
    for m in (ref, model):
        torch.manual_seed(3)  # the same A in both
        lora.apply_lora(m, LoRAConfig.tiny())
        randomize_B(m)
        lora.mark_only_lora_as_trainable(m)
    assert all(p.dtype == torch.float32 for _, p in lora.trainable_parameters(model))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = tokens()
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    # close to the fp32 model with the same weights, at bf16 precision
    with torch.no_grad():
        want = ref(ids)
    assert (logits.float() - want).abs().max() < 0.05 * want.abs().max()
    logits.float().square().mean().backward()
    for _, p in lora.trainable_parameters(model):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert model.model.layers[0].mlp.up_proj.weight.grad is None


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_llama()
        lora.apply_lora(model, LoRAConfig.tiny())
        randomize_B(model)
        lora.mark_only_lora_as_trainable(model)  # embeddings frozen: the checkpointed input needs no grad
        model.gradient_checkpointing = ckpt
        model.train()
        model(tokens()).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in lora.trainable_parameters(model)})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.count_nonzero(grads[1][n]) > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_ddp_registers_only_the_lora_parameters(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_llama().to(torch.bfloat16)
        lora.apply_lora(model, LoRAConfig.tiny())
        lora.mark_only_lora_as_trainable(model)
        frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        ddp = DDP(model)  # no find_unused_parameters: every registered parameter must get a gradient
        info = ddp._get_ddp_logging_data()
        trainable = lora.trainable_parameters(model)
        assert info["num_parameter_tensors"] == len(trainable)
        assert info["total_parameter_size_bytes"] == 4 * lora_numel(model)  # fp32 LoRA only
        opt = torch.optim.SGD([p for _, p in trainable], lr=0.1)
        model.train()
        for step in range(2):  # a second step fails if a registered parameter got no gradient
            opt.zero_grad()
            ddp(tokens(seed=step)).float().square().mean().backward()
            opt.step()
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n
        assert any(torch.count_nonzero(m.lora_B.weight) for m in lora.lora_layers(model).values())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Files: the PEFT format


def test_peft_adapter_round_trip_holds_only_lora_tensors(tmp_path):
    src = tiny_llama()
    lora.apply_lora(src, LoRAConfig.tiny())
    randomize_B(src)
    lora.save_peft_adapter(src, str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == {lora.PEFT_PREFIX + k for k in lora.lora_state_dict(src)}
    assert len(saved) == 2 * 7 * 2

    dst = tiny_llama()  # same base weights, fresh adapter
    lora.apply_lora(dst, LoRAConfig.tiny())
    ids = tokens()
    with torch.no_grad():
        assert not torch.allclose(dst(ids), src(ids))
        lora.load_peft_adapter(dst, str(tmp_path))
        assert torch.equal(dst(ids), src(ids))

    # alpha leaves no trace in the tensor shapes: a model wrapped with another alpha is refused
    wrong_alpha = tiny_llama()
    lora.apply_lora(wrong_alpha, LoRAConfig.tiny(alpha=5.0))
    with pytest.raises(ValueError, match="alpha"):
        lora.load_peft_adapter(wrong_alpha, str(tmp_path))


def _hf_and_ours(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = LlamaConfig.tiny()
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**checkpoint.hf_config(cfg))).eval()
    ours = Llama(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize("variant", ["safetensors", "bin", "bin_default_keys", "two_targets", "regex_targets"])
def test_peft_adapter_loads_into_our_llama(tmp_path, variant):
    peft = pytest.importorskip("peft")
    hf, ours = _hf_and_ours()
    targets = {"two_targets": ["q_proj", "v_proj"], "regex_targets": r".*\.(k_proj|up_proj)"}.get(variant, list(ALL7))
    # init_lora_weights=False: B random too, so the adapter really changes the output; alpha != r
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.05, target_modules=targets,
                           init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pcfg).eval()
    pm.save_pretrained(str(tmp_path), safe_serialization=variant not in ("bin", "bin_default_keys"))
    if variant == "bin_default_keys":  # the adapter name inside the keys, as some versions wrote
        sd = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
        sd = {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}
        torch.save(sd, tmp_path / "adapter_model.bin")
    ids = tokens()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        base = ours(ids)
        cfg = lora.load_peft_adapter(ours, str(tmp_path))
        got = ours(ids)
    assert (cfg.r, cfg.alpha, cfg.dropout) == (4, 12, 0.05)
    n_targets = 2 if variant in ("two_targets", "regex_targets") else 7
    assert len(lora.lora_layers(ours)) == n_targets * 2
    assert (want - base).abs().max() > 1e-2  # the adapter is not a no-op
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_our_adapter_loads_into_peft_and_back(tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = _hf_and_ours()
    lora.apply_lora(ours, LoRAConfig.tiny(alpha=12.0, dropout=0.05))
    randomize_B(ours)
    lora.save_peft_adapter(ours, str(tmp_path))
    ids = tokens()
    with torch.no_grad():
        want = ours(ids)
        base = hf(input_ids=ids).logits
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
        got = pm(input_ids=ids).logits
    assert pm.peft_config["default"].r == 4 and pm.peft_config["default"].lora_alpha == 12.0
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # and back: PEFT re-saves it, our loader reads it into a fresh model
    out = tmp_path / "resaved"
    pm.save_pretrained(str(out))
    again = tiny_llama()
    again.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k}, strict=False)
    with torch.no_grad():
        lora.load_peft_adapter(again, str(out))
        torch.testing.assert_close(again(ids), want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the keys


def _save_peft(model, path, cfg):
    lora.apply_lora(model, cfg)
    randomize_B(model)
    lora.save_peft_adapter(model, str(path))


def test_adapter_keys_that_do_not_match_are_named(tmp_path):
    _save_peft(tiny_llama(), tmp_path, LoRAConfig.tiny(targets=("q_proj", "v_proj")))
    model = tiny_llama()
    lora.apply_lora(model, LoRAConfig.tiny())  # all seven: k_proj etc. are missing from the file
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.0\.mlp\.down_proj\.lora_A\.weight, "):
        lora.load_peft_adapter(model, str(tmp_path))

    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(str(path))
    sd["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    sd["some.other.weight"] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(ValueError) as err:
        lora.load_peft_adapter(tiny_llama(), str(tmp_path))
    msg = str(err.value)
    # both extra keys named, and no others (a longer list would end "... (N in all)")
    assert msg.endswith("unexpected keys: model.layers.9.self_attn.q_proj.lora_A.weight, some.other.weight")
    assert str(path) in msg and "missing keys" not in msg


def test_rank_mismatch_names_the_key_and_shapes(tmp_path):
    _save_peft(tiny_llama(), tmp_path, LoRAConfig.tiny(r=8))
    model = tiny_llama()
    lora.apply_lora(model, LoRAConfig.tiny(r=4))
    # keys in sorted order, the first eight named, then the count (2 layers x 7 targets x A, B)
    with pytest.raises(ValueError, match=r"(?s)shape mismatches:.*model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight: "
                                         r"checkpoint \(8, 64\) vs model \(4, 64\).* \.\.\. \(28 in all\)$"):
        lora.load_peft_adapter(model, str(tmp_path))


def test_alpha_mismatch_and_partial_targets_in_the_peft_config(tmp_path):
    # only layer 0's q_proj: the written target_modules must not make PEFT wrap layer 1 too
    src = tiny_llama()
    _save_peft(src, tmp_path, LoRAConfig.tiny(targets=r"model\.layers\.0\.self_attn\.q_proj"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    with pytest.raises(ValueError, match="cfg says r=4, alpha=16.0"):
        lora.save_peft_adapter(src, str(tmp_path / "x"), LoRAConfig.tiny(alpha=16.0))
    model = tiny_llama()
    lora.apply_lora(model, LoRAConfig.tiny(alpha=16.0, targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"lora_alpha 8.0 but the model's LoRA layers have alpha \[16.0\]"):
        lora.load_peft_adapter(model, str(tmp_path))


def test_targets_that_match_nothing_are_named():
    with pytest.raises(ValueError, match=r"(?s)\['qkv'\] match no nn.Linear.*available: \['down_proj', 'gate_proj', "
                                         r"'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        lora.apply_lora(tiny_llama(), LoRAConfig.tiny(targets=("q_proj", "qkv")))
    with pytest.raises(ValueError, match=r"\['mlp'\] match no nn.Linear"):  # a module, but not a linear one
        lora.apply_lora(tiny_llama(), LoRAConfig.tiny(targets=("mlp",)))
    with pytest.raises(ValueError, match=r"match no nn.Linear"):
        lora.apply_lora(tiny_llama(), LoRAConfig.tiny(targets=r".*\.wq"))
    model = tiny_llama()
    lora.apply_lora(model, LoRAConfig.tiny())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora.apply_lora(model, LoRAConfig.tiny())
    with pytest.raises(ValueError, match=r"\['mm_projector'\] match no parameter"):
        lora.mark_only_lora_as_trainable(model, extra=("mm_projector",))
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.mark_only_lora_as_trainable(tiny_llama())


def test_unsupported_peft_options_and_missing_files(tmp_path):
    _save_peft(tiny_llama(), tmp_path, LoRAConfig.tiny())
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.load_peft_adapter(tiny_llama(), str(tmp_path))
    config_path.write_text(json.dumps(config))
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors nor adapter_model.bin"):
        lora.load_peft_adapter(tiny_llama(), str(tmp_path))
