"""Run a function on N local processes, the way `torchrun` would, and collect the results.

    results = run_distributed(fn, world_size=4, args=(...))   # fn(*args) on ranks 0..3

Each process gets RANK, WORLD_SIZE, LOCAL_RANK and a free MASTER_PORT in its environment (so
`ParallelEnv.from_config` starts gloo on CPU), one thread, and its return value or traceback
travels back. Used by the tests and benchmarks to compare layouts against one process.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp


class DistributedError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        # Plain pickle (a copy), not torch's shared-memory handles, which die with the process.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, args: Sequence = (), timeout: float = 600
) -> list[Any]:
    """`fn(*args)` on `world_size` spawned processes; their return values by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)  # from our own child processes
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may now wait forever on a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise DistributedError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def tiny_demo_model(n_layers: int = 4, seq_len: int = 64) -> list[str]:
    """Dotted overrides for the tiny Llama (dim 64, 4 heads, 2 KV heads) on the built-in demo
    corpus that the parity tests train at every layout."""
    from mmfm.data.demo import DEMO_VOCAB_SIZE

    return [
        f"model.vocab_size={DEMO_VOCAB_SIZE}",
        "model.dim=64",
        f"model.n_layers={n_layers}",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_multiple_of=32",
        f"model.max_seq_len={seq_len}",
        "data.paths=[builtin:demo]",
        f"data.seq_len={seq_len}",
    ]


def train_metrics(overrides: Sequence[str]) -> list[dict] | None:
    """Train with `overrides` (on this process's share) and return the rows of
    metrics.jsonl on the main rank, None on the others."""
    import json
    from pathlib import Path

    from mmfm.config import load_config
    from mmfm.train.main import train

    cfg = load_config(None, overrides)
    train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lines = (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
