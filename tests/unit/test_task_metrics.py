"""mmfm/tasks/metrics.py on hand-made cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmfm.tasks import metrics


def test_a_perfect_mask_has_iou_1_an_empty_one_0():
    target = np.zeros((8, 8), np.uint8)
    target[2:6, 2:6] = 1
    assert metrics.overlap(target, target) == (16, 16)
    assert metrics.overlap(np.zeros_like(target), target) == (0, 16)
    assert metrics.mask_ious([metrics.overlap(target, target)]) == {"miou": 1.0, "ciou": 1.0}
    assert metrics.mask_ious([metrics.overlap(0 * target, target)]) == {"miou": 0.0, "ciou": 0.0}
    # nothing to find and nothing found: perfect
    assert metrics.mask_ious([(0, 0)]) == {"miou": 1.0, "ciou": 1.0}


def test_mean_and_cumulative_iou_weigh_examples_and_pixels():
    """A half-right big mask and a missed small one: mIoU averages the examples, cIoU sums
    the pixels."""
    big = np.zeros((10, 10), np.uint8)
    big[:, :] = 1
    half = big.copy()
    half[:5] = 0
    small = np.zeros((10, 10), np.uint8)
    small[0, 0] = 1
    pairs = [metrics.overlap(half, big), metrics.overlap(np.zeros_like(small), small)]
    assert pairs == [(50, 100), (0, 1)]
    scores = metrics.mask_ious(pairs)
    assert scores["miou"] == pytest.approx(0.25)
    assert scores["ciou"] == pytest.approx(50 / 101)


def test_ssim_of_a_picture_with_itself_is_1_and_falls_with_noise():
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert metrics.ssim(picture, picture) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(picture + rng.normal(0, 40, picture.shape), 0, 255).astype(np.uint8)
    worse = np.clip(picture + rng.normal(0, 120, picture.shape), 0, 255).astype(np.uint8)
    assert 1 > metrics.ssim(picture, noisy) > metrics.ssim(picture, worse)
    assert metrics.ssim(picture, noisy) == pytest.approx(metrics.ssim(noisy, picture))


def test_ssim_of_two_flat_pictures_is_its_luminance_term():
    """Without structure SSIM is (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)."""
    a, b = np.full((16, 16), 100, np.uint8), np.full((16, 16), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100**2 + 140**2 + c1))


def test_mse_and_psnr():
    a = np.zeros((4, 4), np.uint8)
    b = np.full((4, 4), 255, np.uint8)
    assert metrics.mse(a, b) == 1.0 and metrics.psnr(a, b) == 0.0
    c = np.full((4, 4), 51, np.uint8)  # 0.2 of the range: MSE 0.04, PSNR 13.98 dB
    assert metrics.mse(a, c) == pytest.approx(0.04)
    assert metrics.psnr(a, c) == pytest.approx(-10 * math.log10(0.04))
    assert metrics.psnr(a, a) == metrics.MAX_PSNR


def test_accuracy_of_a_known_list():
    assert metrics.accuracy(["a", "b", "c", "a"], ["a", "b", "a", "a"]) == 0.75


def test_mcc_perfect_inverted_shuffled_and_by_hand():
    target = ["pos", "neg"] * 50
    assert metrics.mcc(target, target) == pytest.approx(1.0)
    flipped = ["neg" if t == "pos" else "pos" for t in target]
    assert metrics.mcc(flipped, target) == pytest.approx(-1.0)
    # binary by hand: TP 3, FN 1, FP 2, TN 4 -> (12 - 2) / sqrt(5 * 4 * 6 * 5)
    pred = ["p", "p", "p", "n", "p", "p", "n", "n", "n", "n"]
    true = ["p", "p", "p", "p", "n", "n", "n", "n", "n", "n"]
    assert metrics.mcc(pred, true) == pytest.approx(10 / math.sqrt(5 * 4 * 6 * 5))
    # three classes, the labels shuffled: no correlation
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["a", "b", "c"], 3000))
    shuffled = list(rng.permutation(labels))
    assert abs(metrics.mcc(shuffled, labels)) < 0.05
    assert metrics.mcc(["a"] * 4, ["a"] * 4) == 0.0  # one class: undefined, reported 0


def test_majority_label_votes_over_whole_words():
    labels = ["enhancer", "promoter", "non-promoter"]
    assert metrics.majority_label(" promoter ", labels) == "promoter"
    assert metrics.majority_label("promoter enhancer promoter", labels) == "promoter"
    assert metrics.majority_label("non-promoter non-promoter", labels) == "non-promoter"
    assert metrics.majority_label("promoters", labels) == "promoters"  # no label: its own


def test_token_accuracy_counts_the_longer_side():
    assert metrics.token_accuracy([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert metrics.token_accuracy([[1, 9]], [[1, 2, 3, 4]]) == 0.25
    assert metrics.token_accuracy([[1, 2, 3, 4]], [[1, 2]]) == 0.5
    assert metrics.token_accuracy([[1], []], [[1], [5]]) == 0.5
