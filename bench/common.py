"""Pieces the training-step benchmarks share: packed rows and a trainer on a fixed batch."""

from __future__ import annotations

import torch

from mmfm.config import Config
from mmfm.config.schema import (
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from mmfm.core.types import IGNORE_INDEX, Batch
from mmfm.parallel.env import ParallelEnv
from mmfm.parallel.parallelize import parallelize
from mmfm.train.optim import build_optimizer, build_scheduler
from mmfm.train.steps import build_steps
from mmfm.train.trainer import Trainer


def packed_row(seq: int, n_docs: int, vocab: int, seed: int = 0) -> Batch:
    """One row of `n_docs` equal documents of random tokens, as the loader packs them."""
    g = torch.Generator().manual_seed(seed)
    length = seq // n_docs
    tokens = torch.randint(0, vocab, (1, seq), generator=g)
    doc_ids = (torch.arange(seq) // length)[None]
    positions = (torch.arange(seq) % length)[None]
    labels = torch.roll(tokens, -1, dims=1)
    labels[positions == length - 1] = IGNORE_INDEX  # the last token of a document
    weights = (labels != IGNORE_INDEX).float()
    return Batch(tokens, labels, positions, doc_ids, weights, torch.zeros_like(tokens))


class FixedRows:
    """The loader interface `Trainer.train_step` needs, without data counters."""

    def step_counts(self) -> list[float]:
        return []

    def describe(self, counts) -> dict[str, float]:
        return {}


def fixed_batch_trainer(
    model: ModelConfig,
    seq: int,
    device: str = "cpu",
    precision: str = "fp32",
    compile_blocks: bool = False,
) -> Trainer:
    """`Trainer` as `mmfm train` builds it for one process, one row per step, no data."""
    cfg = Config(
        model=model,
        data=DataConfig(seq_len=seq),
        parallel=ParallelConfig(compile=compile_blocks),
        optim=OptimConfig(lr=1e-4, warmup_steps=0, grad_clip=1.0),
        train=TrainConfig(
            steps=10**6,
            global_batch_size=1,
            micro_batch_size=1,
            device=device,
            precision=precision,
        ),
        logging=LoggingConfig(tensorboard=False, progress=False),
    )
    env = ParallelEnv.from_config(cfg.parallel, device)
    steps = build_steps(cfg, env, parallelize(cfg, env))
    optimizer = build_optimizer(steps.model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    return Trainer(cfg, env, steps, optimizer, scheduler, FixedRows(), None, [])
