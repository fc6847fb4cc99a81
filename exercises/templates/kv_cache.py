"""Exercise 8 (core): the KV cache.

Read: generate.py `KVCache`; model.py `Attention.forward` (where `cache.update` is called) and
`Llama.forward` (who advances `cache.length`); then generate.py `generate`.
Write: the class below. The check plugs it into the project's own Llama and compares the logits
of prefill + chunk + one-token decoding with a full forward pass without any cache.
Check: python exercises/check.py kv_cache path/to/your/kv_cache.py
"""

import torch


class KVCache:
    """
    Pre-allocated keys and values for every layer: one (B, n_kv, max_length, head_dim) tensor each,
    from cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim.

    `length` is the number of tokens already stored (0 at first). Every layer of one forward pass
    writes its T new keys at the same offset `length`; Llama.forward adds T to `length` once,
    after the last layer, so `update` must not change it.
    """

    def __init__(self, cfg, batch_size, max_length, device, dtype):
        raise NotImplementedError("write KVCache.__init__")

    def update(self, layer, k, v):
        """
        k, v (B, n_kv, T, head_dim): store them at positions length .. length + T - 1 of this layer,
        return this layer's keys and values so far, (B, n_kv, length + T, head_dim) each.
        More than max_length tokens in all: raise ValueError.
        """
        raise NotImplementedError("write KVCache.update")
