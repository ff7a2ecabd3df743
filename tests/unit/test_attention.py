"""Every attention backend against the dense masked reference (fp32, max abs diff <= 1e-5)."""

import pytest
import torch

from mmfm.model.attention import (
    BACKENDS,
    DocumentSdpa,
    FlexDocument,
    SdpaMasked,
    build_attention_backend,
    document_causal_mask,
    document_layout,
)
from mmfm.testing import packed_batch

TOL = 1e-5


# Unequal lengths, a one-token document, and rows with different layouts in one batch.
LAYOUTS = {
    "one_document": [[96], [96]],
    "equal": [[24, 24, 24, 24], [24, 24, 24, 24]],
    "unequal_with_one_token": [[40, 1, 30, 25], [7, 7, 1, 1, 80]],
}


def qkv(batch, seq, heads, kv_heads, dim=16, requires_grad=True):
    shapes = [(batch, seq, heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim)]
    return [
        torch.randn(s, dtype=torch.float64).float().requires_grad_(requires_grad) for s in shapes
    ]


def run(backend, doc_ids, tensors):
    q, k, v = tensors
    out = backend(q, k, v, backend.prepare(doc_ids))
    return out


def test_a_compiled_block_does_not_recompile_for_a_new_document_layout():
    """`docs` is left out of compiled code: its Python loop over length groups made each new
    layout a recompile (a guard on the groups) until dynamo gave up and ran eager.

    The flag is set with torch's own `config.patch`: pytest >= 9.2's monkeypatch deletes an
    attribute missing from the instance `__dict__` on undo, which hides dynamo's config entry
    from every later compile in the worker."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        _compile_three_layouts()
    torch._dynamo.reset()


def _compile_three_layouts():
    backend, proj = DocumentSdpa(), torch.nn.Linear(16, 16)

    @torch.compile(backend="eager", fullgraph=False)
    def block(q, k, v, layout):
        return proj(backend(proj(q), k, v, layout))

    tensors = qkv(2, 96, 4, 2, requires_grad=False)
    for lengths in LAYOUTS.values():  # three layouts, three different group lists
        doc_ids = packed_batch(lengths).doc_ids
        want = proj(backend(proj(tensors[0]), *tensors[1:], backend.prepare(doc_ids)))
        got = block(*tensors, backend.prepare(doc_ids))
        assert torch.allclose(got, want, atol=TOL)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_docs_matches_masked_reference_with_gradients(layout, kv_heads):
    doc_ids = packed_batch(LAYOUTS[layout]).doc_ids
    ref_in = qkv(2, doc_ids.shape[1], 4, kv_heads)
    docs_in = [t.detach().clone().requires_grad_() for t in ref_in]
    ref = run(SdpaMasked(), doc_ids, ref_in)
    out = run(DocumentSdpa(), doc_ids, docs_in)
    assert (out - ref).abs().max() <= TOL
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    for a, b in zip(ref_in, docs_in, strict=True):
        assert (a.grad - b.grad).abs().max() <= TOL


@pytest.mark.slow  # inductor compiles FlexAttention for the CPU: ~35 s on 2 loaded cores
def test_flex_forward_matches_masked_reference():
    # One compiled call covers GQA and unequal documents; CPU FlexAttention has no backward.
    doc_ids = packed_batch(LAYOUTS["unequal_with_one_token"]).doc_ids
    tensors = qkv(2, doc_ids.shape[1], 4, 2, requires_grad=False)
    ref = run(SdpaMasked(), doc_ids, tensors)
    out = run(FlexDocument(), doc_ids, tensors)
    assert (out - ref).abs().max() <= TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
def test_flex_gradients_match_masked_reference_on_gpu():
    doc_ids = packed_batch(LAYOUTS["unequal_with_one_token"]).doc_ids.cuda()
    ref_in = [t.detach().cuda().requires_grad_() for t in qkv(2, doc_ids.shape[1], 4, 2)]
    flex_in = [t.detach().clone().requires_grad_() for t in ref_in]
    ref = run(SdpaMasked(), doc_ids, ref_in)
    out = run(FlexDocument(), doc_ids, flex_in)
    assert (out - ref).abs().max() <= 1e-4
    ref.sum().backward()
    out.sum().backward()
    for a, b in zip(ref_in, flex_in, strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-4


def test_mask_is_causal_within_documents_only():
    mask = document_causal_mask(packed_batch([[2, 3]]).doc_ids)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_document_layout_groups_equal_lengths():
    layout = document_layout(packed_batch([[3, 2, 3], [2, 3, 3]]).doc_ids)
    assert layout.groups == ((2, 2), (4, 3))
    assert torch.equal(torch.sort(layout.perm).values, torch.arange(16))
    assert torch.equal(layout.perm[layout.inverse], torch.arange(16))


def test_auto_backend_follows_device():
    assert build_attention_backend("auto", torch.device("cpu")).name == "docs"
    assert build_attention_backend("auto", torch.device("cuda")).name == "flex"
    assert set(BACKENDS) == {"sdpa_masked", "docs", "flex"}
