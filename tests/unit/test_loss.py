"""Loss normalisation (tokens, modality_mean), the z-loss and the learning-rate schedule."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmfm.config import ConfigError, OptimConfig, load_config
from mmfm.config.schema import LossConfig
from mmfm.core.types import IGNORE_INDEX, MODALITY_NAMES, Batch, Modality
from mmfm.train import loss as loss_module
from mmfm.train.callbacks import format_metrics
from mmfm.train.evaluate import EvalResult
from mmfm.train.loss import (
    StepLoss,
    count_modality_targets,
    count_targets,
    modality_losses,
    modality_sums,
    split_totals,
    token_cross_entropy,
)
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


def test_modality_sums_are_unweighted_and_weighted_sums_per_target_modality():
    b = batch()
    ce = torch.rand(2, 6)
    sums = modality_sums(ce, b)
    has = b.loss_weights > 0
    for m in (Modality.TEXT, Modality.DNA):
        sel = has & (b.modality == m)
        assert sums[m, 0].item() == pytest.approx(ce[sel].sum().item())
        assert sums[m, 1].item() == sel.sum().item()
        assert sums[m, 2].item() == pytest.approx((ce * b.loss_weights)[sel].sum().item())


def prompt_response_rows() -> Batch:
    """Completion-only rows by hand: a text + image prompt (labelled, weight 0) and a DNA
    response (weight 1, one token 0.5); the rows end in padding (IGNORE_INDEX)."""
    T, M, D = Modality.TEXT, Modality.IMAGE, Modality.DNA
    modality = torch.tensor([[T, T, M, M, M, D, D, D, T], [T, M, M, D, D, D, D, T, T]])
    weights = torch.tensor(
        [[0, 0, 0, 0, 0, 1, 1, 0.5, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.float32
    )
    labels = torch.tensor([[3, 4, 9, 10, 11, 5, 6, 7, -100], [2, 9, 12, 5, 7, 6, 8, -100, -100]])
    zeros = torch.zeros_like(labels)
    return Batch(zeros, labels, zeros, zeros, weights, modality)


def test_a_modality_loss_is_the_mean_over_its_targets_and_prompt_only_modalities_are_absent():
    b, logits = prompt_response_rows(), torch.randn(2, 9, 13, generator=torch.Generator())
    step = StepLoss(count_modality_targets([b]))
    step(logits, b, key=0)
    _, _, columns = split_totals(step.totals().tolist())
    losses = modality_losses(columns)
    assert set(losses) == {"loss/dna"}  # text and image only appear in the prompts
    dna = b.modality == Modality.DNA
    want = F.cross_entropy(logits[dna], b.labels[dna])  # unweighted mean over the DNA targets
    assert losses["loss/dna"] == pytest.approx(want.item(), rel=1e-5)
    result = EvalResult()  # held-out evaluation reports the same per modality
    for name, (ce, targets, _) in columns.items():
        result.ce[name], result.targets[name] = ce, targets
    assert set(result.summary()["modalities"]) == {"dna"}
    assert result.metrics()["val/loss/dna"] == pytest.approx(want.item(), rel=1e-5)
    assert result.loss_unweighted == pytest.approx(want.item(), rel=1e-5)


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


def three_modality_batch(rows=4, seq=9, vocab=13, seed=1):
    """Targets of text, image and DNA in uneven numbers, some weighted 0 (no loss) or 0.5."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[:, -1] = IGNORE_INDEX
    modality = torch.tensor([Modality.TEXT, Modality.IMAGE, Modality.DNA])[
        torch.randint(0, 3, (rows, seq), generator=gen)
    ]
    modality[:, :4] = Modality.TEXT  # text the most frequent: the means differ from tokens
    weights = torch.ones(rows, seq)
    weights[0, :3] = 0.0  # e.g. a prompt span
    weights[modality == Modality.DNA] = 0.5
    weights[labels == IGNORE_INDEX] = 0.0
    zeros = torch.zeros(rows, seq, dtype=torch.long)
    return Batch(zeros, labels, zeros, zeros, weights, modality)


def test_modality_mean_is_the_weighted_mean_of_the_modality_means_however_split():
    b, vocab = three_modality_batch(), 13
    logits = torch.randn(4, 9, vocab, generator=torch.Generator().manual_seed(2))
    cfg = LossConfig(normalize="modality_mean", modality_weights={"text": 2.0, "svg": 5.0})
    counts = count_modality_targets([b])
    whole = StepLoss(counts, cfg)(logits, b, key=0)
    split = StepLoss(count_modality_targets([b.select(slice(0, 2)), b.select(slice(2, 4))]), cfg)
    for i in (0, 2):
        split(logits[i : i + 2], b.select(slice(i, i + 2)), key=i)
    # By hand: per present modality, sum(weight x ce) / targets with weight > 0, then the
    # mean weighted by modality_weights over the modalities present (svg is absent).
    ce = _reference_cross_entropy(logits, b.labels)
    means, shares = {}, {"text": 2.0, "image": 1.0, "dna": 1.0}
    for name, m in (("text", Modality.TEXT), ("image", Modality.IMAGE), ("dna", Modality.DNA)):
        sel = b.modality == m
        means[name] = (b.loss_weights * ce)[sel].sum() / ((b.loss_weights > 0) & sel).sum()
    want = sum(shares[n] * means[n] for n in means) / sum(shares.values())
    assert whole.item() == pytest.approx(want.item(), rel=1e-6)
    assert split.totals()[0].item() == pytest.approx(want.item(), rel=1e-6)
    tokens = StepLoss(counts)(logits, b, key=0)  # normalize=tokens: a different number
    assert tokens.item() == pytest.approx(((b.loss_weights * ce).sum() / counts.sum()).item())
    assert abs(tokens.item() - whole.item()) > 1e-3


def test_eval_result_normalises_like_the_training_loss():
    b, logits = three_modality_batch(), torch.randn(4, 9, 13)
    cfg = LossConfig(normalize="modality_mean", modality_weights={"image": 3.0})
    counts = count_modality_targets([b])
    step = StepLoss(counts, cfg)
    want = step(logits, b, key=0).item()
    raw = StepLoss(torch.tensor(1.0))  # as the evaluator runs it: unnormalised sums
    raw(logits, b, key=0)
    _, _, sums = split_totals(raw.totals().tolist())
    result = EvalResult(loss_config=cfg)
    for i, name in enumerate(MODALITY_NAMES):
        result.modality_weighted_ce[name] = sums[name][2]
        result.modality_weighted_targets[name] = counts[i].item()
    assert result.loss == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_is_logsumexp_squared_in_value_and_gradient(dtype, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * 13)  # 5 rows per chunk, ragged end
    b, z = three_modality_batch(), 1e-2
    logits = (4 * torch.randn(4, 9, 13, generator=torch.Generator().manual_seed(3))).to(dtype)
    counts = count_modality_targets([b])
    x = logits.clone().requires_grad_()
    step = StepLoss(counts, LossConfig(z_loss=z))
    step(x, b, key=0).backward()
    ref = logits.clone().requires_grad_()
    dense = ref.float()
    scale = b.loss_weights / counts.sum()
    ce_ref = (_reference_cross_entropy(dense, b.labels) * scale).sum()
    z_ref = z * (torch.logsumexp(dense, dim=-1).square() * scale).sum()
    (ce_ref + z_ref).backward()
    loss, z_loss = step.totals()[:2].tolist()
    assert loss == pytest.approx(ce_ref.item(), rel=1e-5)
    assert z_loss == pytest.approx(z_ref.item(), rel=1e-5) and z_loss > 0.01 * loss
    torch.testing.assert_close(x.grad.float(), ref.grad.float(), rtol=1e-5, atol=1e-6)


def test_progress_line_shows_the_z_loss_apart_from_the_modality_losses():
    line = format_metrics(
        {"loss": 2.0, "loss/z": 3e-4, "loss/text": 1.5, "lr": 1e-3, "tokens_per_s": 5.0}
    )
    assert line.startswith("loss 2.0000 | text 1.500 | z 3.00e-04 | lr")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["loss.normalize=per_token"], "loss.normalize"),
        (["loss.modality_weights={text: 2}"], "normalize=modality_mean only"),
        (["loss.normalize=modality_mean", "loss.modality_weights={pixels: 2}"], "pixels"),
        (["loss.z_loss=-1"], "loss.z_loss"),
    ],
)
def test_loss_config_refuses_what_it_cannot_mean(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
