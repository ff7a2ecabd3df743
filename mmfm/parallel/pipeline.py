"""Pipeline parallelism with `torch.distributed.pipelining`.

The layer stack is cut into `pp x pp_virtual_stages` stages (the embedding goes with the
first, the final norm and output projection with the last). Each stage is a copy of the
meta-device model with the other layers removed, so parameter names stay global and a
checkpoint reshards across layouts. The schedule runs the step's micro-batches through the
stages; positions and document ids reach every stage as keyword inputs, and the loss sees
which rows of the step's batch a micro-batch holds (the schedule's "target"). The step
runner that drives the schedule, with the loss, lives in `mmfm.train.step_runner`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from mmfm.config.schema import ParallelConfig
from mmfm.parallel.env import ParallelEnv

SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}


def stage_layer_counts(n_layers: int, cfg: ParallelConfig) -> list[int]:
    """Blocks per stage: `cfg.pp_layers`, or balanced with the remainder in the middle
    stages (the first also holds the embedding, the last the output projection)."""
    if cfg.pp_layers:
        return list(cfg.pp_layers)
    stages = cfg.num_stages
    counts = [n_layers // stages] * stages
    middle_first = sorted(range(stages), key=lambda s: (s in (0, stages - 1), s))
    for s in middle_first[: n_layers % stages]:
        counts[s] += 1
    return counts


def local_stage_ids(pp_rank: int, cfg: ParallelConfig) -> list[int]:
    """The stages this pipeline rank runs: looped (r, r+pp, ...) or V-shaped for zbv."""
    if cfg.pp_schedule == "zbv":
        return [pp_rank, 2 * cfg.pp - 1 - pp_rank]
    return [pp_rank + i * cfg.pp for i in range(cfg.pp_virtual_stages)]


def stage_module(model: nn.Module, stage: int, counts: list[int]) -> nn.Module:
    """A copy of the (meta-device) model holding only the parts of stage `stage`."""
    part = copy.deepcopy(model)
    start = sum(counts[:stage])
    keep = {str(i) for i in range(start, start + counts[stage])}
    for name in list(part.layers):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != len(counts) - 1:
        part.norm = None
        part.output = None
    return part


class ModelParts(nn.Module):
    """All the model parts this rank holds, under their global parameter names.

    The optimizer, checkpoints and gradient clipping work on this one module; the pipeline
    stages run the parts themselves. No forward: it only shares the parts' submodules.
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict({k: v for p in parts for k, v in p.layers.items()})
        for name in ("tok_embeddings", "norm", "output"):
            found = [getattr(p, name) for p in parts if getattr(p, name) is not None]
            setattr(self, name, found[0] if found else None)


def build_schedule(
    parts: list[nn.Module],
    stage_ids: list[int],
    cfg: ParallelConfig,
    env: ParallelEnv,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
):
    """The pipeline schedule of this rank's stages. `loss_fn(logits, rows)` gets the last
    stage's logits of one micro-batch and the row indices it holds of the step's batch (the
    schedule's `target`); it returns that micro-batch's share of the step's loss, already
    normalised, so the schedule adds no scaling of its own."""
    group = env.mesh["pp"].get_group()
    stages = [
        PipelineStage(part, stage, cfg.num_stages, env.device, group=group)
        for part, stage in zip(parts, stage_ids, strict=True)
    ]
    schedule_cls = SCHEDULES[cfg.pp_schedule]
    kwargs = dict(n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if issubclass(schedule_cls, PipelineScheduleSingle):
        return schedule_cls(stages[0], **kwargs)
    assert issubclass(schedule_cls, PipelineScheduleMulti)
    return schedule_cls(stages, **kwargs)
