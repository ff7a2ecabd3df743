"""A preallocated key/value cache for incremental decoding.

One `[batch, kv_heads, max_len, head_dim]` key and value buffer per layer, in any dtype and
on any device (heads first: the filled prefix is a view SDPA reads without a copy).
`Transformer.forward(..., cache=cache)` writes the new tokens' keys and values into the next
free slots and lets them attend to every earlier valid slot: the prompt is prefilled in one
forward, then each step feeds one token per sequence. Slots marked invalid (left padding of
ragged prompts) are never attended to, so a prompt in a batch sees exactly what it sees
alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.config.schema import ModelConfig


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0
        """Slots filled so far (the same for every sequence: padding fills the difference)."""
        self.padded = False
        self._start = 0

    def extend(self, keep: torch.Tensor) -> torch.Tensor | None:
        """Reserve the next `keep.shape[1]` slots (`keep`: False for padding) and return the
        attention mask `[batch, 1, new, filled]` every layer of this forward uses; None when
        no slot is padding and plain causal attention is exact (a first prefill, or one new
        token)."""
        new = keep.shape[1]
        start, end = self.length, self.length + new
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {end} were asked for")
        self.valid[:, start:end] = keep
        if start == 0 or not self.padded:
            self.padded = not bool(keep.all())
        if not self.padded and (start == 0 or new == 1):
            self._start, self.length = start, end
            return None
        device = keep.device
        slots = torch.arange(end, device=device)[None, :]
        rows = torch.arange(start, end, device=device)[:, None]
        # A padding slot attends to itself, so that no row is empty (SDPA would give NaN).
        mask = ((slots <= rows) & self.valid[:, None, :end]) | (slots == rows)
        self._start, self.length = start, end
        return mask.unsqueeze(1)

    def layer(self, index: int) -> _LayerCache:
        """The attention backend of layer `index` for this forward."""
        return _LayerCache(self, index)


class _LayerCache:
    name = "kv_cache"

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def __call__(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """`q` `[batch, new, heads, dim]`, `k`, `v` `[batch, new, kv_heads, dim]` -> output
        `[batch, new, heads, dim]`. The query heads sharing a key head are stacked as rows of
        one SDPA call (GQA without repeating the cached keys)."""
        c = self.cache
        keys, values = c.keys[self.index], c.values[self.index]
        keys[:, :, c._start : c.length] = k.transpose(1, 2)
        values[:, :, c._start : c.length] = v.transpose(1, 2)
        batch, new, heads, dim = q.shape
        kv_heads = k.shape[2]
        keys, values = keys[:, :, : c.length], values[:, :, : c.length]
        if mask is None and new > 1:  # the first prefill, no padding: plain causal
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, is_causal=True, enable_gqa=heads != kv_heads
            )
            return out.transpose(1, 2)
        group = heads // kv_heads
        rows = q.transpose(1, 2).reshape(batch, kv_heads, group * new, dim)
        if mask is not None:
            mask = mask.expand(batch, group, new, c.length).reshape(batch, 1, group * new, -1)
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask)
        return out.view(batch, heads, new, dim).transpose(1, 2)
