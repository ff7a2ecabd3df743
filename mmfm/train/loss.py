"""Cross-entropy weighted per target token and normalised by the step's target count.

Each micro-batch's loss is `sum(weight * ce) / num_targets`, where `num_targets` counts the
targets of the whole optimizer step (all micro-batches of all data-parallel ranks). Summing
the micro-batch losses over micro-batches and ranks then gives the same loss and gradient
however the step is split, which is what makes every parallel layout match one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from mmfm.data.batch import IGNORE_INDEX, MODALITY_NAMES, Batch


def count_targets(batches: list[Batch]) -> torch.Tensor:
    """Targets that carry loss (weight > 0) in these micro-batches, as a float tensor."""
    return sum((b.loss_weights > 0).sum() for b in batches).to(torch.float32)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 `[rows, seq]`, 0 where the label is IGNORE_INDEX.

    Logits sharded over the vocabulary (a DTensor, under tensor parallelism and
    `loss_parallel`) give a replicated result, returned as a plain tensor.
    """
    ce = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    if isinstance(ce, DTensor):
        ce = ce.to_local()
    return ce.view(labels.shape)


@torch.no_grad()
def modality_sums(ce: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`[n_modalities, 2]`: sum of unweighted cross-entropy and number of targets per modality."""
    has_target = batch.labels != IGNORE_INDEX
    index = batch.modality[has_target]
    sums = torch.zeros(len(MODALITY_NAMES), 2, device=ce.device)
    sums[:, 0].index_add_(0, index, ce[has_target].float())
    sums[:, 1].index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
    return sums


class StepLoss:
    """The loss function of one optimizer step; also keeps what the step's metrics need.

    Contributions are recorded per micro-batch `key`: a second call with the same key (the
    pipeline schedule's shape inference runs the first micro-batch's loss once more)
    replaces the first instead of counting twice.
    """

    def __init__(self, num_targets: torch.Tensor):
        self.num_targets = num_targets.clamp(min=1)
        self._records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, logits: torch.Tensor, batch: Batch, key: int) -> torch.Tensor:
        ce = token_cross_entropy(logits, batch.labels)
        loss = (ce * batch.loss_weights).sum() / self.num_targets
        self._records[key] = (loss.detach(), modality_sums(ce.detach(), batch))
        return loss

    def totals(self) -> torch.Tensor:
        """`[1 + 2 * n_modalities]`: the loss, then (ce sum, count) per modality."""
        stats = torch.zeros(1 + 2 * len(MODALITY_NAMES), device=self.num_targets.device)
        for loss, per_modality in self._records.values():
            stats[0] += loss
            stats[1:] += per_modality.flatten()
        return stats
