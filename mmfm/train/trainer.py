"""The training loop.

`Trainer.fit()` runs optimizer steps until `train.steps`, a stop signal, or too many
non-finite steps in a row. One step consumes one global batch: this rank's share arrives as
micro-batches, the loss is normalised by the global target count, the step runner
(whole model or pipeline) accumulates gradients, then gradients are clipped across all
shards and AdamW steps. Every `eval.every` steps an `Evaluator` adds the held-out loss
(val/*) to the step's metrics, optionally keeping the best checkpoint. Reporting is done by
callbacks on the main rank; state goes to and comes from `Checkpointer`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmfm.config import Config, to_yaml
from mmfm.core.errors import TrainingError
from mmfm.core.types import MODALITY_NAMES, Batch
from mmfm.data.loader import StreamingLoader
from mmfm.data.tario import Interrupted
from mmfm.parallel.env import ParallelEnv
from mmfm.parallel.grads import clip_grad_norm_, finalize_gradients
from mmfm.train.callbacks import Callback
from mmfm.train.checkpoint import STATE_FILE, Checkpointer, DamagedCheckpointError
from mmfm.train.evaluate import BestCheckpoint, Evaluator
from mmfm.train.loss import StepLoss, count_targets
from mmfm.train.steps import StepRunner

log = logging.getLogger("mmfm")

# Optimizer state keyed by parameter name, so that it reshards across layouts.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_STATE_KEYS = ("step", "scheduler", "loader", "nonfinite")
"""What `load` reads from train_state.json."""


class NonFiniteLossError(TrainingError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class StopSignal:
    """Records SIGTERM / SIGUSR1 so the loop can checkpoint at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None

    def __enter__(self) -> StopSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum


@dataclass
class FitResult:
    step: int
    """Optimizer steps done when fit returned."""
    stopped_by: str | None = None
    """Name of the signal that stopped the run early, if any."""


class Trainer:
    def __init__(
        self,
        cfg: Config,
        env: ParallelEnv,
        steps: StepRunner,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loader: StreamingLoader,
        checkpointer: Checkpointer,
        callbacks: list[Callback],
        evaluator: Evaluator | None = None,
    ):
        self.cfg, self.env = cfg, env
        self.model, self.steps = steps.model, steps
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loader, self.checkpointer, self.callbacks = loader, checkpointer, callbacks
        self.evaluator = evaluator
        self.device = env.device
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._saved_step: int | None = None

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> FitResult:
        total = self.cfg.train.steps
        for cb in self.callbacks:
            cb.on_fit_start(self.step, total)
        stopped_by = None
        best = BestCheckpoint(self.checkpointer.root, self.env) if self._keep_best else None
        try:
            with StopSignal() as stop:
                # One process: a stop also ends a wait for stalled data (with several ranks the
                # others would be in this step's collectives; data.read_timeout_s bounds it).
                waiting = (lambda: stop.received is not None) if self.env.world_size == 1 else None
                while self.step < total:
                    try:
                        batches = self.loader.next_step(waiting)
                    except Interrupted:  # the loader state is still that of this step
                        stopped_by = signal.Signals(stop.received or signal.SIGTERM).name
                        break
                    metrics = self.train_step(batches)
                    if self.evaluator is not None and self._eval_due(total):
                        metrics.update(self.validate(best))
                    for cb in self.callbacks:
                        cb.on_step_end(self.step, metrics)
                    if self._stop_requested(stop):
                        stopped_by = signal.Signals(stop.received or signal.SIGTERM).name
                        break
                    every = self.cfg.checkpoint.every
                    if every and self.step % every == 0 and self.step < total:
                        self._save_once()
            if stopped_by is not None:
                path = self._save_once()
                log.info("%s received: saved %s at step %d, exiting", stopped_by, path, self.step)
            elif self.cfg.checkpoint.at_end:
                self._save_once()
        finally:
            for cb in self.callbacks:
                cb.on_fit_end()
        return FitResult(self.step, stopped_by)

    @property
    def _keep_best(self) -> bool:
        return self.evaluator is not None and self.cfg.eval.keep_best

    def _eval_due(self, total: int) -> bool:
        return self.step % self.cfg.eval.every == 0 or self.step == total

    def validate(self, best: BestCheckpoint | None = None) -> dict[str, float]:
        """val/* metrics of the held-out data now; with `best`, keep the best checkpoint."""
        assert self.evaluator is not None
        start = time.perf_counter()
        result = self.evaluator.run()
        metrics = result.metrics("val/")
        metrics["val/seconds"] = time.perf_counter() - start
        if best is not None and best.improves(result.loss):
            best.keep(self._save_once(), self.step, result.loss)
        return metrics

    def _save_once(self) -> Path:
        """A checkpoint of this step, unless one was already written (e.g. as the best)."""
        if self._saved_step != self.step:
            self._saved_path = self.save()
            self._saved_step = self.step
        return self._saved_path

    def _stop_requested(self, stop: StopSignal) -> bool:
        """Whether any rank got a stop signal (all ranks must stop at the same step)."""
        flag = torch.tensor([float(stop.received is not None)], device=self.device)
        return bool(self.env.all_reduce(flag, "dp_cp", "pp", "tp").item())

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()
        num_targets = self.env.all_reduce(count_targets(micro_batches).to(self.device), "dp_cp")
        step_loss = StepLoss(num_targets)
        self.steps.run(micro_batches, step_loss)
        finalize_gradients(self.model.parameters())
        max_norm = self.cfg.optim.grad_clip or math.inf
        grad_norm = clip_grad_norm_(self.model.parameters(), max_norm, self.env)
        stats = self.env.all_reduce(step_loss.totals(), "dp_cp", "pp")
        data_counts = torch.tensor(self.loader.step_counts(), device=self.device)
        data_counts = self.env.all_reduce(data_counts, "dp").tolist()
        lr = self.scheduler.get_last_lr()[0]
        stats = stats.tolist()
        loss_value, norm_value = stats[0], grad_norm.item()
        stepped = self._step_if_finite(loss_value, norm_value)
        with warnings.catch_warnings():
            if not stepped:  # a skipped update still advances the schedule, on purpose
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
            self.scheduler.step()
        self.step += 1
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        metrics = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": norm_value,
            "tokens_per_s": tokens / (time.perf_counter() - start),
            "nonfinite_steps": float(self.nonfinite_total),
        }
        per_modality = stats[1:]
        for i, name in enumerate(MODALITY_NAMES):
            ce_sum, count = per_modality[2 * i], per_modality[2 * i + 1]
            if count > 0:
                metrics[f"loss/{name}"] = ce_sum / count
        metrics.update(self.loader.describe(data_counts))
        return metrics

    def _step_if_finite(self, loss: float, grad_norm: float) -> bool:
        """Step the optimizer unless the loss or gradient norm is non-finite."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            log.warning(
                "step %d: loss %s, grad norm %s: update skipped (%d in a row, %d in total)",
                self.step + 1,
                loss,
                grad_norm,
                self.nonfinite_in_a_row,
                self.nonfinite_total,
            )
            limit = self.cfg.train.max_nonfinite_steps
            if self.nonfinite_in_a_row >= limit:
                raise NonFiniteLossError(
                    f"{limit} consecutive steps had a non-finite loss or gradient norm "
                    f"(last: step {self.step + 1}); lower optim.lr, check the data, or raise "
                    "train.max_nonfinite_steps"
                )
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    # -- state ------------------------------------------------------------------------------

    def _optimizer_state(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIM_OPTIONS)

    def _tensors(self, optim: dict) -> dict:
        return {
            "model": get_model_state_dict(self.model),
            "optim": {k: v for k, v in optim.items() if k.startswith("state.")},
            "rng": {"cpu": torch.get_rng_state()},
        }

    def state(self) -> tuple[dict, dict]:
        """(tensors for DCP, JSON-able state) of everything a resume needs.

        Optimizer hyper-parameters are not saved: they come from the config, and the
        learning rate from the scheduler state.
        """
        tensors = self._tensors(self._optimizer_state())
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            # Each data-parallel rank holds the state of its own data streams.
            "loader": self.loader.merge_states(
                self.env.all_gather_object(self.loader.state_dict(), "dp")
            ),
            "nonfinite": {"total": self.nonfinite_total, "in_a_row": self.nonfinite_in_a_row},
            "world_size": self.env.world_size,
        }
        return tensors, state

    def save(self) -> Path:
        tensors, state = self.state()
        return self.checkpointer.save(self.step, tensors, state, to_yaml(self.cfg))

    def load_model(self, path: str | Path) -> None:
        """Model weights only (train.init_from): optimizer, schedule and data start fresh."""
        state = get_model_state_dict(self.model)
        self.checkpointer.load_model(path, state, whole_model=self.env.dims.pp == 1)
        set_model_state_dict(self.model, state)
        log.info("initialised the model from %s", path)

    def load(self, path: str | Path) -> None:
        optim = self._optimizer_state()
        tensors = self._tensors(optim)
        state = self.checkpointer.load(path, tensors, whole_model=self.env.dims.pp == 1)
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise DamagedCheckpointError(
                f"{Path(path) / STATE_FILE} lacks {', '.join(missing)}: the checkpoint is "
                "damaged or not written by mmfm train; use another checkpoint"
            )
        set_model_state_dict(self.model, tensors["model"])
        optim.update(tensors["optim"])
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=_OPTIM_OPTIONS)
        torch.set_rng_state(tensors["rng"]["cpu"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(
            self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        self.nonfinite_total = state["nonfinite"]["total"]
        self.nonfinite_in_a_row = state["nonfinite"]["in_a_row"]
        log.info("resumed from %s at step %d", path, self.step)
