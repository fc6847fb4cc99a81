"""model.py, generate.py and checkpoint.py: Llama parity with HF transformers, KV-cache decoding,
LLaVA splicing, checkpoint loading in the official layouts, and clear errors on bad input. The
chunked loss behind causal_lm_loss is checked in test_fast.py."""

import json
import shutil

import pytest
import torch

import checkpoint
from checkpoint import check_state_dict, load_llama, load_projector, save_llama
from generate import KVCache, decode_step, generate
from model import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, CheckpointError, Llama, LlamaConfig, LlavaModel, VisionConfig,
                   build_projector, lm_loss, tiny_llava)

CONFIGS = {
    "mha": LlamaConfig.tiny(num_key_value_heads=4),
    "gqa": LlamaConfig.tiny(num_key_value_heads=2, rope_theta=500000.0),
    "tied": LlamaConfig.tiny(num_key_value_heads=1, tie_word_embeddings=True),
}


def random_llama(cfg, seed=0):
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():  # norms start at 1: randomise them so a mix-up of weights would show
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model.eval()


def hf_llama(folder):
    # HF transformers is the test-only oracle: without it the parity tests skip, the others still run
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                         torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_hidden_match_hf(tmp_path, name):
    ours = random_llama(CONFIGS[name])
    save_llama(ours, tmp_path)
    ref = hf_llama(tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 17))
    with torch.no_grad():
        logits, hidden = ours(ids, return_hidden=True)
        out = ref(ids, output_hidden_states=True)
    assert logits.shape == (2, 17, ours.config.vocab_size)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    assert len(hidden) == len(out.hidden_states) == ours.config.num_hidden_layers + 1
    for h, r in zip(hidden, out.hidden_states):
        torch.testing.assert_close(h, r, atol=1e-4, rtol=0)


def test_padding_mask_matches_hf(tmp_path):
    ours = random_llama(CONFIGS["gqa"])
    save_llama(ours, tmp_path)
    ref = hf_llama(tmp_path)
    ids = torch.randint(3, 256, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)
    # A padded sample's real positions equal that sample run alone, unpadded.
    with torch.no_grad():
        alone = ours(ids[2:3, :5])
    torch.testing.assert_close(a[2, :5], alone[0], atol=1e-5, rtol=0)


def test_inputs_embeds_equals_ids():
    model = random_llama(CONFIGS["mha"])
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(inputs_embeds=model.model.embed_tokens(ids)))


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_kv_cache_greedy_equals_full_forward(name):
    model = random_llama(CONFIGS[name])
    prompts = [[1, 5, 9, 200, 17], [1, 40], [1, 3, 4, 5, 6, 7, 8]]
    got = generate(model, prompts, max_new_tokens=10, eos_token_id=-1)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(10):  # no cache, no padding: recompute everything each step
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert g == seq[len(p):]


def test_generate_stops_at_eos_and_matches_hf(tmp_path):
    model = random_llama(CONFIGS["gqa"])
    save_llama(model, tmp_path)
    ref = hf_llama(tmp_path)
    prompt = [1, 7, 8, 9]
    free = generate(model, [prompt], max_new_tokens=8, eos_token_id=-1)[0]
    eos = free[3]  # pretend the 4th generated token is EOS: generation must stop before it
    stopped = generate(model, [prompt], max_new_tokens=8, eos_token_id=eos)[0]
    assert stopped == free[:free.index(eos)]
    hf = ref.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert hf == free


def test_decode_step_logits_equal_full_forward():
    """The fixed-shape decode step (attention over every cache slot, unused ones masked) gives the
    logits of a full forward pass, for a left-padded batch."""
    model = random_llama(CONFIGS["gqa"])
    prompts = [[1, 5, 9, 200, 17], [1, 40]]
    new = [[33, 7, 8], [2, 250, 6]]  # tokens fed one by one after the prompt
    got = []
    with torch.no_grad():
        cache = KVCache(model.config, 2, 5 + 3, "cpu", torch.float32)
        ids = torch.tensor([[1, 5, 9, 200, 17], [0, 0, 0, 1, 40]])  # the second prompt left-padded
        mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
        model(ids, attention_mask=mask, cache=cache)  # prefill
        cache.slot = torch.tensor([5])
        positions = mask.sum(1, keepdim=True)
        key_mask = torch.zeros(2, 8, dtype=torch.bool)
        key_mask[:, :5] = mask.bool()
        for i in range(3):
            key_mask[:, 5 + i] = True
            got.append(decode_step(model, torch.tensor([[new[0][i]], [new[1][i]]]), positions, key_mask, cache))
            positions += 1
            cache.slot += 1
    for b in range(2):
        seq = torch.tensor([prompts[b] + new[b]])
        with torch.no_grad():
            want = model(seq)[0, len(prompts[b]):]
        torch.testing.assert_close(torch.stack([g[b] for g in got]), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_generate_equals_eager():
    model = random_llama(CONFIGS["gqa"])
    prompts = [[1, 5, 9, 200, 17], [1, 40], [1, 3, 4]]
    eager = generate(model, prompts, max_new_tokens=6, eos_token_id=-1)
    assert generate(model, prompts, max_new_tokens=6, eos_token_id=-1, compile=True) == eager
    eos = eager[1][2]  # one sample stops early: the others go on, padded
    assert generate(model, prompts, max_new_tokens=6, eos_token_id=eos, compile=True) == \
        generate(model, prompts, max_new_tokens=6, eos_token_id=eos)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    model = random_llama(CONFIGS["mha"])
    p = [[1, 2, 3]]
    a = generate(model, p, max_new_tokens=6, temperature=1.0, eos_token_id=-1,
                 generator=torch.Generator().manual_seed(3))
    b = generate(model, p, max_new_tokens=6, temperature=1.0, eos_token_id=-1,
                 generator=torch.Generator().manual_seed(3))
    assert a == b
    greedy = generate(model, p, max_new_tokens=6, eos_token_id=-1)
    nucleus = generate(model, p, max_new_tokens=6, temperature=1.0, top_p=1e-6, eos_token_id=-1)
    assert nucleus == greedy  # top_p -> 0 keeps only the most likely token


def test_gradient_checkpointing_same_grads():
    model = random_llama(CONFIGS["gqa"]).train()
    ids = torch.randint(0, 256, (2, 10))
    grads = []
    for gc in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = gc
        model(ids).float().pow(2).mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# --- LLaVA ----------------------------------------------------------------------------------


def test_llava_splices_image_and_masks_labels():
    model = tiny_llava().eval()
    N = model.vision_tower.config.grid ** 2
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7, 8], [1, IMAGE_TOKEN_INDEX, 9, 10, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX] * 4 + [7, 8], [IGNORE_INDEX] * 3 + [10, IGNORE_INDEX, IGNORE_INDEX]])
    pixels = torch.randn(2, 3, 32, 32)
    out = model(ids, pixels, mask, labels, return_hidden=True, return_logits=True)
    assert model(ids, pixels, mask, labels).logits is None  # training's call: the loss, no logits
    torch.testing.assert_close(out.loss, lm_loss(out.logits, out.labels), atol=1e-6, rtol=1e-6)
    T = 6 - 1 + N
    assert out.logits.shape[:2] == out.labels.shape == out.image_mask.shape == (2, T)
    assert out.image_mask[0, 2:2 + N].all() and out.image_mask.sum() == 2 * N
    assert (out.labels[out.image_mask] == IGNORE_INDEX).all()
    assert out.labels[0, -2:].tolist() == [7, 8] and out.attention_mask[1, -2:].tolist() == [0, 0]
    # The image embeddings are exactly the projected patch tokens.
    with torch.no_grad():
        img = model.mm_projector(model.vision_tower(pixels, -2))
    torch.testing.assert_close(out.hidden[0][0, 2:2 + N], img[0])
    # The padded sample alone (unpadded) gives the same logits at its real positions.
    alone = model(ids[1:2, :4], pixels[1:2], mask[1:2, :4])
    torch.testing.assert_close(out.logits[1, :T - 2], alone.logits[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out.loss)


def test_lm_loss_weighting():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    plain = lm_loss(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(plain, ref)
    # Weight 0 on a sample removes it; equal weights change nothing.
    torch.testing.assert_close(lm_loss(logits, labels, torch.tensor([0.0, 1.0])), lm_loss(logits[1:], labels[1:]))
    torch.testing.assert_close(lm_loss(logits, labels, torch.tensor([2.0, 2.0])), plain)


def test_llava_generate_matches_stepwise():
    model = tiny_llava().eval()
    pixels = torch.randn(2, 3, 32, 32)
    prompts = [[1, 4, IMAGE_TOKEN_INDEX, 5, 6], [1, IMAGE_TOKEN_INDEX, 9]]
    got = generate(model, prompts, pixels, max_new_tokens=5, eos_token_id=-1)
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(5):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]), pixels[b:b + 1]).logits[0, -1].argmax()))
        assert got[b] == seq[len(p):]


def test_llava_bad_inputs():
    model = tiny_llava()
    with pytest.raises(ValueError, match="exactly one image sentinel"):
        model(torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(torch.tensor([[1, IMAGE_TOKEN_INDEX, 3]]))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model(torch.tensor([[1, IMAGE_TOKEN_INDEX, 3]]), torch.randn(1, 3, 48, 48))


# --- loading the official layouts ------------------------------------------------------------


def write_sharded_safetensors(model, folder, n_shards=3):
    """The layout of a large HF checkpoint: model-0000i-of-0000n.safetensors + an index json."""
    from safetensors.torch import save_file
    save_llama(model, folder)  # for config.json
    (folder / "model.safetensors").unlink()
    keys = list(model.state_dict())
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = {k: model.state_dict()[k].contiguous() for k in keys[i::n_shards]}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_load_sharded_safetensors(tmp_path):
    ours = random_llama(CONFIGS["gqa"])
    write_sharded_safetensors(ours, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_llama(tmp_path)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ours(ids), atol=0, rtol=0)
    assert next(loaded.parameters()).device.type == "cpu"
    assert load_llama(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def write_vicuna_bin_layout(model, folder):
    """Vicuna-7B-v1.5's main branch: pickled pytorch_model-0000{1,2}-of-00002.bin + index,
    with rotary inv_freq buffers inside, and the old-style config without rope_theta."""
    folder.mkdir(exist_ok=True)
    sd = model.state_dict()
    cfg = checkpoint.hf_config(model.config)
    del cfg["rope_theta"]
    (folder / "config.json").write_text(json.dumps(cfg))
    keys = list(sd)
    halves = [keys[:len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        shard = {k: sd[k].clone() for k in part}
        if i == 0:
            shard["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        torch.save(shard, folder / name)
        weight_map.update({k: name for k in shard})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_load_sharded_bin_with_inv_freq(tmp_path):
    ours = random_llama(CONFIGS["mha"])
    write_vicuna_bin_layout(ours, tmp_path)
    loaded = load_llama(tmp_path)
    assert loaded.config.rope_theta == 10000.0
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ours(ids), atol=0, rtol=0)


def test_load_single_bin_and_tied(tmp_path):
    ours = random_llama(CONFIGS["tied"])
    tmp_path.joinpath("config.json").write_text(json.dumps(checkpoint.hf_config(ours.config)))
    sd = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    loaded = load_llama(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ours(ids), atol=0, rtol=0)


@pytest.mark.parametrize("theta_cfg", [{}, {"rope_theta": 123.0}, {"rope_parameters": {"rope_theta": 123.0, "rope_type": "default"}}])
def test_config_rope_theta_spellings(theta_cfg):
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
            "vocab_size": 100, "torch_dtype": "float16", "architectures": ["LlamaForCausalLM"]}
    cfg = checkpoint.llama_config_from_hf({**base, **theta_cfg})
    assert cfg.rope_theta == (123.0 if theta_cfg else 10000.0)
    assert cfg.num_key_value_heads == 4  # absent -> multi-head


def test_vicuna_defaults():
    cfg = LlamaConfig()
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(cfg).parameters())
    assert n == 6_738_415_616  # Llama-2-7B / Vicuna-7B-v1.5
    assert len(Llama(LlamaConfig.tiny()).state_dict()) == 2 + 9 * 2 + 1  # embed, lm_head, 9/layer, norm


@pytest.mark.parametrize("bad,match", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_config_unsupported_fields(tmp_path, bad, match):
    model = random_llama(CONFIGS["mha"])
    save_llama(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **bad}))
    with pytest.raises(CheckpointError, match=match):
        load_llama(tmp_path)


def test_checkpoint_key_errors(tmp_path):
    model = random_llama(CONFIGS["mha"])
    save_llama(model, tmp_path)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_llama(tmp_path)
    msg = str(e.value)
    assert "missing keys: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys: model.layers.0.self_attn.q_proj.bias" in msg
    assert "model.layers.0.self_attn.k_proj.weight: checkpoint (3, 64) vs model (64, 64)" in msg
    assert str(tmp_path) in msg


def test_check_state_dict_cuts_every_list_at_the_same_length():
    expected = {f"w{i:02d}": torch.zeros(2) for i in range(20)}
    got = {f"w{i:02d}": torch.zeros(2) for i in range(10, 20)}  # w00-w09 missing
    got.update({f"w{i:02d}": torch.zeros(3) for i in range(10, 19)})  # w10-w18 mis-shaped
    got.update({f"x{i:02d}": torch.zeros(1) for i in range(9)})  # 9 unexpected
    with pytest.raises(CheckpointError) as e:
        check_state_dict(expected, got, "some/file.bin")
    lines = str(e.value).split("\n  ")
    assert lines[0] == "some/file.bin: checkpoint does not match the model"
    assert lines[1] == "missing keys: " + ", ".join(f"w{i:02d}" for i in range(8)) + " ... (10 in all)"
    assert lines[2] == "unexpected keys: " + ", ".join(f"x{i:02d}" for i in range(8)) + " ... (9 in all)"
    assert lines[3] == "shape mismatches: " + "; ".join(f"w{i:02d}: checkpoint (3,) vs model (2,)"
                                                        for i in range(10, 18)) + " ... (9 in all)"
    check_state_dict(expected, dict(expected), "same")  # a match raises nothing


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(checkpoint.hf_config(LlamaConfig.tiny())))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_llama(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_llama(tmp_path / "nope" / "deeper")


def test_projector_from_official_files(tmp_path):
    torch.manual_seed(0)
    src = build_projector(32, 64)
    # mm_projector.bin (stage 1 output) and LLaVA-Rad's non_lora_trainables.bin naming.
    torch.save({f"model.mm_projector.{k}": v for k, v in src.state_dict().items()}, tmp_path / "mm_projector.bin")
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in src.state_dict().items()},
               tmp_path / "non_lora_trainables.bin")
    for name in ("mm_projector.bin", "non_lora_trainables.bin"):
        dst = load_projector(build_projector(32, 64), tmp_path / name)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v)
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32)}, tmp_path / "partial.bin")
    with pytest.raises(CheckpointError, match="missing keys: 0.bias, 2.bias, 2.weight"):
        load_projector(build_projector(32, 64), tmp_path / "partial.bin")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(CheckpointError, match="no 'mm_projector"):
        load_projector(build_projector(32, 64), tmp_path / "other.bin")


def test_llava_from_loaded_parts(tmp_path):
    """load_llava puts the loaded parts together; the vision tower stays frozen."""
    from checkpoint import load_llava
    llm = random_llama(LlamaConfig.tiny())
    save_llama(llm, tmp_path / "llm")
    ref = tiny_llava(llm=LlamaConfig.tiny())
    vis = {f"visual.trunk.{k}": v for k, v in ref.vision_tower.state_dict().items()}
    vis["visual.head.proj.weight"] = torch.zeros(4, 32)  # non-trunk keys are ignored
    torch.save(vis, tmp_path / "open_clip_pytorch_model.bin")
    torch.save({f"model.mm_projector.{k}": v for k, v in ref.mm_projector.state_dict().items()},
               tmp_path / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="pass num_heads"):
        load_llava(tmp_path / "llm", tmp_path, tmp_path / "mm_projector.bin")  # width 32: heads unknown
    model = load_llava(tmp_path / "llm", tmp_path, tmp_path / "mm_projector.bin", vision_heads=2)
    assert isinstance(model, LlavaModel)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert model.vision_tower.config == VisionConfig.tiny()
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]])
    px = torch.randn(1, 3, 32, 32)
    ref.llm = llm
    with torch.no_grad():
        torch.testing.assert_close(model(ids, px).logits, ref(ids, px).logits, atol=1e-5, rtol=0)
