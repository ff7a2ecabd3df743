"""Cross-entropy weighted per target token and normalised by the step's target count.

Each micro-batch's loss is `sum(weight * ce) / num_targets`, where `num_targets` counts the
targets of the whole optimizer step (all micro-batches, later all ranks). Summing the
micro-batch losses then gives the same loss and gradient however the step is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.data.batch import IGNORE_INDEX, MODALITY_NAMES, Batch


def count_targets(batches: list[Batch]) -> torch.Tensor:
    """Targets that carry loss (weight > 0) in these micro-batches, as a float tensor."""
    return sum((b.loss_weights > 0).sum() for b in batches).to(torch.float32)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 `[rows, seq]`, 0 where the label is IGNORE_INDEX."""
    ce = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce.view(labels.shape)


def weighted_loss(ce: torch.Tensor, batch: Batch, num_targets: torch.Tensor) -> torch.Tensor:
    return (ce * batch.loss_weights).sum() / num_targets.clamp(min=1)


@torch.no_grad()
def modality_sums(ce: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`[n_modalities, 2]`: sum of unweighted cross-entropy and number of targets per modality."""
    has_target = batch.labels != IGNORE_INDEX
    index = batch.modality[has_target]
    sums = torch.zeros(len(MODALITY_NAMES), 2, device=ce.device)
    sums[:, 0].index_add_(0, index, ce[has_target].float())
    sums[:, 1].index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
    return sums
