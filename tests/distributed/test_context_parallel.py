"""Ring attention against single-device document-masked attention (gloo, fp32, CPU).

Each rank computes its zigzag slice; output, dQ, dK and dV must equal the matching slice of
the full-row reference within 1e-5.
"""

import pytest
import torch

from mmfm.testing import packed_batch, run_distributed

TOL = 1e-5


def rows(cp: int, case: str) -> list[list[int]]:
    seq = 64 * cp
    if case == "one_document":
        return [[seq], [seq]]
    # Documents that span chunk and rank boundaries, and a one-token document.
    return [[5, 1, seq - 30, 24], [seq // 2 - 3, 1, seq // 2 + 2]]


def ring_vs_reference(cp, lengths, heads, kv_heads, backend, kernel):
    import torch.distributed as dist

    from mmfm.core.zigzag import zigzag_indices
    from mmfm.model.attention import SdpaMasked
    from mmfm.parallel.context_parallel import AllGatherAttention, RingAttention, build_kernel

    dist.init_process_group("gloo")
    gen = torch.Generator().manual_seed(0)
    batch, seq, dim = len(lengths), sum(lengths[0]), 16

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).float()

    doc_ids = packed_batch(lengths).doc_ids
    q, k, v = (
        randn(batch, seq, heads, dim),
        randn(batch, seq, kv_heads, dim),
        randn(batch, seq, kv_heads, dim),
    )
    grad = randn(batch, seq, heads, dim)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = SdpaMasked()(*full, SdpaMasked().prepare(doc_ids))
    reference.backward(grad)

    index = zigzag_indices(seq, cp, dist.get_rank())
    local = [t[:, index].clone().requires_grad_() for t in (q, k, v)]
    if backend == "ring":
        attention = RingAttention(dist.group.WORLD, build_kernel(kernel, torch.device("cpu")))
    else:
        attention = AllGatherAttention(dist.group.WORLD)
    out = attention(*local, attention.prepare(doc_ids[:, index]))
    out.backward(grad[:, index])
    diffs = {"out": (out - reference[:, index]).abs().max().item()}
    for name, mine, ref in zip(("dq", "dk", "dv"), local, full, strict=True):
        diffs[name] = (mine.grad - ref.grad[:, index]).abs().max().item()
    return diffs


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("case", ["one_document", "packed"])
@pytest.mark.parametrize("kernel", ["sdpa", "math"])
def test_ring_matches_full_attention(cp, case, kernel):
    heads, kv_heads = (4, 2) if case == "packed" else (4, 4)  # grouped-query on packed rows
    results = run_distributed(
        ring_vs_reference, cp, args=(cp, rows(cp, case), heads, kv_heads, "ring", kernel)
    )
    for rank, diffs in enumerate(results):
        assert max(diffs.values()) <= TOL, (rank, diffs)


def test_allgather_baseline_matches_full_attention():
    results = run_distributed(
        ring_vs_reference, 2, args=(2, rows(2, "packed"), 4, 2, "allgather", "sdpa")
    )
    for rank, diffs in enumerate(results):
        assert max(diffs.values()) <= TOL, (rank, diffs)


def ring_pairs(cp, lengths):
    import torch.distributed as dist

    from mmfm.core.zigzag import zigzag_indices
    from mmfm.parallel.context_parallel import plan_ring

    dist.init_process_group("gloo")
    seq = sum(lengths[0])
    doc_ids = packed_batch(lengths).doc_ids
    return plan_ring(doc_ids[:, zigzag_indices(seq, cp, dist.get_rank())], dist.group.WORLD).stats


def test_fully_masked_block_pairs_are_skipped():
    # One causal document at cp=2 is 4 chunks (rank 0 holds chunks 0 and 3, rank 1 chunks 1
    # and 2). Of the 4 x 4 (query chunk, key chunk) pairs, the 6 above the diagonal (keys
    # after the queries) are skipped, the 4 on the diagonal run causal, and the 6 below it
    # run unmasked.
    one = run_distributed(ring_pairs, 2, args=(2, [[256]]))
    total = {k: sum(s[k] for s in one) for k in one[0]}
    assert total == {"skip": 6, "full": 6, "causal": 4, "masked": 0}
