"""A Llama-architecture decoder for packed multimodal rows.

RMSNorm, rotary embeddings (HF `rotate_half` layout, so the export is a plain key map),
SwiGLU and grouped-query attention. Positions restart at every document and attention stays
inside documents; the attention kernel is a pluggable backend. The model is plain PyTorch:
built on the `meta` device, parallelised from outside, then initialised by `init_weights`.
With `neftune_alpha` it adds NEFTune noise to the input embeddings in training mode only.
With `mot.groups` every block is a `MotBlock`: per-group weights, global attention
(`mmfm.model.mot`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.config.schema import ModelConfig
from mmfm.model.attention import AttentionBackend, build_attention_backend
from mmfm.model.cache import KVCache
from mmfm.model.mot import Routing, token_groups


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[batch, seq, 1, head_dim]` for per-token positions `[batch, seq]`."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
        mask: Any,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = backend(q, k, v, mask)
        return self.wo(out.reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope, backend, mask) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, backend, mask)
        return x + self.feed_forward(self.ffn_norm(x))


def _join(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _project(attention: Attention, h: torch.Tensor) -> list[torch.Tensor]:
    return [attention.wq(h), attention.wk(h), attention.wv(h)]


class GroupLayers(nn.Module):
    """One group's weights in a block: its norms, feed-forward and attention projections
    (None when the block's groups share one)."""

    def __init__(self, cfg: ModelConfig, own_attention: bool):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg) if own_attention else None
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)


class MotBlock(nn.Module):
    """A transformer block whose weights are chosen per token by its group. Its input and
    output are the residual stream in group order (`Routing.sort`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shared = cfg.mot.share_attention
        self.head_dim = cfg.head_dim
        self.attention = Attention(cfg) if shared else None
        self.groups = nn.ModuleDict({g: GroupLayers(cfg, not shared) for g in cfg.mot.groups})

    def forward(self, x, rope, backend, mask, routing: Routing) -> torch.Tensor:
        groups = list(self.groups.values())
        normed = [g.attention_norm(p) for g, p in zip(groups, routing.split(x), strict=True)]
        if self.attention is not None:
            q, k, v = _project(self.attention, _join(normed))
        else:
            per_group = [_project(g.attention, h) for g, h in zip(groups, normed, strict=True)]
            q, k, v = (_join(list(kind)) for kind in zip(*per_group, strict=True))
        if routing.perm is not None:  # back to row order for attention: one gather
            sizes = [t.shape[-1] for t in (q, k, v)]
            q, k, v = routing.unsort(torch.cat([q, k, v], dim=-1)).split(sizes, dim=-1)
        batch, seq = rope[0].shape[:2]
        q, k, v = (t.reshape(batch, seq, -1, self.head_dim) for t in (q, k, v))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = routing.sort(backend(q, k, v, mask).reshape(batch, seq, -1))
        if self.attention is not None:
            attended = self.attention.wo(out)
        else:
            pieces = routing.split(out)
            attended = _join([g.attention.wo(p) for g, p in zip(groups, pieces, strict=True)])
        x = x + attended.view(x.shape)
        pieces = routing.split(x)
        ffn = [g.feed_forward(g.ffn_norm(p)) for g, p in zip(groups, pieces, strict=True)]
        return x + _join(ffn).view(x.shape)


def neftune_noise(h: torch.Tensor, alpha: float, seq_len: int) -> torch.Tensor:
    """NEFTune (Jain et al. 2023): uniform noise in [-1, 1] x alpha / sqrt(L x dim) of the
    embeddings' shape, L = `seq_len` tokens per row (the packed row: its noise has a norm of
    about alpha / sqrt(3) whatever the row length and width).

    Drawn from torch's generator of h's device (seeded by train.seed on every rank; the CPU
    one is saved in checkpoints), for the tensor this rank holds: deterministic for a given
    layout and seed. Ranks that hold the same replicated embeddings (tensor parallelism
    without sequence parallelism) draw the same noise, which keeps them replicated; data-
    parallel ranks draw the same pattern for their different rows. A layout that splits a
    row over ranks (context or sequence parallelism) would repeat the pattern per piece and
    see a shorter L: the config refuses it.
    """
    scale = alpha / math.sqrt(seq_len * h.shape[-1])
    return torch.empty_like(h).uniform_(-scale, scale)


class Transformer(nn.Module):
    """Token ids, per-document positions and document ids in; logits out.

    A pipeline stage is this module with some parts removed: without `tok_embeddings` it
    takes hidden states instead of token ids, without `norm` it returns hidden states.
    """

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Keyed by global layer index so names stay stable when a pipeline stage keeps a
        # subset of the layers.
        block = MotBlock if cfg.mot.enabled else Block
        self.layers = nn.ModuleDict({str(i): block(cfg) for i in range(cfg.n_layers)})
        self.id_groups = cfg.mot.id_groups()
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: torch.Tensor,
        cache: KVCache | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[batch, seq, vocab]`. With a `cache` (inference, `mmfm.model.cache`)
        the tokens continue the cached ones and attend to them; `doc_ids` then only marks
        padding: a token with a negative doc id is never attended to. `groups` (MoT): each
        token's group, for a pipeline stage that gets hidden states; None: from the ids."""
        mask = self.backend.prepare(doc_ids) if cache is None else cache.extend(doc_ids >= 0)
        rope = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        if self.tok_embeddings is None:
            h = tokens
        else:
            h = self.tok_embeddings(tokens)
            # The embedding's mode, not this module's: a pipeline stage is switched to eval
            # through the shared modules only.
            if self.cfg.neftune_alpha and self.tok_embeddings.training:
                h = h + neftune_noise(h, self.cfg.neftune_alpha, tokens.shape[1])
        routing = self._routing(tokens, groups)
        if routing is not None and self.tok_embeddings is not None:
            # Hidden states between pipeline stages are in group order already.
            h = routing.sort(h).view(h.shape)
        extra = () if routing is None else (routing,)
        for name, layer in self.layers.items():
            backend = self.backend if cache is None else cache.layer(int(name))
            h = layer(h, rope, backend, mask, *extra)
        if self.norm is None:
            return h
        if routing is not None:
            h = routing.unsort(h).view(h.shape)
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def _routing(self, tokens: torch.Tensor, groups: torch.Tensor | None) -> Routing | None:
        if not self.cfg.mot.enabled:
            return None
        if groups is None:
            assert self.tok_embeddings is not None, "a later pipeline stage needs `groups`"
            groups = self.groups_of(tokens)
        return Routing.of(groups, len(self.cfg.mot.groups))

    def groups_of(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Each token id's MoT group `[batch, seq]` (None for a dense model)."""
        if not self.cfg.mot.enabled:
            return None
        if not self.id_groups:
            raise ValueError(
                "model.mot.ranges is empty: set data.vocab (mmfm train fills the ranges from "
                "it) or model.mot.ranges"
            )
        return token_groups(self.id_groups, tokens)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> Transformer:
    """The model on the `meta` device: no memory, no init yet (see `init_weights`)."""
    backend = build_attention_backend(cfg.attention, torch.device(device))
    with torch.device("meta"):
        return Transformer(cfg, backend)
