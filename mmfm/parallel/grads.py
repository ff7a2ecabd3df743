"""Gradient norm and clipping across every way a gradient can be split.

A rank holds plain tensors (replicated), DTensor shards (FSDP, TP) and only its pipeline
stages' parameters. The global norm sums each distinct element once: local squared sums
are grouped by (mesh, sharded mesh dims), each group is summed over exactly the dims it is
sharded on, and the result is summed over pipeline stages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mmfm.parallel.env import ParallelEnv


@torch.no_grad()
def finalize_gradients(params: Iterable[torch.Tensor]) -> None:
    """Give every gradient its parameter's layout.

    Sequence-parallel norm weights get partial gradients (summed here over the TP group,
    as Megatron does explicitly), and DTensor's embedding backward returns the vocab-parallel
    embedding's gradient replicated (kept here as this rank's vocabulary shard only).
    """
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.Tensor], max_norm: float, env: ParallelEnv
) -> torch.Tensor:
    """Clip gradients in place to a global L2 norm of `max_norm` (inf: no clipping)."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            # Anything neither replicated nor partial is a shard; is_shard() misses the
            # _StridedShard that FSDP over TP uses.
            sharded = tuple(
                i for i, pl in enumerate(g.placements) if not (pl.is_replicate() or pl.is_partial())
            )
            groups[(g.device_mesh, sharded)].append(g.to_local())
        else:
            groups[(None, ())].append(g)
    total_sq = torch.zeros((), device=env.device, dtype=torch.float32)
    for (mesh, sharded), grads in groups.items():
        norms = torch._foreach_norm([g.float() for g in grads])
        sq = torch.stack(norms).square().sum()
        for dim in sharded:
            dist.all_reduce(sq, group=mesh.get_group(dim))
        total_sq += sq
    env.all_reduce(total_sq, "pp")
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grads in groups.values():
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
