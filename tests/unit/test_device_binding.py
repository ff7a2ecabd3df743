"""The device each process takes, from what its task sees (every SLURM GPU binding mode,
simulated: no GPU needed), the refusal of a silent CPU fallback in a GPU job, and the rank
table rank 0 logs at start-up."""

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mmfm.cli import main
from mmfm.config.schema import ParallelConfig
from mmfm.core.errors import LaunchError
from mmfm.parallel.env import (
    ParallelDims,
    ParallelEnv,
    choose_device,
    format_rank_table,
    log_rank_table,
    nccl_settings,
    process_ranks,
    visible_gpus,
)
from mmfm.testing import run_distributed

REPO = Path(__file__).resolve().parents[2]
SRUN = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}
SRUN |= {"MASTER_ADDR": "node01", "MASTER_PORT": "29500", "SLURMD_NODENAME": "gpu17"}


def device_of(environ: dict[str, str], device_count: int, name: str = "auto") -> str:
    """What `mmfm train` picks on an srun task that sees `device_count` GPUs."""
    environ = dict(environ)
    _, _, local_rank = process_ranks(environ)
    return str(choose_device(name, local_rank, environ, device_count))


@pytest.mark.parametrize(
    ("binding", "visible", "count", "device", "gpu"),
    [
        ("all 8 GPUs of the node (--gpus-per-node=8)", None, 8, "cuda:5", "5"),
        ("its own GPU (--gpus-per-task=1, --gpu-bind=single:1)", "5", 1, "cuda:0", "5"),
        ("one GPU, renumbered by a cgroup", None, 1, "cuda:0", "0"),
        ("the 4 of its socket (--gpu-bind=closest)", "4,5,6,7", 4, "cuda:1", "5"),
        ("2 GPUs (--gpus-per-task=2)", "10,11", 2, "cuda:1", "11"),
        ("UUIDs", "GPU-aa,GPU-bb", 2, "cuda:1", "GPU-bb"),
    ],
)
def test_local_rank_5_takes_a_gpu_it_sees(binding, visible, count, device, gpu):
    environ = SRUN if visible is None else {**SRUN, "CUDA_VISIBLE_DEVICES": visible}
    assert device_of(environ, count) == device, binding
    assert visible_gpus(environ, count)[int(device.split(":")[1])] == gpu


def test_visible_devices_set_by_hand_and_torchrun_local_rank():
    two = {"CUDA_VISIBLE_DEVICES": "3,7", "LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}
    assert device_of(two, 2) == device_of(two, 2, "cuda") == "cuda:1"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,7"}, 2) == ["3", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,7"}, 0) == []  # torch opens none
    assert device_of({**two, "LOCAL_RANK": "0"}, 2) == "cuda:0"
    assert device_of(SRUN, 8, "cpu") == "cpu"


def test_a_gpu_job_that_sees_no_gpu_stops_naming_the_node():
    for asked in ({"SLURM_GPUS_PER_NODE": "8"}, {"SLURM_GPUS_ON_NODE": "8"},
                  {"SLURM_GPUS_PER_TASK": "a100:1"}, {"SLURM_JOB_GPUS": "0,1"}):  # fmt: skip
        with pytest.raises(LaunchError) as refused:
            device_of({**SRUN, **asked, "CUDA_VISIBLE_DEVICES": ""}, 0)
        message = str(refused.value)
        assert "node gpu17 in SLURM job 42" in message and "=".join(*asked.items()) in message
        assert "\n" not in message
    assert device_of({**SRUN, "SLURM_GPUS_ON_NODE": "0"}, 0) == "cpu"  # a CPU job: no GPUs
    assert device_of(SRUN, 0) == "cpu"
    assert device_of({}, 0) == "cpu"  # auto outside SLURM: the CPU, as before
    with pytest.raises(LaunchError, match=r"train\.device=cuda: no CUDA device is visible on node"):
        device_of({}, 0, "cuda")


def test_mmfm_train_in_a_gpu_job_without_gpus_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in {**SRUN, "SLURM_NTASKS": "1", "SLURM_GPUS_PER_NODE": "8"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        main(["train", str(REPO / "launch/demo.yaml"), f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert stopped.value.code == 3 and "node gpu17" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_rank_table_lists_every_rank_with_its_mesh_coordinates():
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=2, pp=1, world_size=4)
    rows = [
        {"rank": r, "host": f"node0{r // 2}", "device": f"cuda:{r % 2}", "gpu": str(r % 2),
         "pp": 0, "dp_replicate": 0, "dp_shard": r // 2, "cp": 0, "tp": r % 2}
        for r in range(4)
    ]  # fmt: skip
    lines = format_rank_table(rows, dims).splitlines()
    assert lines[0].split() == ["rank", "host", "device", "gpu", "dp_shard", "tp"]
    assert [line.split() for line in lines[1:]][3] == ["3", "node01", "cuda:1", "1", "1", "1"]
    environ = {"NCCL_IB_HCA": "mlx5_0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "PATH": "/bin"}
    assert nccl_settings(environ) == "NCCL_IB_HCA=mlx5_0 TORCH_NCCL_ASYNC_ERROR_HANDLING=1"


def _start_and_log(timeout_s: float) -> tuple[float, list[str]]:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("mmfm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    cfg = ParallelConfig(dp_shard=2, collective_timeout_s=timeout_s)
    env = ParallelEnv.from_config(cfg, "cpu")
    log_rank_table(env)
    timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    return timeout.total_seconds(), records


@pytest.mark.slow  # two spawned ranks that import torch: 13 s alone, 43 s in the suite (loaded)
def test_two_ranks_start_with_the_configured_timeout_and_rank_0_logs_the_table():
    (timeout, logged), (_, elsewhere) = run_distributed(_start_and_log, 2, args=(123.0,))
    assert timeout == 123.0
    assert len(logged) == 1 and not elsewhere  # one gather, logged once
    table = logged[0].splitlines()
    assert table[1].split() == ["rank", "host", "device", "gpu", "dp_shard"]
    assert [row.split()[0] for row in table[2:]] == ["0", "1"]
    assert [row.split()[-1] for row in table[2:]] == ["0", "1"]  # dp_shard coordinates
