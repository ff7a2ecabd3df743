"""Context parallelism: exact ring attention over zigzag-split packed rows.

Each context-parallel rank holds two chunks of every row (`mmfm.core.zigzag`). Queries stay
put; key/value blocks travel around the ring (one stacked tensor per hop, sent while the
previous block is being computed), and the partial outputs are merged exactly with a running
log-sum-exp. The backward pass is a ring too: dK/dV accumulate while travelling with their
blocks and reach their owner after one full turn. No step gathers the full sequence.

Masks come from global token indices and document ids: causal within a document, nothing
across documents. Per batch, every (query chunk, key chunk) pair is classified once: skipped
when fully masked, run without a mask when fully visible, run causal when it is a
same-chunk causal square, otherwise run with its mask. The local kernel is pluggable; each
returns the log-sum-exp the merge needs and has a backward that takes the merged output and
log-sum-exp (the standard ring flash-attention identity).

`AllGatherAttention` is the selectable baseline: gather all keys/values, attend, and
reduce-scatter their gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmfm.core.torch_compat import (
    all_gather_single_autograd,
    cpu_flash_attention,
    cpu_flash_attention_backward,
)
from mmfm.core.zigzag import zigzag_indices

SKIP, FULL, CAUSAL, MASKED = "skip", "full", "causal", "masked"


# -- local kernels: [batch, heads, len, dim] in, (out, lse) out ---------------------------------


class MathKernel:
    """Explicit softmax attention; exact on any device (scores are materialised per pair)."""

    name = "math"

    @staticmethod
    def _scores(q, k, mask, causal):
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if causal:
            n = s.shape[-1]
            mask = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
        return s if mask is None else s.masked_fill(~mask, float("-inf"))

    def forward(self, q, k, v, mask, causal):
        s = self._scores(q, k, mask, causal)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _finite(lse)[..., None])
        return p @ v.float(), lse

    def backward(self, dout, q, k, v, out, lse, mask, causal):
        scale = 1 / math.sqrt(q.shape[-1])
        p = torch.exp(self._scores(q, k, mask, causal) - lse[..., None])
        dout = dout.float()
        dv = p.transpose(-1, -2) @ dout
        dp = dout @ v.float().transpose(-1, -2)
        ds = p * (dp - (dout * out).sum(-1, keepdim=True))
        return ds @ k.float() * scale, ds.transpose(-1, -2) @ q.float() * scale, dv


class CpuFlashKernel:
    """PyTorch's fused CPU flash-attention op, which returns the log-sum-exp."""

    name = "sdpa"

    @staticmethod
    def _bias(mask, dtype):
        if mask is None:
            return None
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, float("-inf")
        )

    def forward(self, q, k, v, mask, causal):
        out, lse = cpu_flash_attention(q, k, v, causal, attn_mask=self._bias(mask, q.dtype))
        if mask is not None:  # the op reports lse 0, not -inf, for rows that see nothing
            lse = lse.masked_fill(~mask.any(-1), float("-inf"))
        return out.float(), lse

    def backward(self, dout, q, k, v, out, lse, mask, causal):
        dq, dk, dv = cpu_flash_attention_backward(
            dout.to(q.dtype),
            q,
            k,
            v,
            out.to(q.dtype),
            lse,
            causal,
            attn_mask=self._bias(mask, q.dtype),
        )
        return dq.float(), dk.float(), dv.float()


KERNELS = {k.name: k for k in (MathKernel, CpuFlashKernel)}


def build_kernel(name: str, device: torch.device):
    """`auto`: the fused CPU kernel on CPU; the math kernel elsewhere (docs/parallelism.md,
    "The ring")."""
    if name == "auto":
        name = "sdpa" if device.type == "cpu" else "math"
    return KERNELS[name]()


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def merge_into(out, lse, block_out, block_lse) -> None:
    """Fold one block's (out, lse) into the running (out, lse), in place, exactly."""
    new = torch.logaddexp(lse, block_lse)
    safe = _finite(new)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(
        block_out * torch.exp(block_lse - safe)[..., None]
    )
    lse.copy_(new)


# -- the per-batch plan -------------------------------------------------------------------------


@dataclass
class PairPlan:
    kind: str
    q_index: torch.Tensor | None = None
    q_doc: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor | None:
        """`[batch, 1, chunk, chunk]` bool for MASKED pairs, rebuilt on use: keeping every
        pair's mask for the whole step would cost cp x 4 x chunk^2 bytes per row."""
        if self.kind != MASKED:
            return None
        return _visible(self.q_index, self.q_doc, self.k_index, self.k_doc)[:, None]


@dataclass
class RingPlan:
    group: Any
    rank: int
    cp: int
    chunk: int
    pairs: list[list[list[PairPlan]]]
    """pairs[step][query chunk][key chunk]; at ring step t the keys come from rank - t."""
    stats: dict[str, int] = field(default_factory=dict)


def _visible(q_idx, q_doc, k_idx, k_doc) -> torch.Tensor:
    """`[batch, q, k]`: same document and not in the future."""
    return (q_doc[:, :, None] == k_doc[:, None, :]) & (q_idx[:, None] >= k_idx[None, :])


def _classify(q_idx, q_doc, k_idx, k_doc) -> PairPlan:
    mask = _visible(q_idx, q_doc, k_idx, k_doc)
    if not mask.any():
        return PairPlan(SKIP)
    if mask.all():
        return PairPlan(FULL)
    causal = torch.ones_like(mask[0]).tril()
    if torch.equal(q_idx, k_idx) and bool((mask == causal).all()):
        return PairPlan(CAUSAL)
    return PairPlan(MASKED, q_idx, q_doc, k_idx, k_doc)


def _gather_layout(doc_ids: torch.Tensor, group) -> tuple[list, list]:
    """Every cp rank's document ids and global token indices (small integers only)."""
    cp = dist.get_world_size(group)
    local = doc_ids.contiguous()
    gathered = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(gathered, local, group=group)
    seq = local.shape[1] * cp
    return gathered, [zigzag_indices(seq, cp, r).to(local.device) for r in range(cp)]


def plan_ring(doc_ids: torch.Tensor, group) -> RingPlan:
    """Classify every (query chunk, key chunk) pair of every ring step, once per batch."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    gathered, index = _gather_layout(doc_ids, group)
    local = gathered[rank]
    chunk = local.shape[1] // 2
    stats = {SKIP: 0, FULL: 0, CAUSAL: 0, MASKED: 0}
    pairs = []
    for step in range(cp):
        src = (rank - step) % cp
        per_q = []
        for a in range(2):
            qs = slice(a * chunk, (a + 1) * chunk)
            row = []
            for b in range(2):
                ks = slice(b * chunk, (b + 1) * chunk)
                pair = _classify(
                    index[rank][qs], local[:, qs], index[src][ks], gathered[src][:, ks]
                )
                stats[pair.kind] += 1
                row.append(pair)
            per_q.append(row)
        pairs.append(per_q)
    return RingPlan(group, rank, cp, chunk, pairs, stats)


# -- the ring -----------------------------------------------------------------------------------


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _fold_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, n, d = t.shape
    return t if h == kv_heads else t.view(b, kv_heads, h // kv_heads, n, d).sum(2)


def _exchange(send: torch.Tensor, plan: RingPlan) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next rank and receiving the previous rank's block."""
    if plan.cp == 1:  # a ring of one: the block stays
        return send, []
    recv = torch.empty_like(send)
    nxt = dist.get_global_rank(plan.group, (plan.rank + 1) % plan.cp)
    prv = dist.get_global_rank(plan.group, (plan.rank - 1) % plan.cp)
    ops = [
        dist.P2POp(dist.isend, send, nxt, plan.group),
        dist.P2POp(dist.irecv, recv, prv, plan.group),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _pairs(plan: RingPlan, step: int):
    c = plan.chunk
    for a in range(2):
        for b in range(2):
            pair = plan.pairs[step][a][b]
            if pair.kind != SKIP:
                yield slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), pair


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, kernel):
        # [batch, heads, seq, dim] inside; k and v travel as one stacked tensor.
        heads = q.shape[1]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        block = torch.stack([k, v])
        for step in range(plan.cp):
            pending = _exchange(block, plan) if step < plan.cp - 1 else None
            for qs, ks, pair in _pairs(plan, step):
                kb = _expand_heads(block[0][:, :, ks], heads)
                vb = _expand_heads(block[1][:, :, ks], heads)
                o, o_lse = kernel.forward(q[:, :, qs], kb, vb, pair.mask, pair.kind == CAUSAL)
                merge_into(out[:, :, qs], lse[:, :, qs], o, o_lse)
            if pending is not None:
                block, works = pending
                for w in works:
                    w.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.kernel = plan, kernel
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, kernel = ctx.plan, ctx.kernel
        heads, kv_heads = q.shape[1], k.shape[1]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for step in range(plan.cp):
            # Prefetch the next key/value block; its gradients arrive after the compute.
            pending = _exchange(kv, plan) if step < plan.cp - 1 else None
            for qs, ks, pair in _pairs(plan, step):
                kb = _expand_heads(kv[0][:, :, ks], heads)
                vb = _expand_heads(kv[1][:, :, ks], heads)
                gq, gk, gv = kernel.backward(
                    dout[:, :, qs],
                    q[:, :, qs],
                    kb,
                    vb,
                    out[:, :, qs],
                    lse[:, :, qs],
                    pair.mask,
                    pair.kind == CAUSAL,
                )
                dq[:, :, qs] += gq
                dkv[0][:, :, ks] += _fold_heads(gk, kv_heads)
                dkv[1][:, :, ks] += _fold_heads(gv, kv_heads)
            # dK/dV of this block go on to the rank that computes with it next (after the
            # last step: back to its owner).
            dkv, works = _exchange(dkv, plan)
            for w in works:
                w.wait()
            if pending is not None:
                kv, works = pending
                for w in works:
                    w.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


class RingAttention:
    """Attention backend for context parallelism (replaces the model's backend when cp > 1)."""

    name = "ring"

    def __init__(self, group, kernel):
        self.group, self.kernel = group, kernel
        self.last_plan: RingPlan | None = None

    def prepare(self, doc_ids: torch.Tensor) -> RingPlan:
        self.last_plan = plan_ring(doc_ids, self.group)
        return self.last_plan

    def __call__(self, q, k, v, plan: RingPlan) -> torch.Tensor:
        out = _RingAttention.apply(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan, self.kernel
        )
        return out.transpose(1, 2)


@dataclass
class GatherPlan:
    mask: torch.Tensor
    """`[batch, 1, local seq, full seq]`: local queries against all keys in gathered order."""


class AllGatherAttention:
    """Baseline: all-gather keys/values (one stacked tensor), attend, reduce-scatter grads."""

    name = "allgather"

    def __init__(self, group):
        self.group = group

    def prepare(self, doc_ids: torch.Tensor) -> GatherPlan:
        rank = dist.get_rank(self.group)
        gathered, index = _gather_layout(doc_ids, self.group)
        mask = _visible(index[rank], gathered[rank], torch.cat(index), torch.cat(gathered, 1))
        return GatherPlan(mask[:, None])

    def __call__(self, q, k, v, plan: GatherPlan) -> torch.Tensor:
        # [2, batch, full seq (rank by rank), kv_heads, dim]; the backward reduce-scatters.
        kv_all = all_gather_single_autograd(torch.stack([k, v]), 2, self.group)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            kv_all[0].transpose(1, 2),
            kv_all[1].transpose(1, 2),
            attn_mask=plan.mask,
            enable_gqa=k.shape[2] != q.shape[2],
        )
        return out.transpose(1, 2)
