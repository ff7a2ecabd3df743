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

from mmfm.core.types import IGNORE_INDEX, MODALITY_NAMES, Batch


def count_targets(batches: list[Batch]) -> torch.Tensor:
    """Targets that carry loss (weight > 0) in these micro-batches, as a float tensor."""
    return sum((b.loss_weights > 0).sum() for b in batches).to(torch.float32)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over the vocabulary, `CHUNK_ELEMENTS` logits at a time.

    The forward keeps only each token's log-sum-exp (fp32) instead of a log-softmax copy of
    the logits, and upcasts bf16 logits one chunk at a time; the backward writes the
    gradient, `(softmax - one_hot) * grad`, straight into its output in one pass per chunk.
    Same values as `F.cross_entropy(reduction="none")` to float rounding, with two passes
    over the `[tokens, vocab]` logits instead of five and no extra copy of them kept.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0)
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        for rows in _chunks(logits):
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        target = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        return torch.where(valid, lse - target, 0.0)

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        g = torch.where(valid, grad_ce, 0.0)
        grad = torch.empty_like(logits)
        in_place = grad.dtype == torch.float32  # else fp32 per chunk, then cast into grad
        for rows in _chunks(logits):
            p = torch.sub(
                logits[rows].float(), lse[rows, None], out=grad[rows] if in_place else None
            )
            p.exp_().mul_(g[rows, None]).scatter_add_(1, safe[rows, None], -g[rows, None])
            if not in_place:
                grad[rows] = p
        return grad, None


CHUNK_ELEMENTS = 1 << 21  # 8 MB of fp32 logits per chunk: stays in cache between passes


def _chunks(logits: torch.Tensor) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // logits.shape[1])
    return [slice(i, i + step) for i in range(0, len(logits), step)]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 `[rows, seq]`, 0 where the label is IGNORE_INDEX.

    Logits sharded over the vocabulary (a DTensor, under tensor parallelism and
    `loss_parallel`) give a replicated result, returned as a plain tensor.
    """
    if isinstance(logits, DTensor):
        ce = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).to_local()
    else:
        ce = ChunkedCrossEntropy.apply(logits.flatten(0, 1), labels.flatten())
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
