"""Pieces the training-step benchmarks share: packed rows and a trainer on a fixed batch."""

from __future__ import annotations

from pathlib import Path

from mmfm.config import Config
from mmfm.config.schema import (
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from mmfm.core.types import Batch
from mmfm.parallel.env import ParallelEnv
from mmfm.parallel.parallelize import parallelize
from mmfm.testing import packed_batch
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.optim import build_optimizer, build_scheduler
from mmfm.train.step_runner import build_step_runner
from mmfm.train.trainer import Trainer


def packed_row(seq: int, n_docs: int, vocab: int, seed: int = 0) -> Batch:
    """One row of `n_docs` equal documents of random tokens, as the loader packs them."""
    assert seq % n_docs == 0, f"seq {seq} is not a multiple of n_docs {n_docs}"
    return packed_batch([[seq // n_docs] * n_docs], vocab, seed)


class FixedRows:
    """A `mmfm.data.loader.Loader` without data: the same micro-batches every step (if given;
    the benchmarks call `Trainer.train_step` with theirs), no counters, no state."""

    def __init__(self, batches: list[Batch] | None = None):
        self.batches = batches or []

    def next_step(self, stop=None) -> list[Batch]:
        return self.batches

    def step_counts(self) -> list[float]:
        return []

    def note_totals(self, counts) -> None:
        pass

    def describe(self, counts) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def merge_states(self, states) -> dict:
        return {}

    def close(self) -> None:
        pass


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
    runner = build_step_runner(cfg, env, parallelize(cfg, env))
    optimizer = build_optimizer(runner.model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    never_saves = Checkpointer(Path(cfg.train.run_dir) / "checkpoints", keep=1)  # train_step only
    return Trainer(cfg, env, runner, optimizer, scheduler, FixedRows(), never_saves, [])
