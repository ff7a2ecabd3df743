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
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mmfm.config.layout import filled_dp_shard
from mmfm.config.schema import ParallelConfig
from mmfm.core.errors import LaunchError
from mmfm.core.torch_compat import flatten_mesh

log = logging.getLogger("mmfm")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# What srun / sbatch export when a job holds GPUs (any of them, depending on how it asked).
_SLURM_GPU_VARS = (
    "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS",
    "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
)  # fmt: skip


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
        """The dimensions on `world_size` processes; dp_shard=-1 takes what the others leave
        (as torchtitan's ParallelDims does)."""
        dp_shard = filled_dp_shard(cfg, world_size)
        if dp_shard is None:
            raise LaunchError(
                f"parallel.dp_shard=-1 takes what dp_replicate x cp x tp x pp = "
                f"{cfg.dp_replicate * cfg.cp * cfg.tp * cfg.pp} leave, but that does not divide "
                f"the {world_size} processes started: change the layout or the number of processes"
            )
        return cls(cfg.dp_replicate, dp_shard, cfg.cp, cfg.tp, cfg.pp, world_size)

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
    _checkpoint_group: dist.ProcessGroup | None = field(default=None, repr=False)

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
                    timeout=datetime.timedelta(seconds=cfg.collective_timeout_s),
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

    def checkpoint_group(self) -> dist.ProcessGroup | None:
        """A gloo group of every rank for the collectives of background checkpoint writes
        (None in one process): a thread that shared the training's group would interleave its
        collectives with the step's in an order that differs between ranks. Every rank must
        call this, at the same point, the first time."""
        if self.world_size == 1:
            return None
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return self._checkpoint_group

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def log_rank_table(env: ParallelEnv) -> None:
    """Rank 0 logs where every rank runs (host, device, the GPU as the node names it, mesh
    coordinates) and the NCCL settings it started with: gathered once at start-up, it is the
    first thing to read when a multi-node job hangs or two ranks share a GPU. Every rank
    must call it (one gather); a single process logs nothing (its device is in the run line)."""
    if env.world_size == 1:
        return
    rows = [None] * env.world_size if env.is_main else None
    dist.gather_object(_rank_row(env), rows, dst=0)
    if rows is not None:
        settings = nccl_settings(os.environ) or "none set"
        log.info("ranks (NCCL settings: %s):\n%s", settings, format_rank_table(rows, env.dims))


def _rank_row(env: ParallelEnv) -> dict[str, object]:
    assert env.mesh is not None, "a mesh exists for more than one process"
    coords = env.mesh.get_coordinate()
    gpu = "-"
    if env.device.type == "cuda":
        gpu = visible_gpus(os.environ, torch.cuda.device_count())[env.device.index]
    place = {"rank": env.rank, "host": node_name(os.environ), "device": str(env.device)}
    return {**place, "gpu": gpu, **dict(zip(MESH_DIMS, coords, strict=True))}


def format_rank_table(rows: list[dict[str, object]], dims: ParallelDims) -> str:
    """One line per rank, in rank order; mesh columns only for dimensions larger than 1."""
    columns = ["rank", "host", "device", "gpu", *(d for d in MESH_DIMS if getattr(dims, d) > 1)]
    cells = [columns, *([str(row[c]) for c in columns] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def nccl_settings(environ: Mapping[str, str]) -> str:
    """The NCCL and torch-NCCL variables set here, e.g. `NCCL_SOCKET_IFNAME=ib0`."""
    names = sorted(k for k in environ if k.startswith(("NCCL_", "TORCH_NCCL_")))
    return " ".join(f"{k}={environ[k]}" for k in names)


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
    count = torch.cuda.device_count() if name != "cpu" and torch.cuda.is_available() else 0
    device = choose_device(name, local_rank, os.environ, count)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def choose_device(
    name: str, local_rank: int, environ: Mapping[str, str], device_count: int
) -> torch.device:
    """The device of this process from what it sees, not from the node's layout: sites that
    bind GPUs per task (`--gpus-per-task=1`, `--gpu-bind=closest`, cgroups) show each task
    only some of the node's GPUs, so `cuda:<local rank>` may not exist. The local rank modulo
    the visible count picks the right one for one GPU per task and for blocks of GPUs given
    in local-rank order. Under SLURM, a job that asked for GPUs and sees none is an error (a
    CPU fallback there would train for hours at a fraction of the speed)."""
    if name == "cpu":
        return torch.device("cpu")
    visible = visible_gpus(environ, device_count)
    if not visible:
        requested = slurm_gpu_request(environ)
        if name == "cuda" or requested:
            raise LaunchError(_no_gpu_message(name, environ, requested))
        return torch.device("cpu")
    return torch.device("cuda", local_rank % len(visible))


def visible_gpus(environ: Mapping[str, str], device_count: int) -> list[str]:
    """The GPUs this process sees, as the node names them: the CUDA_VISIBLE_DEVICES entries
    (indices or UUIDs), or 0..device_count-1 when it is unset; never more than torch can open."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(device_count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:device_count]


def slurm_gpu_request(environ: Mapping[str, str]) -> str | None:
    """`VAR=value` of the first SLURM variable saying this job was given GPUs, else None."""
    for var in _SLURM_GPU_VARS:
        value = environ.get(var, "").strip()
        if value and value.split(":")[-1] not in ("0", "none"):
            return f"{var}={value}"
    return None


def node_name(environ: Mapping[str, str]) -> str:
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def _no_gpu_message(name: str, environ: Mapping[str, str], requested: str | None) -> str:
    job = f" in SLURM job {environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in environ else ""
    why = f", although the job asked for GPUs ({requested})" if requested else ""
    shown = environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    return (
        f"train.device={name}: no CUDA device is visible on node {node_name(environ)}{job}"
        f"{why} (CUDA_VISIBLE_DEVICES={shown}): check the node's driver and the container's "
        "GPU access (apptainer --nv), or set train.device=cpu and submit without GPUs"
    )
