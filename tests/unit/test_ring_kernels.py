"""The pieces of ring attention that need no processes: zigzag split, kernels, exact merge."""

import pytest
import torch
import torch.nn.functional as F

from mmfm.core.types import Batch
from mmfm.core.zigzag import zigzag_indices, zigzag_slice
from mmfm.parallel.context_parallel import KERNELS, merge_into


def test_zigzag_pairs_an_early_and_a_late_chunk():
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    every = torch.cat([zigzag_indices(48, 4, r) for r in range(4)])
    assert sorted(every.tolist()) == list(range(48))


def test_zigzag_slices_every_field_together():
    rows = torch.arange(16).view(2, 8)
    batch = Batch(rows, rows + 100, rows % 4, rows // 4, rows.float(), rows % 3)
    mine = zigzag_slice(batch, 2, 1)
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(mine, name), getattr(batch, name)[:, 2:6]), name
    assert zigzag_slice(batch, 1, 0) is batch


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_blockwise_kernels_merge_to_full_attention(kernel):
    # Keys in two blocks; queries 0 and 1 see nothing in the second block, query 0 nothing at
    # all in the first one either but one key: the merge must handle lse = -inf exactly.
    torch.manual_seed(0)
    heads, n, dim = 2, 6, 8
    q = torch.randn(1, heads, n, dim, dtype=torch.float64).float()
    k = torch.randn(1, heads, 2 * n, dim, dtype=torch.float64).float()
    v = torch.randn(1, heads, 2 * n, dim, dtype=torch.float64).float()
    mask = torch.rand(1, 1, n, 2 * n) > 0.4
    mask[..., :, n] = True  # every query sees at least one key
    mask[..., 0, :] = False
    mask[..., 0, n] = True
    mask[..., 1, n:] = False
    mask[..., 1, 0] = True
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*full, attn_mask=mask)
    grad = torch.randn_like(ref)
    ref.backward(grad)

    impl = KERNELS[kernel]()
    out = torch.zeros(1, heads, n, dim)
    lse = torch.full((1, heads, n), float("-inf"))
    blocks = [slice(0, n), slice(n, 2 * n)]
    for b in blocks:
        o, block_lse = impl.forward(q, k[:, :, b], v[:, :, b], mask[..., b], False)
        merge_into(out, lse, o, block_lse)
    assert (out - ref).abs().max() <= 1e-5
    dq = torch.zeros_like(q)
    for b in blocks:
        gq, gk, gv = impl.backward(grad, q, k[:, :, b], v[:, :, b], out, lse, mask[..., b], False)
        dq += gq
        assert (gk - full[1].grad[:, :, b]).abs().max() <= 1e-5
        assert (gv - full[2].grad[:, :, b]).abs().max() <= 1e-5
    assert (dq - full[0].grad).abs().max() <= 1e-5
