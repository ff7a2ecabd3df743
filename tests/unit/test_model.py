"""The transformer: meta-device build, layout-independent init, document isolation."""

import pytest
import torch

from mmfm.config import ModelConfig
from mmfm.model import build_model, init_weights
from mmfm.testing import packed_batch

CFG = ModelConfig(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=128)


def make_model(cfg=CFG, seed=0, attention="docs"):
    cfg = ModelConfig(**{**cfg.__dict__, "attention": attention})
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, seed)
    return model


def packed_row(lengths, seed=0):
    """Tokens, positions and doc ids of one row packed from documents of `lengths`."""
    row = packed_batch([lengths], CFG.vocab_size, seed)
    return row.tokens, row.positions, row.doc_ids


def test_built_on_meta_device():
    model = build_model(CFG)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_init_depends_on_seed_only():
    a, b, c = make_model(seed=1), make_model(seed=1), make_model(seed=2)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_init_is_independent_of_which_layers_a_rank_holds():
    # A pipeline stage keeps a subset of the layers; its weights must match the full model's.
    full = make_model()
    stage = build_model(CFG)
    del stage.layers["0"], stage.layers["2"]
    stage.to_empty(device="cpu")
    init_weights(stage, CFG, seed=0)
    full_params = dict(full.named_parameters())
    for name, param in stage.named_parameters():
        assert torch.equal(param, full_params[name]), name


def test_init_statistics():
    model = make_model(ModelConfig(vocab_size=512, dim=256, n_layers=4, n_heads=4))
    emb = model.tok_embeddings.weight
    assert emb.std().item() == pytest.approx(0.02, rel=0.1)
    assert emb.abs().max() <= 3 * 0.02 + 1e-6
    wo = model.layers["0"].attention.wo.weight
    assert wo.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_tied_embeddings_share_the_matrix():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True})
    model = make_model(cfg)
    assert model.output is None
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in make_model().parameters()
    )  # one vocab x dim matrix fewer than the untied model
    tokens, positions, doc_ids = packed_row([10])
    final = []  # the hidden states the output projection sees: the final norm's output
    model.norm.register_forward_hook(lambda module, args, out: final.append(out))
    logits = model(tokens, positions, doc_ids)
    embedding = model.tok_embeddings.weight
    assert logits.shape == (1, 10, CFG.vocab_size)
    assert torch.allclose(logits, final[0] @ embedding.T, rtol=0, atol=1e-6)
    logits.sum().backward()
    # Ids that are not in the input reach the matrix only through the output projection.
    unused = torch.ones(CFG.vocab_size, dtype=torch.bool)
    unused[tokens.unique()] = False
    assert embedding.grad[unused].abs().sum(-1).min() > 0


@pytest.mark.parametrize("attention", ["docs", "sdpa_masked"])
def test_documents_do_not_see_each_other(attention):
    model = make_model(attention=attention)
    lengths = [20, 1, 33, 10]
    tokens, positions, doc_ids = packed_row(lengths)
    changed = tokens.clone()
    changed[0, 21:54] = (changed[0, 21:54] + 1) % CFG.vocab_size  # every token of document 2
    with torch.no_grad():
        a = model(tokens, positions, doc_ids)
        b = model(changed, positions, doc_ids)
    others = doc_ids[0] != 2
    assert (a[0, others] - b[0, others]).abs().max() <= 1e-6
    assert (a[0, ~others] - b[0, ~others]).abs().max() > 1e-3  # the change itself is visible


def test_positions_restart_per_document():
    # The same document gives the same logits alone or after another document in the row.
    model = make_model()
    doc, _, _ = packed_row([16], seed=3)
    other, _, _ = packed_row([23], seed=4)
    alone = model(doc, torch.arange(16)[None], torch.zeros(1, 16, dtype=torch.long))
    _, positions, doc_ids = packed_row([23, 16])
    packed = model(torch.cat([other, doc], dim=1), positions, doc_ids)
    assert (packed[:, 23:] - alone).abs().max() <= 1e-5


def test_backends_agree_through_the_model():
    tokens, positions, doc_ids = packed_row([30, 1, 17, 16])
    results = {}
    for name in ("sdpa_masked", "docs"):
        model = make_model(attention=name)
        logits = model(tokens, positions, doc_ids)
        logits.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[name] = (logits.detach(), grads)
    ref_logits, ref_grads = results["sdpa_masked"]
    logits, grads = results["docs"]
    assert (logits - ref_logits).abs().max() <= 1e-5
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max() <= 1e-5, name


@pytest.mark.slow  # inductor compiles FlexAttention for the CPU: ~35 s on 2 loaded cores
def test_flex_through_the_model_forward():
    tokens, positions, doc_ids = packed_row([30, 1, 17, 16])
    with torch.no_grad():
        ref = make_model(attention="sdpa_masked")(tokens, positions, doc_ids)
        out = make_model(attention="flex")(tokens, positions, doc_ids)
    assert (out - ref).abs().max() <= 1e-5
