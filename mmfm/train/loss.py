"""Cross-entropy (and z-loss) weighted per target token and normalised over the whole step.

A micro-batch's loss is `sum(weight * scale[modality] * (ce + z * lse^2))` over its targets,
where the per-modality `scale` comes from the targets of the whole optimizer step (all
micro-batches of all data-parallel and context-parallel ranks, counted per modality in one
all_reduce): `1 / targets` for `loss.normalize=tokens`, `share / targets of the modality` for
`modality_mean`. Summing the micro-batch losses over micro-batches and ranks then gives the
same loss and gradient however the step is split, which is what makes every parallel layout
match one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

from mmfm.config.schema import LossConfig
from mmfm.core.types import IGNORE_INDEX, MODALITY_NAMES, Batch

MODALITY_COLUMNS = 3
"""Per modality in `StepLoss.totals()`, over targets with weight > 0: unweighted CE sum,
targets, weighted CE sum."""


def count_targets(batches: list[Batch]) -> torch.Tensor:
    """Targets that carry loss (weight > 0) in these micro-batches, as a float tensor."""
    return count_modality_targets(batches).sum()


def count_modality_targets(batches: list[Batch]) -> torch.Tensor:
    """`[n_modalities]`: targets that carry loss (weight > 0) per target modality."""
    counts = torch.zeros(len(MODALITY_NAMES), dtype=torch.float32)
    for b in batches:
        counts += torch.bincount(b.modality[b.loss_weights > 0], minlength=len(MODALITY_NAMES))
    return counts


def modality_scales(counts: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """`[n_modalities]`: the factor of each modality's weighted loss sum in the step's loss,
    from the step's global per-modality `counts` (a scalar count: `tokens` only).

    tokens: 1 / all targets. modality_mean: each modality present (count > 0) gets its
    weight's share of the modality weights present, divided by its own count; with every
    weight 1 that is the plain mean of the modality means. Device ops only: no host sync.
    """
    if cfg.normalize == "tokens":
        return (1 / counts.sum().clamp(min=1)).expand(len(MODALITY_NAMES))
    assert counts.numel() == len(MODALITY_NAMES), "modality_mean needs per-modality counts"
    weights = torch.tensor(
        [cfg.modality_weights.get(name, 1.0) for name in MODALITY_NAMES], device=counts.device
    )
    present = weights * (counts > 0)
    return present / present.sum().clamp(min=1e-30) / counts.clamp(min=1)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over the vocabulary, `CHUNK_ELEMENTS` logits at a time.

    The forward keeps only each token's log-sum-exp (fp32) instead of a log-softmax copy of
    the logits, and upcasts bf16 logits one chunk at a time; the backward writes the
    gradient, `softmax * (grad_ce + grad_lse) - one_hot * grad_ce`, straight into its output
    in one pass per chunk. Same values as `F.cross_entropy(reduction="none")` to float
    rounding, with two passes over the `[tokens, vocab]` logits instead of five and no extra
    copy of them kept. With `with_lse` the log-sum-exp is a second output (every row, not
    only targets): the z-loss `lse^2` then costs `[tokens]` vectors, since its gradient,
    `2 lse * softmax`, only adds to the per-row coefficient of the softmax.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, with_lse: bool = False):
        ctx.set_materialize_grads(False)
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0)
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        for rows in _chunks(logits):
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        target = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        ce = torch.where(valid, lse - target, 0.0)
        if not with_lse:
            return ce
        return ce, lse.clone()

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor | None, grad_lse: torch.Tensor | None = None):
        logits, safe, valid, lse = ctx.saved_tensors
        g = torch.zeros_like(lse) if grad_ce is None else torch.where(valid, grad_ce, 0.0)
        coefficient = g if grad_lse is None else g + grad_lse
        grad = torch.empty_like(logits)
        in_place = grad.dtype == torch.float32  # else fp32 per chunk, then cast into grad
        for rows in _chunks(logits):
            p = torch.sub(
                logits[rows].float(), lse[rows, None], out=grad[rows] if in_place else None
            )
            p.exp_().mul_(coefficient[rows, None]).scatter_add_(1, safe[rows, None], -g[rows, None])
            if not in_place:
                grad[rows] = p
        return grad, None, None


CHUNK_ELEMENTS = 1 << 21  # 8 MB of fp32 logits per chunk: stays in cache between passes


def _chunks(logits: torch.Tensor) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // logits.shape[1])
    return [slice(i, i + step) for i in range(0, len(logits), step)]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 `[rows, seq]`, 0 where the label is IGNORE_INDEX."""
    return token_losses(logits, labels)[0]


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, with_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token cross-entropy and, `with_lse`, log-sum-exp of the logits, fp32 `[rows, seq]`
    (the cross-entropy is 0 where the label is IGNORE_INDEX).

    Logits sharded over the vocabulary (a DTensor, under tensor parallelism and
    `loss_parallel`) give replicated results, returned as plain tensors.
    """
    if not isinstance(logits, DTensor):
        out = ChunkedCrossEntropy.apply(logits.flatten(0, 1), labels.flatten(), with_lse)
        ce, lse = out if with_lse else (out, None)
    else:
        ce = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).to_local()
        lse = _vocab_parallel_lse(logits) if with_lse else None
    return ce.view(labels.shape), None if lse is None else lse.view(labels.shape)


def _vocab_parallel_lse(logits: DTensor) -> torch.Tensor:
    """Exact log-sum-exp of logits sharded over the vocabulary, `[tokens]`, replicated.

    Each rank takes the chunked log-sum-exp of its own slice of the vocabulary; the `tp`
    partial results per token are gathered (`[tokens, tp]`, tiny) and combined with one more
    log-sum-exp. The gradient, `exp(logit - lse)` on each slice, flows back through both.
    """
    (placement,) = logits.placements
    assert placement.is_shard(logits.ndim - 1), f"vocabulary-sharded logits, got {placement}"
    local = logits.to_local().flatten(0, 1)
    no_targets = torch.full((len(local),), IGNORE_INDEX, device=local.device)
    _, part = ChunkedCrossEntropy.apply(local, no_targets, True)
    parts = DTensor.from_local(part[:, None], logits.device_mesh, [Shard(1)], run_check=False)
    return torch.logsumexp(parts.redistribute(placements=[Replicate()]).to_local(), dim=1)


@torch.no_grad()
def modality_sums(ce: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`[n_modalities, 3]` per target modality, over the targets that carry loss (weight > 0;
    not a prompt's labels): sum of unweighted cross-entropy, number of targets, and sum of
    loss weight x cross-entropy."""
    has_target = batch.loss_weights > 0
    index = batch.modality[has_target]
    ce = ce[has_target].float()
    sums = torch.zeros(len(MODALITY_NAMES), MODALITY_COLUMNS, device=ce.device)
    sums[:, 0].index_add_(0, index, ce)
    sums[:, 1].index_add_(0, index, torch.ones_like(ce))
    sums[:, 2].index_add_(0, index, ce * batch.loss_weights[has_target])
    return sums


class StepLoss:
    """The loss function of one optimizer step; also keeps what the step's metrics need.

    `targets` is the step's global count of targets with weight > 0: per modality
    (`count_modality_targets`, needed by modality_mean) or in total. The returned loss is
    the cross-entropy part plus the z-loss part; `totals()` keeps them apart.

    Contributions are recorded per micro-batch `key`: a second call with the same key (the
    pipeline schedule's shape inference runs the first micro-batch's loss once more)
    replaces the first instead of counting twice.
    """

    def __init__(self, targets: torch.Tensor, cfg: LossConfig | None = None):
        self.cfg = cfg or LossConfig()
        self.scales = modality_scales(targets, self.cfg)
        self._records: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, logits: torch.Tensor, batch: Batch, key: int) -> torch.Tensor:
        z = self.cfg.z_loss
        ce, lse = token_losses(logits, batch.labels, with_lse=z > 0)
        scale = batch.loss_weights * self.scales[batch.modality]
        ce_loss = (ce * scale).sum()
        z_loss = z * (lse.square() * scale).sum() if z > 0 else torch.zeros_like(ce_loss)
        self._records[key] = (ce_loss.detach(), z_loss.detach(), modality_sums(ce.detach(), batch))
        return ce_loss + z_loss

    def totals(self) -> torch.Tensor:
        """`[2 + 3 * n_modalities]`: the cross-entropy loss, the z-loss, then per modality
        the `modality_sums` columns (see `split_totals`)."""
        stats = torch.zeros(2 + MODALITY_COLUMNS * len(MODALITY_NAMES), device=self.scales.device)
        for ce_loss, z_loss, per_modality in self._records.values():
            stats[0] += ce_loss
            stats[1] += z_loss
            stats[2:] += per_modality.flatten()
        return stats


def split_totals(values: list[float]) -> tuple[float, float, dict[str, list[float]]]:
    """`StepLoss.totals()` (summed over ranks, on the host) as (loss, z-loss, {modality:
    [ce sum, targets, weighted ce sum]})."""
    per_modality = values[2:]
    columns = {
        name: per_modality[MODALITY_COLUMNS * i : MODALITY_COLUMNS * (i + 1)]
        for i, name in enumerate(MODALITY_NAMES)
    }
    return values[0], values[1], columns


def modality_losses(columns: dict[str, list[float]]) -> dict[str, float]:
    """`loss/<modality>` from the `split_totals` columns: the unweighted mean cross-entropy over
    the modality's targets, for each modality with targets in the step."""
    return {f"loss/{name}": ce / n for name, (ce, n, _) in columns.items() if n > 0}
