"""Every private torch API mmfm uses, behind a name of ours, in this one file.

Names with a leading underscore carry no promise: torch moves or changes them between releases.
Each shim below says which private API it wraps, why mmfm needs it and what public API would
replace it; `tests/unit/test_torch_compat.py` checks each against its public equivalent or a
reference computation, and `setup.py` pins torch to the range those tests ran on. A torch
upgrade is then a change to this file and the pin, found by those tests.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed._functional_collectives import (
    all_gather_single_autograd as _all_gather_single_autograd,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper as _checkpoint_wrapper,
)
from torch.distributed.checkpoint import filesystem as _dcp_filesystem
from torch.distributed.checkpoint import metadata as _dcp_metadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement
from torch.distributed.tensor._utils import (
    compute_local_shape_and_global_offset as _compute_local_shape_and_global_offset,
)

# -- DCP checkpoint metadata (mmfm.train.dcp_reader) --------------------------------------------

DcpStorageInfo = _dcp_filesystem._StorageInfo
"""`torch.distributed.checkpoint.filesystem._StorageInfo`: where a tensor lies in a data file
(`relative_path`, `offset`, `length`, `transform_descriptors`), the values of a `.metadata`
pickle's `storage_data`. The safe reader checks each one before DCP opens a file. No public
class replaces it: a public reader of DCP metadata that does not unpickle would."""

DcpMemoryFormat = _dcp_metadata._MEM_FORMAT_ENCODING
"""`torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING`: the enum a `.metadata` pickle
stores for each tensor's memory format; the safe reader must allow it and watch its members.
Public replacement: the same as for `DcpStorageInfo`."""


def disable_autograd_cache() -> None:
    """Turn off AOTAutograd's on-disk cache of compiled graphs for this process
    (`torch._functorch.config.enable_autograd_cache`; no public switch in 2.13 other than the
    TORCHINDUCTOR_AUTOGRAD_CACHE=0 environment variable read at import). Under tensor
    parallelism a block compiled around the eager document attention gets wrong gradients
    when its graphs come from that cache (mmfm/parallel/parallelize.py)."""
    torch._functorch.config.enable_autograd_cache = False


def dcp_private_pickle_globals() -> dict[tuple[str, str], Any]:
    """The private (module, name) pairs a DCP `.metadata` pickle refers to, and their objects.

    A pickle names a class or function by its `__module__` and `__qualname__`, so the pairs are
    read from the objects themselves: `_StorageInfo`, `_MEM_FORMAT_ENCODING` and
    `torch.serialization._get_layout` (how a `torch.layout` pickles). The untrusting unpickler
    resolves only these and DCP's public metadata classes. Public replacement: none (see
    `DcpStorageInfo`)."""
    objects = (DcpStorageInfo, DcpMemoryFormat, torch.serialization._get_layout)
    return {(obj.__module__, obj.__qualname__): obj for obj in objects}


# -- model parallelism (mmfm.parallel) ----------------------------------------------------------


def checkpoint_wrapper(module: nn.Module, preserve_rng_state: bool = True) -> nn.Module:
    """`torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper`:
    activation checkpointing as a module wrapper whose `state_dict` keeps the wrapped module's
    names, which checkpoints, FSDP and the parameter-name init rely on (torchtitan uses it too).
    Public replacement: `torch.utils.checkpoint.checkpoint` inside the block's forward (which
    would put a training concern into the model), or a stable wrapper if torch publishes one."""
    return _checkpoint_wrapper(module, preserve_rng_state=preserve_rng_state)


def compute_local_shape_and_global_offset(
    global_shape: Sequence[int], mesh: DeviceMesh, placements: Sequence[Placement]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`torch.distributed.tensor._utils.compute_local_shape_and_global_offset`: the shape and
    offset of this rank's shard of a DTensor (any placements, `_StridedShard` of FSDP over TP
    included), so that init can copy this rank's slice out of a full value drawn from the seed.
    Public replacement: `distribute_tensor(full, mesh, placements).to_local()`, which gives the
    same shard but communicates and needs the full tensor on every rank's device."""
    return _compute_local_shape_and_global_offset(global_shape, mesh, placements)


def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """`DeviceMesh._flatten`: one 1-D mesh named `name` over several dims of a mesh (`dp`
    over dp_replicate x dp_shard, ...), the combined group FSDP and the reductions want.
    Public replacement: none in torch 2.13 (torchtitan calls `_flatten` too); a new
    `init_device_mesh` per combination would create duplicate process groups."""
    return mesh._flatten(name)


def sharded_mesh_dims(placements: Sequence[Placement]) -> tuple[int, ...]:
    """The mesh dims a DTensor is split over: every placement neither replicated nor partial.

    `Placement.is_shard()` is False for `torch.distributed.tensor._StridedShard`, the placement
    FSDP over TP gives a parameter, which is split all the same; a gradient norm that trusted
    `is_shard()` would count those elements on one rank only. Public replacement:
    `is_shard()`, once it covers strided shards."""
    return tuple(i for i, p in enumerate(placements) if not (p.is_replicate() or p.is_partial()))


def all_gather_single_autograd(tensor: torch.Tensor, gather_dim: int, group: Any) -> torch.Tensor:
    """`torch.distributed._functional_collectives.all_gather_single_autograd`: one gathered
    tensor along `gather_dim` whose backward reduce-scatters the gradient (the all-gather
    baseline of context parallelism). Public replacement: none that lasts: torch 2.13
    deprecates `torch.distributed.nn.functional.all_gather` (a list, one more copy) in favour of
    the functional collectives, which are still private."""
    return _all_gather_single_autograd(tensor, gather_dim, group)


# -- kernels (mmfm.parallel.context_parallel, mmfm.parallel.grads) -----------------------------


def cpu_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`: the fused CPU attention
    kernel, returning (out, log-sum-exp of the scaled scores); ring attention merges blocks with
    the log-sum-exp. Public replacement: none; `F.scaled_dot_product_attention` does not return
    it (the math kernel of context parallelism computes it explicitly, slower)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=attn_mask
    )


def cpu_flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward`: (dq, dk, dv) of
    one block given the merged output and log-sum-exp, the ring flash-attention backward.
    Public replacement: none (autograd through `F.scaled_dot_product_attention` uses the
    block's own output and log-sum-exp, not the merged ones)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=attn_mask
    )


def foreach_norm(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`torch._foreach_norm`: the L2 norm of each tensor in one fused call (what
    `clip_grad_norm_` uses). Public replacement: `torch.nn.utils.get_total_norm`, which returns
    only the total, where mmfm needs a sum per group of shards before reducing it."""
    return list(torch._foreach_norm(list(tensors)))


def foreach_mul_(tensors: Sequence[torch.Tensor], scale: torch.Tensor) -> None:
    """`torch._foreach_mul_`: scale every tensor in place in one fused call, by a tensor (no
    host sync). Public replacement: `torch.nn.utils.clip_grads_with_norm_`, which takes
    parameters, not the local shards of DTensor gradients."""
    torch._foreach_mul_(list(tensors), scale)


# -- DataLoader workers (mmfm.data.loader) -------------------------------------------------------


def dataloader_workers(iterator: Any) -> list:
    """`_MultiProcessingDataLoaderIter._workers`: the worker processes of a DataLoader iterator
    (none for an in-process one). mmfm's loader reports them so the trainer's shutdown paths can
    be checked to leave no worker behind. Public replacement: none (torch exposes no handle)."""
    return list(getattr(iterator, "_workers", []))


def shutdown_dataloader_workers(iterator: Any) -> None:
    """`_MultiProcessingDataLoaderIter._shutdown_workers()`: end the workers now. mmfm's stream
    iterator never runs out, so without it the workers would live until garbage collection.
    Public replacement: dropping the iterator, which ends them only when it is collected."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def iter_without_sigchld_handler(loader: Any) -> Any:
    """`iter(loader)` without the SIGCHLD handler of `_utils/signal_handling.py`
    (`_set_SIGCHLD_handler`, installed by the first multi-worker iterator of the process): it
    raises its RuntimeError for a dead worker in whatever the main thread is doing (a training
    step, a checkpoint), a traceback instead of mmfm's one-line error. mmfm's loader finds a
    dead worker at its next wait for it instead (the iterator's timeout), and says which and why.
    The handler before torch's is put back (the default where torch's was in place already).
    Public replacement: none (DataLoader has no switch for it)."""
    previous = signal.getsignal(signal.SIGCHLD)
    items = iter(loader)
    if threading.current_thread() is threading.main_thread():  # only there can torch set one
        if _torch_sigchld_handler(previous):
            previous = signal.SIG_DFL
        if _torch_sigchld_handler(signal.getsignal(signal.SIGCHLD)):
            signal.signal(signal.SIGCHLD, previous)
    return items


def _torch_sigchld_handler(handler: Any) -> bool:
    return getattr(handler, "__module__", None) == "torch.utils.data._utils.signal_handling"


def dataloader_failure(error: RuntimeError) -> str | None:
    """`"timeout"` or `"worker_died"` when `error` is the DataLoader's own RuntimeError for a
    wait that timed out or a worker that died, else None. torch tells them apart only by their
    text (`_utils/signal_handling.py`, `dataloader.py`). Public replacement: none."""
    text = str(error)
    if text.startswith("DataLoader timed out"):
        return "timeout"
    if text.startswith("DataLoader worker (pid"):
        return "worker_died"
    return None
