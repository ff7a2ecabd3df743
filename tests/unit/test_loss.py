"""Loss normalisation and the learning-rate schedule."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmfm.config import OptimConfig
from mmfm.core.types import IGNORE_INDEX, Batch, Modality
from mmfm.train import loss as loss_module
from mmfm.train.loss import StepLoss, count_targets, modality_sums, token_cross_entropy
from mmfm.train.optim import lr_multiplier


def batch(rows=2, seq=6, vocab=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, -1] = IGNORE_INDEX
    modality = torch.randint(0, 2, (rows, seq), generator=gen) * Modality.DNA
    weights = torch.where(modality == Modality.DNA, 0.5, 1.0) * (labels != IGNORE_INDEX)
    zeros = torch.zeros(rows, seq, dtype=torch.long)
    return Batch(zeros, labels, zeros, zeros, weights.float(), modality)


def test_split_steps_give_the_same_loss_as_one_batch():
    vocab = 11
    logits = torch.randn(4, 6, vocab)
    whole = batch(rows=4)
    halves = [
        Batch(*(getattr(whole, f)[i : i + 2] for f in Batch.__dataclass_fields__)) for i in (0, 2)
    ]
    n = count_targets([whole])
    assert n == count_targets(halves) == 4 * 5
    full = StepLoss(n)(logits, whole, key=0)
    split_loss = StepLoss(n)
    for i, h in zip((0, 2), halves, strict=True):
        split_loss(logits[i : i + 2], h, key=i)
    split_loss(logits[:2], halves[0], key=0)  # a repeated key replaces, never double-counts
    assert full.item() == pytest.approx(split_loss.totals()[0].item(), abs=1e-6)
    assert whole.select(slice(2, 4)).labels.equal(halves[1].labels)
    assert Batch.cat(halves).tokens.equal(whole.tokens)
    # By hand: sum of weighted cross-entropies over the number of targets.
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), whole.labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    )
    assert full.item() == pytest.approx((ce * whole.loss_weights.flatten()).sum().item() / 20)


def test_modality_sums_are_unweighted_means_per_target_modality():
    b = batch()
    ce = torch.rand(2, 6)
    sums = modality_sums(ce, b)
    has = b.labels != IGNORE_INDEX
    for m in (Modality.TEXT, Modality.DNA):
        sel = has & (b.modality == m)
        assert sums[m, 0].item() == pytest.approx(ce[sel].sum().item())
        assert sums[m, 1].item() == sel.sum().item()


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, decay="cosine")
    values = [lr_multiplier(s, cfg, total_steps=110) for s in range(111)]
    assert values[0] == pytest.approx(1 / 11) and values[9] == pytest.approx(10 / 11)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    linear = OptimConfig(warmup_steps=0, min_lr_ratio=0.0, decay="linear")
    assert lr_multiplier(50, linear, 100) == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch(dtype, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * 257)  # 3 rows per chunk, ragged end
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 10, 257, generator=gen)).to(dtype)
    labels = torch.randint(0, 257, (2, 10), generator=gen)
    labels[0, 3] = labels[1, -1] = IGNORE_INDEX
    weights = torch.rand(2, 10, generator=gen)
    grads = []
    for ce_fn in (token_cross_entropy, _reference_cross_entropy):
        x = logits.clone().requires_grad_()
        ce = ce_fn(x, labels)
        (ce * weights).sum().backward()
        grads.append(x.grad)
        assert ce.dtype == torch.float32 and ce.shape == labels.shape
        assert ce[0, 3] == 0 and ce[1, -1] == 0
    ours, ref = (token_cross_entropy(logits, labels), _reference_cross_entropy(logits, labels))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    assert grads[0].dtype == dtype
    torch.testing.assert_close(grads[0].float(), grads[1].float(), rtol=1e-6, atol=1e-6)
    assert grads[0][0, 3].abs().sum() == 0  # no gradient from an ignored target


def _reference_cross_entropy(logits, labels):
    ce = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce.view(labels.shape)
