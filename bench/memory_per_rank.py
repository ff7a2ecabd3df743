"""Bytes of parameters + gradients + optimizer state per rank, by parallel layout.

A fixed model (hidden 256, 8 layers, 8 / 4 heads, vocabulary 16384, untied) is built with
each layout on CPU/gloo, takes one real training step, and every rank counts the bytes of
the tensors it holds (DTensor shards counted locally). The table gives the largest rank and
its ratio to one process; FSDP over N ranks is expected near 1/N.

    python bench/memory_per_rank.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from mmfm.testing import run_distributed

MODEL = [
    "model.vocab_size=16384",
    "model.dim=256",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.max_seq_len=128",
    "data.paths=[builtin:demo]",
    "data.seq_len=128",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "logging.progress=false",
    "logging.tensorboard=false",
    "checkpoint.at_end=false",
]

LAYOUTS = {
    "1 process": [],
    "FSDP 2": ["parallel.dp_shard=2"],
    "FSDP 4": ["parallel.dp_shard=4"],
    "TP 2": ["parallel.tp=2"],
    "PP 2": ["parallel.pp=2"],
}


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def measure(overrides: list[str]) -> dict[str, int]:
    from mmfm.config import load_config
    from mmfm.parallel.grads import finalize_gradients
    from mmfm.train.command import build_trainer
    from mmfm.train.loss import StepLoss, count_targets

    trainer = build_trainer(load_config(None, overrides))
    micro_batches = trainer.loader.next_step()
    targets = trainer.env.all_reduce(count_targets(micro_batches), "dp_cp")
    trainer.runner.run(micro_batches, StepLoss(targets))
    finalize_gradients(trainer.model.parameters())
    params = list(trainer.model.parameters())
    grads = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
    trainer.optimizer.step()
    state = sum(
        _local_bytes(v)
        for s in trainer.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return {"params": sum(_local_bytes(p) for p in params), "grads": grads, "optim": state}


def world_size(layout: list[str]) -> int:
    size = 1
    for item in layout:
        size *= int(item.split("=")[1])
    return size


def main() -> None:
    cache = Path(tempfile.mkdtemp())
    rows = {}
    for name, layout in LAYOUTS.items():
        overrides = [*MODEL, *layout, f"data.cache_dir={cache}", f"train.run_dir={cache / name}"]
        per_rank = run_distributed(measure, world_size(layout), args=(overrides,))
        rows[name] = max(per_rank, key=lambda r: sum(r.values()))
    base = sum(rows["1 process"].values())
    print(f"torch {torch.__version__}; largest rank per layout, MiB")
    print("| layout | params | grads | optimizer | total | x 1 process |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        total = sum(r.values())
        cells = [f"{r[k] / 2**20:.2f}" for k in ("params", "grads", "optim")]
        print(f"| {name} | {' | '.join(cells)} | {total / 2**20:.2f} | {total / base:.3f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
