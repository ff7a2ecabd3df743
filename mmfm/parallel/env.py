"""Processes, devices and the one device mesh every parallel group comes from.

`ParallelEnv.from_config` reads the rank and world size that `torchrun` (or `mmfm train
--nproc`) put into the environment, starts the process group (NCCL on GPU, gloo on CPU),
checks the layout against the world size and builds the mesh
`(pp, dp_replicate, dp_shard, cp, tp)`: tensor parallelism innermost (within a node),
pipeline outermost. The rest of mmfm asks this object for ranks and reductions; only
`mmfm/parallel/` touches process groups.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mmfm.config.schema import ParallelConfig
from mmfm.core.errors import LaunchError
from mmfm.core.torch_compat import flatten_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int

    def __post_init__(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp
        if product != self.world_size:
            raise LaunchError(
                f"parallel.dp_replicate x dp_shard x cp x tp x pp = {self.dp_replicate} x "
                f"{self.dp_shard} x {self.cp} x {self.tp} x {self.pp} = {product}, but "
                f"{self.world_size} processes were started: make the product equal the number "
                "of processes (mmfm train ... --nproc N, or torchrun --nproc-per-node N)"
            )

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        return cls(cfg.dp_replicate, cfg.dp_shard, cfg.cp, cfg.tp, cfg.pp, world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> tuple[DeviceMesh, dict[str, DeviceMesh]]:
        """The 5-D mesh, and its flattened views by name: `dp` (ranks that read different
        rows), `dp_shard_cp` (ranks that shard parameters: context-parallel ranks hold the
        same ones) and `dp_cp` (ranks over which token counts and losses are summed)."""
        shape = tuple(getattr(self, name) for name in MESH_DIMS)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        flat = {
            "dp": flatten_mesh(mesh["dp_replicate", "dp_shard"], "dp"),
            "dp_shard_cp": flatten_mesh(mesh["dp_shard", "cp"], "dp_shard_cp"),
            "dp_cp": flatten_mesh(mesh["dp_replicate", "dp_shard", "cp"], "dp_cp"),
        }
        return mesh, flat


@dataclass
class ParallelEnv:
    """This process's place in the job: rank, device, mesh, and the collectives mmfm needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh | None
    flat_meshes: dict[str, DeviceMesh]

    @classmethod
    def from_config(cls, cfg: ParallelConfig, device_name: str) -> ParallelEnv:
        rank, world_size, local_rank = process_ranks(os.environ)
        dims = ParallelDims.from_config(cfg, world_size)
        device = _device(device_name, local_rank)
        mesh, flat = None, {}
        if world_size > 1:
            if not dist.is_initialized():
                backend = "nccl" if device.type == "cuda" else "gloo"
                dist.init_process_group(
                    backend,
                    device_id=device if device.type == "cuda" else None,
                    timeout=datetime.timedelta(minutes=30),
                )
            mesh, flat = dims.build_mesh(device.type)
        return cls(rank, world_size, local_rank, device, dims, mesh, flat)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def coordinate(self, dim: str) -> int:
        mesh = self.sub_mesh(dim)
        return 0 if mesh is None else mesh.get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    def sub_mesh(self, *dims: str) -> DeviceMesh | None:
        """The mesh over `dims` (or one flattened view), or None when its size is 1."""
        if self.mesh is None:
            return None
        if len(dims) == 1 and dims[0] in self.flat_meshes:
            mesh = self.flat_meshes[dims[0]]
        else:
            mesh = self.mesh[dims if len(dims) > 1 else dims[0]]
        return None if mesh.size() == 1 else mesh

    def all_reduce(self, tensor: torch.Tensor, *dims: str) -> torch.Tensor:
        """Sum `tensor` in place over the mesh dimensions `dims` (flattened names allowed)."""
        for d in dims:
            mesh = self.sub_mesh(d)
            if mesh is not None:
                dist.all_reduce(tensor, group=mesh.get_group())
        return tensor

    def all_reduce_world(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over every process, in one collective (all_reduce over all
        mesh dims would take one per dim)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_object(self, obj: object, dim: str) -> list:
        """`obj` from every rank along mesh dimension `dim`, in rank order."""
        mesh = self.sub_mesh(dim)
        if mesh is None:
            return [obj]
        out: list = [None] * mesh.size()
        dist.all_gather_object(out, obj, group=mesh.get_group())
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def process_ranks(environ: MutableMapping[str, str]) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, or from SLURM's when `srun`
    starts one task per GPU without torchrun (then copied to torchrun's names, which
    `init_process_group` reads; MASTER_ADDR and MASTER_PORT must be exported by the job)."""
    if "RANK" not in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in environ]
        if missing:
            raise LaunchError(
                f"srun started {environ['SLURM_NTASKS']} tasks but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set: export "
                "MASTER_ADDR=<first host of the job> and MASTER_PORT=<free port> in the job "
                "script, or run torchrun inside srun"
            )
        environ["RANK"] = environ["SLURM_PROCID"]
        environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
        environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    return (
        int(environ.get("RANK", "0")),
        int(environ.get("WORLD_SIZE", "1")),
        int(environ.get("LOCAL_RANK", "0")),
    )


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError(
                "train.device=cuda but no CUDA device is visible; use train.device=cpu"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)
