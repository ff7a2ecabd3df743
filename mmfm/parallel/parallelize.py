"""`parallelize()`: from a model config to this rank's trainable model parts.

Fixed order, as in torchtitan: build on `meta` -> pipeline split -> tensor/sequence parallel
-> context parallel (the ring replaces the attention backend) -> activation checkpointing ->
compile -> FSDP2 (over data-parallel and context-parallel ranks) -> allocate and initialise.
Initialisation draws every parameter's full value from the seed and its name and copies out
this rank's shard, so every layout starts from the same weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mmfm.config.schema import Config, ModelConfig, ParallelConfig
from mmfm.core.torch_compat import (
    checkpoint_wrapper,
    compute_local_shape_and_global_offset,
    disable_autograd_cache,
)
from mmfm.model import build_model, init_weights
from mmfm.parallel.context_parallel import AllGatherAttention, RingAttention, build_kernel
from mmfm.parallel.data_parallel import apply_fsdp
from mmfm.parallel.env import ParallelEnv
from mmfm.parallel.pipeline import ModelParts, local_stage_ids, stage_layer_counts, stage_module
from mmfm.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelModel:
    model: nn.Module
    """Every parameter this rank holds, under its global name (optimizer, checkpoints)."""
    parts: list[nn.Module]
    """The modules this rank runs: the whole model, or its pipeline stages."""
    stage_ids: list[int]
    """The pipeline stage of each part ([0] without pipeline parallelism)."""


def parameter_counts(
    cfg: ModelConfig, device: torch.device | str, held: nn.Module
) -> tuple[int, int]:
    """(parameters of the whole model, elements of them this rank holds): `held` is this
    rank's model, its pipeline stages only, and of a parameter sharded by tensor or data
    parallelism (a DTensor, whose `numel` is the global one) only the local shard."""
    total = sum(p.numel() for p in build_model(cfg, device).parameters())
    mine = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in held.parameters())
    return total, mine


def materialize_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's piece of the full initial value into `param` (no communication)."""
    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    shape, offset = compute_local_shape_and_global_offset(
        full.shape, param.device_mesh, param.placements
    )
    piece = full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
    param.to_local().copy_(piece)


def _checkpoint_blocks(part: nn.Module, every: int) -> None:
    for i, name in enumerate(list(part.layers)):
        if i % every == 0:
            part.layers[name] = checkpoint_wrapper(part.layers[name], preserve_rng_state=False)


def parallelize(cfg: Config, env: ParallelEnv) -> ParallelModel:
    p = cfg.parallel
    model = build_model(cfg.model, env.device)
    if p.pp > 1:
        counts = stage_layer_counts(cfg.model.n_layers, p)
        stage_ids = local_stage_ids(env.coordinate("pp"), p)
        parts = [stage_module(model, s, counts) for s in stage_ids]
    else:
        parts, stage_ids = [model], [0]

    dp_mesh = _data_parallel_mesh(env)
    for part in parts:
        if p.tp > 1:
            apply_tensor_parallel(part, env.mesh["tp"], p.sequence_parallel)
        if p.cp > 1:
            part.backend = context_parallel_backend(p, env)
        if p.activation_checkpoint:
            _checkpoint_blocks(part, p.activation_checkpoint)
        if p.compile:
            _compile_blocks(part, tensor_parallel=p.tp > 1)
        if dp_mesh is not None:
            bf16 = cfg.train.precision == "bf16"
            apply_fsdp(part, dp_mesh, bf16, reshard_after_forward=p.pp == 1)
        part.to_empty(device=env.device)
        init_weights(part, cfg.model, cfg.train.seed, materialize=materialize_shard)

    return ParallelModel(ModelParts(parts) if p.pp > 1 else model, parts, stage_ids)


def _compile_blocks(part: nn.Module, tensor_parallel: bool) -> None:
    """torch.compile each transformer block. Under tensor parallelism the embedding's output
    is a view that `DTensor.to_local` makes inside an autograd Function; a compiled graph fed
    that view returns no gradient for it (PyTorch 2.13 AOTAutograd), so the embedding would get
    none and DTensor's redistribute fails in backward. A copy gives the first block an input
    of its own: one activation copy per micro-batch, results exact.

    Under tensor parallelism AOTAutograd's on-disk cache is also turned off, for the process:
    a block whose graph is split around the eager document attention and whose weights are
    DTensors gets wrong gradients when its compiled graphs come from that cache (PyTorch
    2.13; a fresh compile is exact). The inductor kernel cache stays on."""
    if tensor_parallel:
        disable_autograd_cache()
        if part.tok_embeddings is not None:
            part.tok_embeddings.register_forward_hook(lambda module, args, out: out.clone())
    for block in part.layers.values():
        block.compile()


def context_parallel_backend(p: ParallelConfig, env: ParallelEnv):
    group = env.sub_mesh("cp").get_group()
    if p.cp_attention == "allgather":
        return AllGatherAttention(group)
    return RingAttention(group, build_kernel(p.cp_kernel, env.device))


def _data_parallel_mesh(env: ParallelEnv):
    """FSDP mesh: context-parallel ranks hold the same parameters but different tokens, so
    they shard (and sum gradients) together with the data-parallel ranks: (dp_replicate,
    dp_shard x cp) for HSDP, dp_shard x cp for FSDP, or None."""
    if env.dims.dp * env.dims.cp == 1:
        return None
    if env.dims.dp_replicate > 1:
        if env.dims.cp == 1:
            return env.mesh["dp_replicate", "dp_shard"]
        with warnings.catch_warnings():  # slicing a flattened dimension; no other spelling yet
            warnings.simplefilter("ignore", UserWarning)
            return env.mesh["dp_replicate", "dp_shard_cp"]
    return env.sub_mesh("dp_shard_cp")
