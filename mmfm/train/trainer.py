"""The training loop.

`Trainer.fit()` runs optimizer steps until `train.steps`, a stop signal, or too many
non-finite steps in a row. One step consumes one global batch as micro-batches (gradient
accumulation), normalises the loss by the step's target count, clips, and steps AdamW.
Reporting is done by callbacks; state goes to and comes from `Checkpointer`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmfm.config import Config, to_yaml
from mmfm.data.batch import MODALITY_NAMES, Batch
from mmfm.data.loader import PackedLoader
from mmfm.train.callbacks import Callback
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.loss import count_targets, modality_sums, token_cross_entropy, weighted_loss

log = logging.getLogger("mmfm")


class NonFiniteLossError(RuntimeError):
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
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loader: PackedLoader,
        checkpointer: Checkpointer,
        callbacks: list[Callback],
        device: torch.device,
    ):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.loader, self.checkpointer, self.callbacks = loader, checkpointer, callbacks
        self.device = device
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        bf16 = cfg.train.precision == "bf16"
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        )

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> FitResult:
        total = self.cfg.train.steps
        for cb in self.callbacks:
            cb.on_fit_start(self.step, total)
        stopped_by = None
        try:
            with StopSignal() as stop:
                while self.step < total:
                    metrics = self.train_step(self.loader.next_step())
                    for cb in self.callbacks:
                        cb.on_step_end(self.step, metrics)
                    if stop.received is not None:
                        stopped_by = signal.Signals(stop.received).name
                        break
                    every = self.cfg.checkpoint.every
                    if every and self.step % every == 0 and self.step < total:
                        self.save()
            if stopped_by is not None:
                path = self.save()
                log.info("%s received: saved %s at step %d, exiting", stopped_by, path, self.step)
            elif self.cfg.checkpoint.at_end:
                self.save()
        finally:
            for cb in self.callbacks:
                cb.on_fit_end()
        return FitResult(self.step, stopped_by)

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        start = time.perf_counter()
        self.model.train()
        num_targets = count_targets(micro_batches).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        per_modality = torch.zeros(len(MODALITY_NAMES), 2, device=self.device)
        for batch in micro_batches:
            batch = batch.to(self.device)
            with self.autocast:
                logits = self.model(batch.tokens, batch.positions, batch.doc_ids)
            ce = token_cross_entropy(logits, batch.labels)
            loss = weighted_loss(ce, batch, num_targets)
            loss.backward()
            loss_sum += loss.detach()
            per_modality += modality_sums(ce.detach(), batch)
        grad_norm = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        loss_value, norm_value = loss_sum.item(), grad_norm.item()
        stepped = self._step_if_finite(loss_value, norm_value)
        with warnings.catch_warnings():
            if not stepped:  # a skipped update still advances the schedule, on purpose
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
            self.scheduler.step()
        self.step += 1
        tokens = sum(b.num_tokens for b in micro_batches)
        metrics = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": norm_value,
            "tokens_per_s": tokens / (time.perf_counter() - start),
            "nonfinite_steps": float(self.nonfinite_total),
        }
        for name, (ce_sum, count) in zip(MODALITY_NAMES, per_modality.tolist(), strict=True):
            if count > 0:
                metrics[f"loss/{name}"] = ce_sum / count
        return metrics

    def _clip_gradients(self) -> torch.Tensor:
        max_norm = self.cfg.optim.grad_clip or math.inf
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)

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

    def state(self) -> tuple[dict, dict]:
        """(tensors for DCP, JSON-able state) of everything a resume needs."""
        optim = get_optimizer_state_dict(self.model, self.optimizer)
        tensors = {
            "model": get_model_state_dict(self.model),
            "optim": optim["state"],
            "rng": {"cpu": torch.get_rng_state()},
        }
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "optim_param_groups": optim["param_groups"],
            "nonfinite": {"total": self.nonfinite_total, "in_a_row": self.nonfinite_in_a_row},
        }
        return tensors, state

    def save(self) -> Path:
        tensors, state = self.state()
        return self.checkpointer.save(self.step, tensors, state, to_yaml(self.cfg))

    def load(self, path: str | Path) -> None:
        tensors, _ = self.state()
        state = self.checkpointer.load(path, tensors)
        set_model_state_dict(self.model, tensors["model"])
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            {"state": tensors["optim"], "param_groups": state["optim_param_groups"]},
        )
        torch.set_rng_state(tensors["rng"]["cpu"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        self.nonfinite_total = state["nonfinite"]["total"]
        self.nonfinite_in_a_row = state["nonfinite"]["in_a_row"]
        log.info("resumed from %s at step %d", path, self.step)
