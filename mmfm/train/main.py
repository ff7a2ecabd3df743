"""`mmfm train`: build every component from the config, resume if asked, and fit."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmfm.config import Config, ConfigError, save_config
from mmfm.data.loader import build_loader
from mmfm.model import build_model, init_weights
from mmfm.train.callbacks import MetricsFile, Progress, TensorBoard
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.optim import build_optimizer, build_scheduler
from mmfm.train.trainer import FitResult, Trainer

log = logging.getLogger("mmfm")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def setup_logging(run_dir: Path) -> None:
    logger = logging.getLogger("mmfm")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(), logging.FileHandler(run_dir / "train.log")):
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


def build_trainer(cfg: Config) -> Trainer:
    """Every component of a run, built from the config; the run dir is created."""
    if cfg.parallel.world_size != 1:
        raise ConfigError(
            f"parallel.* asks for {cfg.parallel.world_size} processes; this build of mmfm trains "
            "in one process: set dp_replicate, dp_shard, cp, tp and pp to 1"
        )
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)

    model = build_model(cfg.model, device)
    model.to_empty(device=device)
    init_weights(model, cfg.model, cfg.train.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("run dir %s | %.2fM parameters | device %s", run_dir, n_params / 1e6, device)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    loader = build_loader(cfg)
    log.info(
        "data: %d shards | %d rows x %d tokens per step (%d micro-batches of %d rows)",
        len(loader.stream.urls),
        cfg.train.global_batch_size,
        cfg.data.seq_len,
        cfg.grad_accum_steps,
        cfg.train.micro_batch_size,
    )
    checkpointer = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint.keep)
    callbacks = [
        MetricsFile(run_dir / "metrics.jsonl", cfg.logging.every),
        Progress(cfg.logging.progress, cfg.logging.print_every),
    ]
    if cfg.logging.tensorboard:
        callbacks.append(TensorBoard(run_dir / "tb", cfg.logging.every))
    return Trainer(cfg, model, optimizer, scheduler, loader, checkpointer, callbacks, device)


def train(cfg: Config) -> FitResult:
    """`mmfm train`: build, resume if asked, fit."""
    # Decided before build_trainer writes into the run dir.
    resume_from = _resume_path(cfg, Checkpointer(checkpoint_dir(cfg), cfg.checkpoint.keep))
    trainer = build_trainer(cfg)
    if resume_from is not None:
        trainer.load(resume_from)
    result = trainer.fit()
    log.info("done: step %d, run dir %s", result.step, cfg.train.run_dir)
    return result
