"""Fully-sharded data parallelism (FSDP2), hybrid-sharded (HSDP) over a 2-D mesh.

Every transformer block is its own FSDP unit (all-gathered just before it runs, resharded
after), and the model part is the root unit holding the embedding, final norm and output.
Gradients are summed, not averaged, across data-parallel ranks: the loss is already divided
by the global number of targets.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    part: nn.Module, mesh: DeviceMesh, bf16: bool, reshard_after_forward: bool = True
) -> None:
    """Shard `part` over `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP)."""
    mp_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    options = dict(mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    for block in part.layers.values():
        fully_shard(block, **options)
    fully_shard(part, **options)
    for module in part.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has no PREMUL_SUM, and NCCL's zero-copy path wants SUM.
            module.set_force_sum_reduction_for_comms(True)
