"""Deterministic weight init that does not depend on the parallel layout.

Every parameter is drawn from its own generator, seeded by the run seed and the parameter's
name, as the full (unsharded) tensor. Whatever slice of it a rank ends up holding, the same
seed gives the same model. `materialize` is where a parallel layout copies its own shard.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
from torch import nn

from mmfm.config.schema import ModelConfig

# Wrappers that torch.compile and activation checkpointing put into parameter names.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(canonical_name(name).encode())) % (2**63)


def init_value(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full initial value of parameter `name` (fp32, CPU)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std /= math.sqrt(2 * cfg.n_layers)  # residual-branch outputs, GPT-2 style
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    out = torch.empty(shape)
    return nn.init.trunc_normal_(out, std=std, a=-3 * std, b=3 * std, generator=gen)


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    param.copy_(full)


@torch.no_grad()
def init_weights(
    model: nn.Module,
    cfg: ModelConfig,
    seed: int,
    materialize: Callable[[torch.Tensor, torch.Tensor], None] = _copy_full,
) -> None:
    """Give every parameter of `model` (already allocated, e.g. by `to_empty`) its value."""
    for name, param in model.named_parameters():
        name = canonical_name(name)
        materialize(param, init_value(name, param.shape, cfg, seed).to(param.dtype))
