"""The training loop.

`Trainer.fit()` runs optimizer steps until `train.steps`, a stop signal, or too many
non-finite steps in a row. One step consumes one global batch: this rank's share arrives as
micro-batches, the loss is normalised by the global target counts (per modality, for
`loss.normalize`), the step runner (whole model or pipeline) accumulates gradients, then
gradients are clipped across all shards and AdamW steps. Everything else is a callback
(`Callback`): validation (`evaluate.Validation`: val/* every `eval.every` steps, the best
checkpoint), checkpointing (`checkpoint.Checkpointing`), and the reporters on the main rank.
What a checkpoint holds is the trainer's list of stateful components (`stateful.py`). The
trainer is a context manager: leaving it closes the loader's workers and the process group.

Communication per step, kept as low as torchtitan and OLMo-core keep it: the target counts
(one vector, a count per modality) are reduced before the loss and the gradient norm before
clipping; everything else the ranks must agree on travels in one all_reduce that is read to
the host once (`StepFlags`): whether any rank got a stop signal, whether the loss or gradient
norm is non-finite, whether a background checkpoint write still runs (checkpoint.async_save),
the data counters (exhaustion depends on them) and, on a step that reports (logged, printed
or validated), the metrics. Other steps reduce no metrics and
return none.
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

from mmfm.config import Config, to_yaml
from mmfm.core.errors import TrainingError
from mmfm.core.types import Batch
from mmfm.data.loader import Loader
from mmfm.data.tario import Interrupted
from mmfm.model.mot import upcycle_rounds
from mmfm.parallel.env import ParallelEnv
from mmfm.parallel.grads import clip_grad_norm_, finalize_gradients
from mmfm.train.callbacks import Callback
from mmfm.train.checkpoint import STATE_FILE, Checkpointer, checkpoint_config
from mmfm.train.loss import StepLoss, count_modality_targets, modality_losses, split_totals
from mmfm.train.stateful import (
    LoaderState,
    ModelState,
    OptimizerState,
    RngState,
    SchedulerState,
    Stateful,
    load_states,
    save_states,
    state_dicts,
)
from mmfm.train.step_runner import StepRunner
from mmfm.train.train_state import check_loader_state, check_state

log = logging.getLogger("mmfm")


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
class StepFlags:
    """What every rank must agree on before the optimizer step, from one all_reduce."""

    stop: bool
    """Some rank got a stop signal: every rank stops after this step."""
    writing: int
    """How many ranks' background checkpoint write was still running (0: every rank's files
    are written, or none is in flight; `checkpoint.Checkpointing` then completes it)."""
    finite: bool
    """The loss and the gradient norm are finite on every rank: the optimizer steps."""
    data_counts: list[float]
    """The loader's step counters summed over data-parallel ranks (see `step_counts`)."""
    reported: list[float] | None
    """On a reporting step: the gradient norm, then `StepLoss.totals()` summed over ranks."""


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
        runner: StepRunner,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loader: Loader,
        checkpointer: Checkpointer,
        callbacks: list[Callback],
    ):
        self.cfg, self.env = cfg, env
        self.model, self.runner = runner.model, runner
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loader, self.checkpointer = loader, checkpointer
        self.callbacks = _Callbacks(self, callbacks)
        self.device = env.device
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.stop_agreed = False
        """Whether some rank had a stop signal at the last step's `StepFlags`."""
        self.writes_pending = 0
        """`StepFlags.writing` of the last step."""
        # One rank per distinct copy adds a value to `StepFlags` (see `_agree`).
        replicas = ("cp", "tp", "pp")
        self._adds_data_counts = all(env.coordinate(d) == 0 for d in replicas)
        self._adds_loss_stats = env.coordinate("tp") == 0
        self.states: list[Stateful] = [
            ModelState(self.model),
            OptimizerState(self.model, optimizer),
            RngState(),
            SchedulerState(scheduler),
            LoaderState(loader, env),
            _Counters(self),
        ]
        """What a checkpoint holds, loaded in this order (stateful.py)."""

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        """The loader's workers stop and the process group ends (trackers are closed when
        `fit` returns or raises)."""
        try:
            self.loader.close()
        finally:
            self.env.close()

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> FitResult:
        total, first = self.cfg.train.steps, self.step + 1
        for cb in self.callbacks:
            cb.on_fit_start(self.step, total)
        stopped_by = None
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
                    report = self._reports(self.step + 1, first, total)
                    metrics = self.train_step(batches, report, stop)
                    for cb in self.callbacks:
                        cb.on_step_end(self.step, metrics)
                    if self._stop_requested(stop):
                        stopped_by = signal.Signals(stop.received or signal.SIGTERM).name
                        break
            for cb in self.callbacks:
                cb.on_train_end(stopped_by)
        finally:
            for cb in self.callbacks:
                cb.on_fit_end()
        return FitResult(self.step, stopped_by)

    def _reports(self, step: int, first: int, total: int) -> bool:
        """Whether `step` reduces and returns its metrics: metrics.jsonl and TensorBoard log it
        (`logging.every`), the progress line prints it (`print_every`, the first and the last
        step) or a callback on every rank reads them (validation). Decided from the config
        and those callbacks, so that every rank agrees (the reporters live on the main rank
        only)."""
        log_cfg = self.cfg.logging
        return (
            step % log_cfg.every == 0
            or step % log_cfg.print_every == 0
            or step in (first, total)
            or any(cb.wants_metrics(step) for cb in self.callbacks)
        )

    def _stop_requested(self, stop: StopSignal) -> bool:
        """Whether to stop after this step. All ranks agree through the step's `StepFlags`,
        so a signal that arrives after them (optimizer step, callbacks, validation) stops the
        run after the next step. One process needs no agreement: it stops after this one."""
        return self.stop_agreed or (self.env.world_size == 1 and stop.received is not None)

    def train_step(
        self, micro_batches: list[Batch], report: bool = True, stop: StopSignal | None = None
    ) -> dict[str, float]:
        """One optimizer step on this rank's micro-batches; the step's metrics if `report`
        (else {}: nothing is reduced for them). Whether any rank's `stop` has received a
        signal by the end of the backward pass is `stop_agreed` afterwards."""
        start = time.perf_counter()
        self.model.train()
        # Per modality in the same one all_reduce: loss.normalize=modality_mean needs them.
        targets = self._on_device(count_modality_targets(micro_batches))
        step_loss = StepLoss(self.env.all_reduce(targets, "dp_cp"), self.cfg.loss)
        self.runner.run(micro_batches, step_loss)
        finalize_gradients(self.model.parameters())
        max_norm = self.cfg.optim.grad_clip or math.inf
        grad_norm = clip_grad_norm_(self.model.parameters(), max_norm, self.env)
        stopping = stop is not None and stop.received is not None
        flags = self._agree(step_loss.totals(), grad_norm, report, stopping)
        self.stop_agreed, self.writes_pending = flags.stop, flags.writing
        lr = self.scheduler.get_last_lr()[0]
        stepped = self._step_if_finite(flags.finite)
        with warnings.catch_warnings():
            if not stepped:  # a skipped update still advances the schedule, on purpose
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
            self.scheduler.step()
        self.step += 1
        self.loader.note_totals(flags.data_counts)  # every stream dry: the next step stops
        data_metrics = self.loader.describe(flags.data_counts)
        if flags.reported is None:
            return {}
        return {**self._metrics(flags.reported, lr, start), **data_metrics}

    def _agree(
        self, stats: torch.Tensor, grad_norm: torch.Tensor, report: bool, stop: bool
    ) -> StepFlags:
        """The step's `StepFlags`: one all_reduce over every rank, one host read.

        Every rank adds its stop flag, whether its loss or the gradient norm is non-finite
        (the summed loss is finite exactly when every rank's share is) and whether its
        background checkpoint write is still running. The other values are
        added by one rank per distinct copy, the others adding zeros, so that the sum equals
        the reductions over groups it replaces: data counters by one rank per data-parallel
        rank, the loss statistics (summed over dp_cp and pp before) by tensor-parallel rank
        0, the gradient norm (already global) by rank 0.
        """
        counts = self.loader.step_counts()
        head = self._on_device(
            torch.tensor(
                [
                    float(stop),
                    0.0,
                    float(self.checkpointer.writing()),
                    *(counts if self._adds_data_counts else [0.0] * len(counts)),
                ]
            )
        )
        head[1] = ~(torch.isfinite(stats[:2]).all() & torch.isfinite(grad_norm))
        parts = [head]
        if report:
            norm = grad_norm.reshape(1).to(head.dtype)
            parts += [norm if self.env.is_main else torch.zeros_like(norm)]
            parts += [stats if self._adds_loss_stats else torch.zeros_like(stats)]
        values = self.env.all_reduce_world(torch.cat(parts)).tolist()
        n = 3 + len(counts)
        return StepFlags(
            stop=values[0] > 0,
            finite=values[1] == 0,
            writing=round(values[2]),
            data_counts=values[3:n],
            reported=values[n:] if report else None,
        )

    def _on_device(self, values: torch.Tensor) -> torch.Tensor:
        """CPU `values` on the device. A plain copy to CUDA waits for the work queued before
        it (a host sync); one from pinned memory is queued like a kernel."""
        if self.device.type != "cuda":
            return values.to(self.device)
        return values.pin_memory().to(self.device, non_blocking=True)

    def _metrics(self, reported: list[float], lr: float, start: float) -> dict[str, float]:
        """The step's scalars from `StepFlags.reported` (gradient norm, then loss stats).
        `loss` is the normalised cross-entropy; the z-loss, when on, is added to it in the
        objective and reported apart (`loss/z`); loss/<modality> are unweighted means over the
        modality's targets that carry loss, absent for a modality with none."""
        grad_norm = reported[0]
        loss, z_loss, per_modality = split_totals(reported[1:])
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / (time.perf_counter() - start),
            "nonfinite_steps": float(self.nonfinite_total),
        }
        if self.cfg.loss.z_loss:
            metrics["loss/z"] = z_loss
        metrics.update(modality_losses(per_modality))
        return metrics

    def _step_if_finite(self, finite: bool) -> bool:
        """Step the optimizer unless the loss or gradient norm was non-finite on some rank."""
        if finite:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            log.warning(
                "step %d: non-finite loss or gradient norm: update skipped (%d in a row, %d "
                "in total)",
                self.step + 1,
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

    def state(self) -> tuple[dict, dict]:
        """(tensors for DCP, JSON-able state) of everything a resume needs (`states`)."""
        return state_dicts(self.states)

    def save(self, background: bool = False) -> Path:
        """Checkpoint this step (`background`: see `Checkpointer.save`)."""
        states, config = self.states, to_yaml(self.cfg)
        return save_states(self.checkpointer, self.step, states, config, background)

    def load_model(self, path: str | Path, data: bool = False) -> None:
        """Model weights only (train.init_from): optimizer, schedule and data start fresh,
        but with `data` (train.init_data) the data streams continue from the checkpoint's."""
        model = ModelState(self.model)
        tensors = model.state_dict()
        rounds = [tensors["model"]]
        if self.cfg.model.mot.enabled and not _saved_model(path).mot.enabled:
            rounds = upcycle_rounds(tensors["model"])  # every group starts as the dense block
            log.info("upcycling the dense model of %s into every group", path)
        for i, part in enumerate(rounds):
            whole = self.env.dims.pp == 1 and i == 0
            self.checkpointer.load_model(path, part, whole_model=whole)
        model.load_state_dict(tensors)
        if data:
            loader = self.checkpointer.load_state(path).get("loader")
            check_loader_state(Path(path) / STATE_FILE, loader, self.loader)
            self.loader.load_state_dict(loader)
        log.info("initialised the model%s from %s", " and the data" if data else "", path)

    def _check_state(self, file: Path, state: dict) -> None:
        check_state(file, state, self.scheduler.state_dict(), self.loader)

    def load(self, path: str | Path) -> None:
        whole_model = self.env.dims.pp == 1
        load_states(self.checkpointer, path, self.states, whole_model, self._check_state)
        log.info("resumed from %s at step %d", path, self.step)


def _saved_model(path: str | Path):
    """The model section of checkpoint `path`'s config."""
    return checkpoint_config(Path(path), ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1"]).model


class _Counters:
    """The trainer's own state: its step and non-finite step counts (and, for the record,
    the world size that saved it)."""

    tensors = False

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t = self.trainer
        return {
            "step": t.step,
            "nonfinite": {"total": t.nonfinite_total, "in_a_row": t.nonfinite_in_a_row},
            "world_size": t.env.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = state["step"]
        t.nonfinite_total = state["nonfinite"]["total"]
        t.nonfinite_in_a_row = state["nonfinite"]["in_a_row"]


class _Callbacks(list):
    """The trainer's callbacks: each one appended (as tests and benchmarks add theirs) is
    told its trainer."""

    def __init__(self, trainer: Trainer, callbacks: list[Callback]):
        self.trainer = trainer
        super().__init__()
        self.extend(callbacks)

    def append(self, callback: Callback) -> None:
        callback.trainer = self.trainer
        super().append(callback)

    def extend(self, callbacks) -> None:
        for callback in callbacks:
            self.append(callback)

    def __iadd__(self, callbacks):
        self.extend(callbacks)
        return self
