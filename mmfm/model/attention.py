"""Document-masked causal attention kernels.

Every backend computes the same thing: a query attends to earlier keys of its own document
in the packed row, never across documents. A backend is chosen by name (config data, not a
branch in the model); `prepare(doc_ids)` runs once per batch and its result is shared by
every layer, so the per-layer call does no mask building and no host synchronisation.
Tensors are `[batch, seq, heads, head_dim]`; keys and values may have fewer heads (GQA).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    name: str

    def prepare(self, doc_ids: torch.Tensor) -> Any:
        """Per-batch mask data, computed once from `doc_ids` `[batch, seq]`."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any
    ) -> torch.Tensor:
        """Attention output `[batch, seq, heads, head_dim]`."""


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean `[batch, 1, seq, seq]`: True where query i may attend to key j."""
    seq = doc_ids.shape[1]
    idx = torch.arange(seq, device=doc_ids.device)
    causal = idx[:, None] >= idx[None, :]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal).unsqueeze(1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """SDPA on `[batch, seq, heads, dim]` tensors (it wants heads before seq)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        enable_gqa=k.shape[2] != q.shape[2],
        **kwargs,
    )
    return out.transpose(1, 2)


class SdpaMasked:
    """Dense SDPA with an explicit document-causal mask: quadratic in the row, the reference."""

    name = "sdpa_masked"

    def prepare(self, doc_ids: torch.Tensor) -> torch.Tensor:
        return document_causal_mask(doc_ids)

    def __call__(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        return _sdpa(q, k, v, attn_mask=mask)


class _PermuteRows(torch.autograd.Function):
    """`x[perm]` for a permutation: the backward is a gather by the inverse permutation, not
    the scatter-add that generic indexing needs (which is slow on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _PermuteRows.apply(x, perm, inverse)


@dataclass(frozen=True)
class DocumentLayout:
    """Where every document of a batch sits, grouped by length for batched causal SDPA."""

    perm: torch.Tensor
    """Flat token indices (into batch*seq) ordered group by group, document by document."""
    inverse: torch.Tensor
    """The permutation that puts the grouped tokens back in row order."""
    groups: tuple[tuple[int, int], ...]
    """(number of documents, length) of each group, in `perm` order."""
    identity: bool
    """Documents already sit in group order (e.g. equal lengths): no permutation needed."""


def document_layout(doc_ids: torch.Tensor) -> DocumentLayout:
    """Find the documents of each row (runs of equal doc id) and group them by length."""
    flat = doc_ids.detach().to("cpu", torch.int64)
    batch, seq = flat.shape
    if bool((flat == flat[:, :1]).all()):  # one document per row (decompose): one causal call
        none = torch.empty(0, dtype=torch.int64, device=doc_ids.device)
        return DocumentLayout(perm=none, inverse=none, groups=((batch, seq),), identity=True)
    # A document starts where the id changes or a row begins.
    starts = torch.ones(batch, seq, dtype=torch.bool)
    starts[:, 1:] = flat[:, 1:] != flat[:, :-1]
    start_idx = starts.flatten().nonzero().squeeze(1)
    ends = torch.cat([start_idx[1:], torch.tensor([batch * seq])])
    lengths = ends - start_idx
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order]
    unique_lengths, counts = torch.unique_consecutive(sorted_lengths, return_counts=True)
    # Token index of the t-th token of every document, documents in length order.
    pieces = []
    for length, (lo, hi) in zip(unique_lengths.tolist(), _spans(counts.tolist()), strict=True):
        doc_starts = start_idx[order[lo:hi]]
        pieces.append((doc_starts[:, None] + torch.arange(length)).flatten())
    perm = torch.cat(pieces)
    device = doc_ids.device
    return DocumentLayout(
        perm=perm.to(device),
        inverse=torch.argsort(perm).to(device),
        groups=tuple(zip(counts.tolist(), unique_lengths.tolist(), strict=True)),
        identity=bool(torch.equal(perm, torch.arange(batch * seq))),
    )


def _spans(counts: list[int]) -> list[tuple[int, int]]:
    spans, lo = [], 0
    for c in counts:
        spans.append((lo, lo + c))
        lo += c
    return spans


class DocumentSdpa:
    """Causal SDPA per document; documents of equal length share one batched call.

    Cost follows the sum of squared document lengths instead of the squared row length, and
    each call is a plain causal SDPA, so the fused CPU/GPU kernels (with backward) apply.
    """

    name = "docs"

    def prepare(self, doc_ids: torch.Tensor) -> DocumentLayout:
        return document_layout(doc_ids)

    # Left out of compiled blocks (`parallel.compile`): its Python loop over length groups
    # would make every new document layout a recompile (a dynamo guard on the groups), until
    # dynamo's recompile limit sends the block back to eager; the projections and the
    # feed-forward around it compile once, and each group is one fused SDPA call anyway.
    @torch.compiler.disable
    def __call__(self, q, k, v, layout: DocumentLayout) -> torch.Tensor:
        batch, seq, heads, dim = q.shape
        kv_heads = k.shape[2]
        # One gather for q, k and v together: [tokens, heads + 2 * kv_heads, dim].
        qkv = torch.cat([q, k, v], dim=2).reshape(batch * seq, heads + 2 * kv_heads, dim)
        if not layout.identity:
            qkv = permute_rows(qkv, layout.perm, layout.inverse)
        outs, offset = [], 0
        for n_docs, length in layout.groups:
            block = qkv[offset : offset + n_docs * length].view(n_docs, length, -1, dim)
            gq, gk, gv = block.split([heads, kv_heads, kv_heads], dim=2)
            outs.append(_sdpa(gq, gk, gv, is_causal=True).reshape(n_docs * length, heads, dim))
            offset += n_docs * length
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if not layout.identity:
            out = permute_rows(out, layout.inverse, layout.perm)
        return out.view(batch, seq, heads, dim)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class FlexDocument:
    """FlexAttention with a block mask built from the document ids (compiled).

    Fully masked blocks are skipped by the kernel. No backward on CPU (PyTorch raises
    NotImplementedError), so CPU training uses `docs`.
    """

    name = "flex"

    def prepare(self, doc_ids: torch.Tensor) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        def document_causal(b, h, q_idx, kv_idx):
            return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

        batch, seq = doc_ids.shape
        return create_block_mask(document_causal, batch, None, seq, seq, device=str(doc_ids.device))

    def __call__(self, q, k, v, block_mask: Any) -> torch.Tensor:
        out = _compiled_flex_attention()(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=block_mask,
            enable_gqa=k.shape[2] != q.shape[2],
        )
        return out.transpose(1, 2)


BACKENDS: dict[str, type] = {b.name: b for b in (SdpaMasked, DocumentSdpa, FlexDocument)}


def build_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend called `name`; `auto` is `flex` on CUDA and `docs` elsewhere."""
    if name == "auto":
        name = "flex" if device.type == "cuda" else "docs"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name]()
