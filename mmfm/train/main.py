"""`mmfm train`: build every component from the config, resume if asked, and fit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mmfm.config import Config, ConfigError, save_config
from mmfm.data.loader import build_loader
from mmfm.parallel.env import ParallelEnv
from mmfm.parallel.parallelize import parallelize
from mmfm.slurm import requeue_after_stop, restart_count
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab
from mmfm.train.callbacks import Callback, MetricsFile, Progress, TensorBoard
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.optim import build_optimizer, build_scheduler
from mmfm.train.trainer import FitResult, Trainer

log = logging.getLogger("mmfm")


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """INFO to the terminal and `<run_dir>/train.log` on the main rank, warnings elsewhere."""
    logger = logging.getLogger("mmfm")
    logger.setLevel(logging.INFO if run_dir is not None else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def _resume_path(cfg: Config, checkpointer: Checkpointer) -> Path | None:
    resume = cfg.train.resume
    if resume == "none":
        if checkpointer.latest() is not None:
            raise ConfigError(
                f"{cfg.train.run_dir} already holds checkpoints ({checkpointer.latest()}); "
                "set train.resume=auto to continue it or choose another train.run_dir"
            )
        return None
    if resume == "auto":
        return checkpointer.latest()
    return Path(resume)


def _callbacks(cfg: Config, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = [
        MetricsFile(run_dir / "metrics.jsonl", cfg.logging.every),
        Progress(cfg.logging.progress, cfg.logging.print_every),
    ]
    if cfg.logging.tensorboard:
        callbacks.append(TensorBoard(run_dir / "tb", cfg.logging.every))
    return callbacks


def build_trainer(cfg: Config) -> Trainer:
    """Every component of a run, built from the config, on this process's share."""
    vocab = _check_vocab(cfg)
    env = ParallelEnv.from_config(cfg.parallel, cfg.train.device)
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if vocab is not None:
            vocab.save(run_dir / VOCAB_FILE)
    env.barrier()
    setup_logging(run_dir if env.is_main else None, env.rank)
    torch.manual_seed(cfg.train.seed)

    parallel_model = parallelize(cfg, env)
    model = parallel_model.model
    n_params = sum(p.numel() for p in model.parameters())
    if restart_count() is not None:
        log.info("SLURM job %s, restart %d", os.environ["SLURM_JOB_ID"], restart_count())
    log.info(
        "run dir %s | %d process(es), layout %s | %.2fM parameters on rank 0 | device %s",
        run_dir,
        env.world_size,
        _layout(cfg),
        n_params / 1e6,
        env.device,
    )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    loader = build_loader(
        cfg, env.dp_rank, env.dims.dp, cp_rank=env.coordinate("cp"), cp_size=env.dims.cp
    )
    sources = ", ".join(f"{s.name} ({len(s.urls)} shards)" for s in loader.sources)
    log.info(
        "data: %s | %d rows x %d tokens per step (%d micro-batches of %d rows per "
        "data-parallel rank)",
        sources,
        cfg.train.global_batch_size,
        cfg.data.seq_len,
        cfg.grad_accum_steps,
        cfg.train.micro_batch_size,
    )
    extra = (run_dir / VOCAB_FILE,) if vocab is not None else ()
    checkpointer = Checkpointer(
        checkpoint_dir(cfg), cfg.checkpoint.keep, env.is_main, env.barrier, extra
    )
    callbacks = _callbacks(cfg, run_dir) if env.is_main else []
    return Trainer(cfg, env, parallel_model, optimizer, scheduler, loader, checkpointer, callbacks)


def _check_vocab(cfg: Config) -> Vocab | None:
    if cfg.data.vocab is None:
        return None
    vocab = Vocab.load(cfg.data.vocab)
    if cfg.model.vocab_size < vocab.size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary in "
            f"data.vocab ({cfg.data.vocab}: {vocab.size} ids): raise model.vocab_size"
        )
    return vocab


def _layout(cfg: Config) -> str:
    p = cfg.parallel
    dims = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "cp": p.cp, "tp": p.tp}
    dims["pp"] = p.pp
    parts = [f"{k}={v}" for k, v in dims.items() if v > 1]
    return " ".join(parts) or "single process"


def train(cfg: Config) -> FitResult:
    """`mmfm train`: build, resume if asked, fit."""
    # Decided before build_trainer writes into the run dir.
    resume_from = _resume_path(cfg, Checkpointer(checkpoint_dir(cfg), cfg.checkpoint.keep))
    trainer = build_trainer(cfg)
    try:
        if resume_from is not None:
            trainer.load(resume_from)
        elif cfg.train.init_from is not None:
            trainer.load_model(cfg.train.init_from)
        result = trainer.fit()
        log.info("done: step %d, run dir %s", result.step, cfg.train.run_dir)
        if result.stopped_by and trainer.env.is_main:
            requeue_after_stop(cfg.train.max_requeues)
        return result
    finally:
        trainer.loader.close()
        trainer.env.close()
