"""Forward and backward of one step's micro-batches, on a whole model or through the pipeline.

`build_step_runner` turns the parallelised model of `mmfm.parallel.parallelize` into a step
runner: `LocalSteps` when the model runs whole, `PipelineSteps` when it is cut into pipeline stages.
Both have the same contract (`StepRunner`): `run` accumulates the gradients of every
micro-batch of the step (`forward_only`, for validation, records the loss alone), and `model`
holds every parameter this rank owns. The loss, autocast and the loss-parallel context (the
vocabulary-sharded cross-entropy under tensor parallelism) belong to the step, so they live
here, not in `mmfm.parallel`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from mmfm.config.schema import Config
from mmfm.core.types import Batch
from mmfm.parallel.env import ParallelEnv
from mmfm.parallel.parallelize import ParallelModel
from mmfm.parallel.pipeline import build_schedule
from mmfm.train.loss import StepLoss

ContextFactory = Callable[[], contextlib.AbstractContextManager]


class StepRunner(Protocol):
    model: nn.Module
    """Every parameter this rank holds, under its global name (optimizer, checkpoints)."""

    def run(
        self, micro_batches: list[Batch], step_loss: StepLoss, forward_only: bool = False
    ) -> None: ...


def build_step_runner(cfg: Config, env: ParallelEnv, parallel: ParallelModel) -> StepRunner:
    """The step runner of `parallel` under `cfg`'s precision and layout."""
    loss_context = loss_parallel if cfg.parallel.tp > 1 else contextlib.nullcontext
    autocast: ContextFactory = contextlib.nullcontext
    if cfg.train.precision == "bf16":
        autocast = functools.partial(torch.autocast, env.device.type, dtype=torch.bfloat16)
    if cfg.parallel.pp > 1:
        return PipelineSteps(parallel, cfg, env, loss_context, autocast)
    return LocalSteps(parallel.model, env.device, loss_context, autocast)


class LocalSteps:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        loss_context: ContextFactory,
        autocast: ContextFactory,
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


class PipelineSteps:
    """Forward and backward of one step's micro-batches through the pipeline schedule."""

    def __init__(
        self,
        parallel: ParallelModel,
        cfg: Config,
        env: ParallelEnv,
        loss_context: ContextFactory,
        autocast: ContextFactory,
    ):
        self.model = parallel.model
        self.schedule = build_schedule(
            parallel.parts,
            parallel.stage_ids,
            cfg.parallel,
            env,
            cfg.micro_batches_per_step,
            self._loss,
        )
        self.parts = parallel.parts
        self.has_first = 0 in parallel.stage_ids
        self.v_shaped = cfg.parallel.pp_schedule == "zbv"
        self.device = env.device
        self.loss_context, self.autocast = loss_context, autocast
        self._batch: Batch | None = None
        self._step_loss: StepLoss | None = None

    def _loss(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self._step_loss(logits, self._batch.select(rows), key=int(rows[0]))

    def run(
        self, micro_batches: list[Batch], step_loss: StepLoss, forward_only: bool = False
    ) -> None:
        """Forward (and, unless `forward_only`, backward) of the step's micro-batches."""
        batch = Batch.cat(micro_batches).to(self.device)
        self._batch, self._step_loss = batch, step_loss
        rows = torch.arange(batch.tokens.shape[0])  # on the host: keys without a device sync
        args = (batch.tokens,) if self.has_first else ()
        # Mixture-of-Transformers: every stage routes by the ids, which only the first has.
        groups = self.parts[0].groups_of(batch.tokens)
        routing = {} if groups is None else {"groups": groups}
        # torch's V-shaped schedule (zbv) has no forward-only mode (its `eval` still hands
        # gradients between the two stages of a rank): it runs whole, its gradients dropped.
        no_backward = forward_only and not self.v_shaped
        run = self.schedule.eval if no_backward else self.schedule.step
        grad = torch.no_grad() if no_backward else contextlib.nullcontext()
        try:
            with self.loss_context(), self.autocast(), grad:
                run(
                    *args,
                    positions=batch.positions,
                    doc_ids=batch.doc_ids,
                    **routing,
                    target=rows,
                    return_outputs=False,
                )
        finally:
            self._batch, self._step_loss = None, None
        if forward_only and self.v_shaped:
            for part in self.parts:
                part.zero_grad(set_to_none=True)
