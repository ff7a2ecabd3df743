"""`mmfm train`: build every component from the config, resume if asked, and fit."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch

from mmfm.config import Config, ConfigError, save_config
from mmfm.config.layout import resolve_layout
from mmfm.config.schema import SourceConfig
from mmfm.core.errors import LaunchError
from mmfm.core.files import make_folder
from mmfm.data.demo import DEMO_RANGES
from mmfm.data.loader import build_loader
from mmfm.data.megatron import expand_prefixes
from mmfm.data.shards import expand_paths
from mmfm.parallel.env import ParallelEnv, log_rank_table, process_ranks
from mmfm.parallel.parallelize import parallelize, parameter_counts
from mmfm.parallel.requeue import requeue_after_stop, restart_count
from mmfm.prepare import dataset_vocab
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab, VocabError
from mmfm.train.callbacks import (
    Callback,
    MetricsFile,
    Progress,
    TensorBoard,
    require_trackers,
    terminal_filter,
    trackers,
)
from mmfm.train.checkpoint import (
    Checkpointer,
    Checkpointing,
    DamagedCheckpointError,
    require_checkpoint,
)
from mmfm.train.evaluate import Validation, build_evaluator
from mmfm.train.optim import build_optimizer, build_scheduler
from mmfm.train.samples import build_samples
from mmfm.train.step_runner import StepRunner, build_step_runner
from mmfm.train.task_scores import build_task_scores
from mmfm.train.trainer import FitResult, Trainer

log = logging.getLogger("mmfm")


class _RunLog(logging.FileHandler):
    """train.log; when the disk is full, one warning instead of logging's traceback per line
    (the error that stops the run, if any, is reported on its own)."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._warn(error)
        else:
            super().handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:  # the last lines' flush
            self._warn(e)

    def _warn(self, error: OSError) -> None:
        if not self.failed:
            self.failed = True
            print(f"mmfm: warning: cannot write {self.baseFilename} ({error})", file=sys.stderr)


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
    terminal = logging.StreamHandler()
    terminal.addFilter(terminal_filter)  # the step lines a progress bar shows: train.log only
    handlers: list[logging.Handler] = [terminal]
    if run_dir is not None:
        handlers.append(_RunLog(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def _resume_candidates(cfg: Config, checkpointer: Checkpointer) -> list[Path]:
    """The checkpoints to try resuming from, in order: the newest complete one first (then
    the older ones, for `resume=auto`), the named one, or none."""
    resume = cfg.train.resume
    if resume == "none":
        if checkpointer.latest() is not None:
            raise ConfigError(
                f"{cfg.train.run_dir} already holds checkpoints ({checkpointer.latest()}); "
                "set train.resume=auto to continue it or choose another train.run_dir"
            )
        return []
    if resume == "auto":
        return checkpointer.complete()[::-1]
    return [Path(resume)]


def _resume(trainer: Trainer, candidates: list[Path]) -> None:
    """Load the first candidate that reads. A damaged one is skipped with a warning; any other
    refusal (unsafe, or not this model) stops the run: an older checkpoint would hide it."""
    for index, path in enumerate(candidates):
        try:
            trainer.load(path)
            return
        except DamagedCheckpointError as e:
            if index + 1 == len(candidates):
                raise
            log.warning(
                "cannot resume from %s, trying %s instead: %s", path, candidates[index + 1], e
            )


def _callbacks(cfg: Config, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = [
        MetricsFile(run_dir / "metrics.jsonl", cfg.logging.every),
        Progress(cfg.logging.progress, cfg.logging.print_every),
    ]
    if cfg.logging.tensorboard:
        callbacks.append(TensorBoard(run_dir / "tb", cfg.logging.every))
    return callbacks + trackers(cfg, run_dir)


def build_trainer(cfg: Config) -> Trainer:
    """Every component of a run, built from the config, on this process's share (the layout
    resolved for the processes started: parallel.dp_shard=-1 filled; a config the command
    resolved is taken as it is)."""
    cfg = resolve_layout(cfg, process_ranks(os.environ)[1])
    require_trackers(cfg.logging, Path(cfg.train.run_dir))
    vocab, vocab_notes = _check_vocab(cfg)
    cfg = with_mot_ranges(cfg, vocab)
    _check_start(cfg)
    env = ParallelEnv.from_config(cfg.parallel, cfg.train.device)
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        make_folder(run_dir, f"train.run_dir={run_dir}")
        try:
            save_config(cfg, run_dir / "config.yaml")
            if vocab is not None:
                vocab.save(run_dir / VOCAB_FILE)
        except OSError as e:  # a full disk, a read-only folder
            raise LaunchError(f"cannot write into {run_dir} ({e}): free space there") from None
    env.barrier()
    setup_logging(run_dir if env.is_main else None, env.rank)
    log_rank_table(env)
    for note in vocab_notes:
        log.info("%s", note)
    torch.manual_seed(cfg.train.seed)

    runner = build_step_runner(cfg, env, parallelize(cfg, env))
    model = runner.model
    total, held = parameter_counts(cfg.model, env.device, model)
    if restart_count() is not None:
        log.info("SLURM job %s, restart %d", os.environ["SLURM_JOB_ID"], restart_count())
    log.info(
        "run dir %s | %d process(es), layout %s | %.2fM parameters, %.2fM of them held by "
        "rank 0 | device %s",
        run_dir,
        env.world_size,
        _layout(cfg),
        total / 1e6,
        held / 1e6,
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
        cfg.micro_batches_per_step,
        cfg.train.micro_batch_size,
    )
    extra = (run_dir / VOCAB_FILE,) if vocab is not None else ()
    ckpt = cfg.checkpoint
    group = env.checkpoint_group() if ckpt.async_save else None
    checkpointer = Checkpointer(
        checkpoint_dir(cfg), ckpt.keep, env.is_main, env.barrier, extra, group
    )
    # In this order: validation adds val/* before the reporters see the step's metrics.
    checkpointing = Checkpointing(ckpt.every, ckpt.at_end, ckpt.async_save)
    callbacks = [*_validation(cfg, env, runner, vocab, checkpointing, checkpointer)]
    scores = build_task_scores(cfg, env, model, vocab)  # task/* before the reporters, as val/*
    callbacks += [scores] if scores is not None else []
    callbacks += _callbacks(cfg, run_dir) if env.is_main else []
    samples = build_samples(cfg, env, model, vocab)  # after the reporters it logs to
    callbacks += [samples] if samples is not None else []
    callbacks.append(checkpointing)
    return Trainer(cfg, env, runner, optimizer, scheduler, loader, checkpointer, callbacks)


def _validation(
    cfg: Config,
    env: ParallelEnv,
    runner: StepRunner,
    vocab: Vocab | None,
    checkpointing: Checkpointing,
    checkpointer: Checkpointer,
) -> list[Callback]:
    """The validation callback of `cfg.eval` (none without held-out data)."""
    evaluator = build_evaluator(cfg, env, runner, vocab)
    if evaluator is None:
        return []
    log.info(
        "validation: %s | every %d steps | %s",
        evaluator.data.describe(),
        cfg.eval.every,
        f"{cfg.eval.steps} global batches" if cfg.eval.steps else "a whole pass",
    )
    if not cfg.eval.keep_best:
        return [Validation(evaluator, cfg.eval.every)]
    return [Validation(evaluator, cfg.eval.every, checkpointing, checkpointer.root)]


def with_mot_ranges(cfg: Config, vocab: Vocab | None) -> Config:
    """`cfg` with model.mot.ranges filled from the vocabulary (or the demo corpus's layout)
    for a Mixture-of-Transformers model that does not set them."""
    mot = cfg.model.mot
    if not mot.enabled or mot.ranges:
        return cfg
    if vocab is not None:
        ranges = vocab.id_ranges()
    elif all(p.startswith("builtin:demo") for s in cfg.data.source_list() for p in s.paths):
        ranges = list(DEMO_RANGES)
    else:
        raise ConfigError(
            "model.mot routes tokens by the vocabulary's id ranges, and this run has no "
            "vocabulary: set data.vocab=<tokenizers>/vocab.json or model.mot.ranges"
        )
    model = dataclasses.replace(cfg.model, mot=dataclasses.replace(mot, ranges=ranges))
    return dataclasses.replace(cfg, model=model)


def _check_vocab(cfg: Config) -> tuple[Vocab | None, list[str]]:
    """data.vocab, after checking that model.vocab_size covers it and that the checkpoint
    this run starts from and every prepared source (training and held-out) were made with
    the same vocabulary (same fingerprint); and notes for the log on sources whose
    vocabulary is unknown (no manifest.json or vocab.json beside them: accepted)."""

    vocab = None if cfg.data.vocab is None else Vocab.load(cfg.data.vocab)
    if vocab is not None and cfg.model.vocab_size < vocab.size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary in "
            f"data.vocab ({cfg.data.vocab}: {vocab.size} ids): raise model.vocab_size"
        )
    # The vocabulary everything must match: (fingerprint, the file it is read from).
    reference = None if vocab is None else (vocab.fingerprint, Path(cfg.data.vocab))
    start = _start_checkpoint(cfg)
    if start is not None and (start / VOCAB_FILE).is_file():
        theirs = Vocab.load(start / VOCAB_FILE).fingerprint
        if reference is not None and theirs != reference[0]:
            raise VocabError(
                f"data.vocab {reference[1]} (vocabulary {reference[0]}) differs from "
                f"{start / VOCAB_FILE} (vocabulary {theirs}) of the checkpoint this run starts "
                f"from, whose embedding rows mean those tokens: set data.vocab to "
                f"{start / VOCAB_FILE} and prepare the data with that vocabulary"
            )
        reference = reference or (theirs, start / VOCAB_FILE)
    sources = cfg.data.source_list() + (cfg.eval.source_list() if cfg.eval.enabled else [])
    return vocab, check_sources_vocab(sources, reference, cfg.model.vocab_size)


def check_sources_vocab(
    sources: list[SourceConfig],
    reference: tuple[str, Path] | None,
    model_size: int | None = None,
) -> list[str]:
    """Refuse a prepared source made with another vocabulary than `reference` (fingerprint,
    the file it is read from) or, without one, than the other sources, and then one whose
    vocabulary has more ids than `model_size` (the model's embedding rows); notes for the
    log on sources whose vocabulary is unknown. `mmfm eval` checks its held-out data with it
    too."""
    notes = []
    for name, directory in _source_dirs(sources):
        found = None if directory is None else dataset_vocab(directory)
        if found is None:
            where = directory or "built-in or remote shards"
            notes.append(
                f"data source {name!r} ({where}): no manifest.json or {VOCAB_FILE}, "
                "its vocabulary is not checked"
            )
        elif reference is None:
            reference = found  # no data.vocab or checkpoint: the sources must agree
            if model_size is not None and (directory / VOCAB_FILE).is_file():
                _check_fits(name, directory / VOCAB_FILE, model_size)
        elif found[0] != reference[0]:
            raise VocabError(
                f"data source {name!r}: {found[1]} says its shards were prepared with "
                f"vocabulary {found[0]}, but {reference[1]} is vocabulary {reference[0]}: "
                f"their ids mean other tokens. Prepare {directory} again with the tokenizers "
                f"of {reference[1]}, or use the vocabulary (and a model of it) the shards "
                "were made with"
            )
    return notes


def _check_fits(name: str, vocab_file: Path, model_size: int) -> None:
    """Without data.vocab, the vocabulary of the sources is the one their vocab.json names:
    refuse one with more ids than the model has rows (each document would be a bad sample)."""
    size = Vocab.load(vocab_file).size
    if size > model_size:
        raise ConfigError(
            f"data source {name!r}: its tokens are ids of the vocabulary {vocab_file} ({size} "
            f"ids), more than the model's rows, model.vocab_size ({model_size}), and no "
            f"data.vocab is set. Train a model of that vocabulary (data.vocab={vocab_file} "
            f"model.vocab_size={size} or more), or prepare the data with the model's tokenizers"
        )


def _check_start(cfg: Config) -> None:
    """Refuse, before the run dir is created, a start from a folder that is no checkpoint
    (its files checked, not read): the weights alone for train.init_from, unless
    train.init_data continues its data too."""
    start = _start_checkpoint(cfg)
    if start is None:
        return
    weights = cfg.train.resume in ("none", "auto") and start == Path(cfg.train.init_from or "")
    require_checkpoint(start, model_only=weights and not cfg.train.init_data)


def _start_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint `train` will load: the one resumed from, else train.init_from."""
    if cfg.train.resume == "auto":
        latest = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint.keep).latest()
        if latest is not None:
            return latest
    elif cfg.train.resume != "none":
        return Path(cfg.train.resume)
    return None if cfg.train.init_from is None else Path(cfg.train.init_from)


def _source_dirs(sources: list[SourceConfig]) -> list[tuple[str, Path | None]]:
    """(source name, directory of its local shards; None for built-in and remote shards)
    for every source."""
    found: dict[tuple[str, Path | None], None] = {}
    for source in sources:
        if source.tokenize:  # raw shards: the vocabulary of the tokenizers that read them
            found[source.name, Path(load_recipe(source.tokenize).output_dir)] = None
            continue
        if source.kind == "megatron":  # the folders of its .bin/.idx prefixes
            for prefix in expand_prefixes(source.paths):
                found[source.name, Path(prefix).parent] = None
            continue
        for path in source.paths:
            if path.startswith("builtin:"):
                found[source.name, None] = None
                continue
            for url in expand_paths([path]):
                local = "://" not in url and not url.startswith("pipe:")
                found[source.name, Path(url).parent if local else None] = None
    return list(found)


def _layout(cfg: Config) -> str:
    p = cfg.parallel
    dims = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "cp": p.cp, "tp": p.tp}
    dims["pp"] = p.pp
    parts = [f"{k}={v}" for k, v in dims.items() if v > 1]
    return " ".join(parts) or "single process"


def train(cfg: Config) -> FitResult:
    """`mmfm train`: build, resume if asked, fit."""
    if cfg.train.stages:
        raise ConfigError("train.stages: a run of stages is trained by mmfm.train.stages")
    # Decided before build_trainer writes into the run dir.
    resume_from = _resume_candidates(cfg, Checkpointer(checkpoint_dir(cfg), cfg.checkpoint.keep))
    with build_trainer(cfg) as trainer:
        if resume_from:
            _resume(trainer, resume_from)
        elif cfg.train.init_from is not None:
            trainer.load_model(cfg.train.init_from, data=cfg.train.init_data)
        result = trainer.fit()
        log.info("done: step %d, run dir %s", result.step, cfg.train.run_dir)
        if result.stopped_by and trainer.env.is_main:
            requeue_after_stop(cfg.train.max_requeues)
        return result
