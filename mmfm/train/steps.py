"""Forward and backward of one step's micro-batches on a model that runs whole (no pipeline).

Gradients accumulate over the micro-batches (`forward_only`, for validation, records the
loss alone); the pipeline-parallel counterpart is `mmfm.parallel.pipeline.PipelineSteps`,
with the same `run` contract.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from mmfm.data.batch import Batch
from mmfm.train.loss import StepLoss


class LocalSteps:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        loss_context: Callable[[], contextlib.AbstractContextManager],
        autocast: Callable[[], contextlib.AbstractContextManager],
    ):
        self.model, self.device = model, device
        self.loss_context, self.autocast = loss_context, autocast

    def run(
        self, micro_batches: list[Batch], step_loss: StepLoss, forward_only: bool = False
    ) -> None:
        """Forward (and, unless `forward_only`, backward) of every micro-batch."""
        grad = contextlib.nullcontext() if not forward_only else torch.no_grad()
        for index, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            with self.loss_context(), grad:
                with self.autocast():
                    logits = self.model(batch.tokens, batch.positions, batch.doc_ids)
                loss = step_loss(logits, batch, key=index)
                if not forward_only:
                    loss.backward()
