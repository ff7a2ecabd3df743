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
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial

from mmfm.core.torch_compat import foreach_mul_, foreach_norm, sharded_mesh_dims
from mmfm.parallel.env import ParallelEnv


@torch.no_grad()
def finalize_gradients(params: Iterable[torch.Tensor]) -> None:
    """Give every gradient its parameter's layout.

    Sequence-parallel norm weights get partial gradients, summed here over the TP group in
    one all_reduce for all of them (as Megatron does explicitly, where a redistribute per
    weight would take one each: 2 per block); DTensor's embedding backward returns the
    vocab-parallel embedding's gradient replicated (kept here as this rank's vocabulary
    shard only, without communication).
    """
    partial: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        if not isinstance(g, DTensor) or tuple(g.placements) == tuple(p.placements):
            continue
        dims = _partial_sum_dims(g, p)
        if dims is None:
            p.grad = g.redistribute(p.device_mesh, p.placements)
        else:
            partial[(p.device_mesh, dims, g.dtype)].append(p)
    for (mesh, dims, _), group in partial.items():
        _sum_partial_grads(group, mesh, dims)


def _partial_sum_dims(grad: DTensor, param: DTensor) -> tuple[int, ...] | None:
    """The mesh dims where `grad` is a partial sum that `param` has replicated, when those
    are its only differences from the parameter's layout; None otherwise."""
    if grad.device_mesh != param.device_mesh:
        return None
    dims = []
    for i, (have, want) in enumerate(zip(grad.placements, param.placements, strict=True)):
        if have == want:
            continue
        if type(have) is not Partial or have.reduce_op != "sum" or not want.is_replicate():
            return None
        dims.append(i)
    return tuple(dims)


def _sum_partial_grads(params: list[torch.Tensor], mesh: DeviceMesh, dims: tuple) -> None:
    """Sum the partial gradients of `params` over mesh `dims`: one flat all_reduce per dim."""
    shards = [p.grad.to_local() for p in params]
    flat = torch.cat([s.reshape(-1) for s in shards])
    for dim in dims:
        dist.all_reduce(flat, group=mesh.get_group(dim))
    for p, s, summed in zip(params, shards, flat.split([s.numel() for s in shards]), strict=True):
        p.grad = DTensor.from_local(
            summed.view(s.shape),
            mesh,
            p.placements,
            run_check=False,
            shape=p.shape,
            stride=p.stride(),
        )


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
            groups[(g.device_mesh, sharded_mesh_dims(g.placements))].append(g.to_local())
        else:
            groups[(None, ())].append(g)
    total_sq = torch.zeros((), device=env.device, dtype=torch.float32)
    for (mesh, sharded), grads in groups.items():
        norms = foreach_norm([g.float() for g in grads])
        sq = torch.stack(norms).square().sum()
        for dim in sharded:
            dist.all_reduce(sq, group=mesh.get_group(dim))
        total_sq += sq
    env.all_reduce(total_sq, "pp")
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grads in groups.values():
        foreach_mul_(grads, coef.to(grads[0].device))
    return total
