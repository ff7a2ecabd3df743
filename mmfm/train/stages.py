"""Context stages in one run (`train.stages`): Large World Model's growing context, each stage
a run of its own inside the run directory.

Stage k is the run's config with the stage's dotted keys on top, trained for the stage's
steps in `<run_dir>/stage-<k>`; from the second stage on it starts from the last stage's final
checkpoint with its data streams (`train.init_from` + `train.init_data`, the route a stage
started by hand takes, so both routes are one mechanism). Each stage builds its own process
group and mesh, so `parallel.cp` (and with `parallel.dp_shard=-1` the data-parallel size) may
change between stages on the same processes. Every stage's config is built and checked
before the first step, so a stage that breaks a rule fails at start-up, naming the stage.
Resuming (`train.resume=auto`, as a requeued SLURM job runs): a stage whose final checkpoint
exists is done; the first that is not resumes from its own latest checkpoint, mid-stage.
Without it a stage directory that holds checkpoints is refused, as a run directory is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from mmfm.config import Config, ConfigError
from mmfm.train.checkpoint import is_complete
from mmfm.train.command import checkpoint_dir, train
from mmfm.train.trainer import FitResult

log = logging.getLogger("mmfm")


def stage_dir(cfg: Config, k: int) -> Path:
    return Path(cfg.train.run_dir) / f"stage-{k}"


def stage_overrides(cfg: Config, k: int) -> list[str]:
    """The dotted overrides that turn the run's config into stage k's."""
    stage = dict(cfg.train.stages[k])
    steps = stage.pop("steps")
    out = [f"{key}={json.dumps(value)}" for key, value in stage.items()]
    out += [f"train.run_dir={stage_dir(cfg, k)}", f"train.steps={steps}", "train.stages=[]"]
    if k:
        last = stage_dir(cfg, k - 1) / "checkpoints" / f"step_{cfg.train.stages[k - 1]['steps']}"
        out += [f"train.init_from={last}", "train.init_data=true"]
    return out


def stage_configs(cfg: Config, load: Callable[[Sequence[str]], Config]) -> list[Config]:
    """Every stage's config: `load(overrides)` is the run's own loading (its recipe, its
    overrides, its world size) with the stage's overrides last."""
    configs = []
    for k, stage in enumerate(cfg.train.stages):
        try:
            configs.append(load(stage_overrides(cfg, k)))
        except ConfigError as e:
            named = ", ".join(f"{key}={value}" for key, value in stage.items())
            raise ConfigError(f"train.stages[{k}] ({named}): {e}") from None
    return configs


def train_stages(configs: Sequence[Config]) -> FitResult:
    """Train the stages in order, skipping the finished ones; stop where a signal stopped a
    stage (its checkpoint is written, a requeued job resumes it)."""
    result = FitResult(0)
    for k, cfg in enumerate(configs):
        final = checkpoint_dir(cfg) / f"step_{cfg.train.steps}"
        if cfg.train.resume == "auto" and is_complete(final):
            log.info("stage %d of %d: done (%s)", k + 1, len(configs), final)
            result = FitResult(cfg.train.steps)
            continue
        log.info(
            "stage %d of %d: %d steps at data.seq_len=%d, model.rope_theta=%g, parallel.cp=%d",
            k + 1, len(configs), cfg.train.steps, cfg.data.seq_len, cfg.model.rope_theta,
            cfg.parallel.cp,
        )  # fmt: skip
        result = train(cfg)
        if result.stopped_by:
            break
    return result
