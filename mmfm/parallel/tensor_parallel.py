"""Megatron-style tensor parallelism (+ sequence parallelism) with DTensor.

Attention q/k/v and the MLP gate/up projections are split column-wise (by heads / hidden
units), the attention output and MLP down projections row-wise. The embedding is split over
the vocabulary and the output projection too, so logits stay sharded over the vocabulary and
the cross-entropy runs vocabulary-parallel (`loss_parallel`): the full logits never exist on
one rank. With sequence parallelism the norms and the residual stream between blocks are
sharded along the sequence; the all-gather before attention / MLP and the reduce-scatter
after them replace Megatron's all-reduces. A Mixture-of-Transformers block shards each
group's projections the same way (without sequence parallelism: its groups' tokens are
gathered from the whole row).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (a Transformer or a pipeline stage of one) in place over `tp_mesh`."""
    # Layout of the residual stream between blocks: sharded on the sequence, or replicated.
    residual = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None:
        if sequence_parallel:
            top["norm"] = SequenceParallel()
        top["output"] = ColwiseParallel(
            input_layouts=residual, output_layouts=Shard(-1), use_local_output=False
        )
    parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, residual, sequence_parallel))


def _block_plan(block: nn.Module, residual, sequence_parallel: bool) -> dict[str, object]:
    """The plan of a dense block, or of a Mixture-of-Transformers block: each group's
    projections sharded as the dense ones (its norms replicated), or the shared attention's."""
    if not hasattr(block, "groups"):
        owners = attention_owners = [""]
    else:
        assert not sequence_parallel, "the config refuses sequence parallelism with model.mot"
        owners = [f"groups.{g}." for g in block.groups]
        attention_owners = [""] if block.attention is not None else owners
    plan: dict[str, object] = {}
    for o in attention_owners:
        plan.update(
            {
                f"{o}attention.wq": ColwiseParallel(),
                f"{o}attention.wk": ColwiseParallel(),
                f"{o}attention.wv": ColwiseParallel(),
                f"{o}attention.wo": RowwiseParallel(output_layouts=residual),
            }
        )
    for o in owners:
        plan.update(
            {
                f"{o}feed_forward.w1": ColwiseParallel(),
                f"{o}feed_forward.w3": ColwiseParallel(),
                f"{o}feed_forward.w2": RowwiseParallel(output_layouts=residual),
            }
        )
    if sequence_parallel:
        plan.update(
            {
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # (x, rope, backend, mask): only x is a sharded activation.
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None),
                    desired_input_layouts=(Replicate(), None, None, None),
                ),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
            }
        )
    return plan
