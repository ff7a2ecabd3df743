"""The task metrics, each a pure function of predictions and targets (numpy in, floats out).

Masks: IoU per example (an empty prediction of an empty target counts 1), its mean, and the
cumulative IoU (all intersections over all unions, as referring segmentation reports cIoU).
Pictures: MSE and PSNR, and SSIM as Wang et al. (2004) define it (an 11x11 Gaussian window
of sigma 1.5, K1 = 0.01, K2 = 0.03, the mean of the map over the valid region and the
channels). Labels: accuracy and the multiclass Matthews correlation (Gorodkin's R_K, which is
scikit-learn's `matthews_corrcoef`). Text: exact match and per-token accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MAX_PSNR = 100.0
"""PSNR of identical pictures (infinite) is reported as this many dB."""


# -- masks ----------------------------------------------------------------------------------------


def overlap(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """(intersection, union) in pixels of two binary masks of one shape."""
    assert pred.shape == target.shape, (pred.shape, target.shape)
    p, t = pred.astype(bool), target.astype(bool)
    return int((p & t).sum()), int((p | t).sum())


def mask_ious(pairs: Sequence[tuple[int, int]]) -> dict[str, float]:
    """`miou` (mean of each example's IoU) and `ciou` (summed intersections over summed
    unions) of (intersection, union) pairs; an empty union is a perfect 1."""
    ious = [i / u if u else 1.0 for i, u in pairs]
    inter, union = sum(i for i, _ in pairs), sum(u for _, u in pairs)
    return {"miou": float(np.mean(ious)), "ciou": inter / union if union else 1.0}


# -- pictures -------------------------------------------------------------------------------------


def mse(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean squared error of two pictures of one shape, in units of `data_range` (so in
    [0, 1])."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.astype(np.float64) - b.astype(np.float64)) / data_range
    return float(np.mean(diff**2))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, at most MAX_PSNR (identical pictures)."""
    error = mse(a, b, data_range)
    return MAX_PSNR if error == 0 else min(MAX_PSNR, -10 * math.log10(error))


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Structural similarity of two pictures `[H, W]` or `[H, W, C]` of one shape: the mean
    of the SSIM map over the valid region and the channels (a window of 11 pixels, or the
    largest odd size the picture holds)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    x, y = (torch.from_numpy(np.asarray(p, dtype=np.float64)) for p in (a, b))
    x, y = (t[None] if t.ndim == 2 else t.permute(2, 0, 1) for t in (x, y))
    size = min(11, *x.shape[1:])
    size -= 1 - size % 2
    g = _gaussian(size, 1.5)

    def blur(t: torch.Tensor) -> torch.Tensor:  # the 2-D Gaussian as two 1-D passes
        return F.conv2d(F.conv2d(t[:, None], g[None, None, :, None]), g[None, None, None, :])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((num / den).mean())


# -- labels and text ------------------------------------------------------------------------------


def accuracy(pred: Sequence[str], target: Sequence[str]) -> float:
    assert len(pred) == len(target) and target
    return sum(p == t for p, t in zip(pred, target, strict=True)) / len(target)


def mcc(pred: Sequence[str], target: Sequence[str]) -> float:
    """Matthews correlation of any number of classes (a prediction outside the targets'
    labels is a class of its own); 0 where it is undefined (one class only)."""
    labels = sorted(set(pred) | set(target))
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.float64)
    for p, t in zip(pred, target, strict=True):
        confusion[index[t], index[p]] += 1
    true, predicted = confusion.sum(1), confusion.sum(0)
    n, correct = confusion.sum(), np.trace(confusion)
    cov = correct * n - true @ predicted
    den = math.sqrt((n * n - predicted @ predicted) * (n * n - true @ true))
    return float(cov / den) if den else 0.0


def majority_label(text: str, labels: Sequence[str]) -> str:
    """The known label written most often in `text` as whole words (a model trained on
    replicated labels, as Omni-DNA's, votes with its repeats; ties: the first label in
    `labels`), else the text itself, stripped (a wrong label of its own)."""
    text = text.strip()
    counts = [len(re.findall(rf"(?<!\S){re.escape(label)}(?!\S)", text)) for label in labels]
    if text in labels or not any(counts):
        return text
    return labels[int(np.argmax(counts))]


def token_accuracy(pred: Sequence[Sequence[int]], target: Sequence[Sequence[int]]) -> float:
    """Tokens equal at the same position, over the longer of prediction and target, summed
    over the examples (a prediction that stops early or runs on loses the difference)."""
    same = total = 0
    for p, t in zip(pred, target, strict=True):
        same += sum(a == b for a, b in zip(p, t, strict=False))
        total += max(len(p), len(t))
    return same / total if total else 1.0
