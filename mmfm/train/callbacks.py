"""Trainer callbacks: metrics.jsonl, TensorBoard, and the progress bar.

The trainer owns the loop and calls `on_fit_start`, `on_step_end` (with the step's scalars)
and `on_fit_end`; everything that reports lives here. The scalars are `loss` (the
normalised cross-entropy), `loss/z` (the z-loss, when loss.z_loss is on), loss/<modality>,
lr, grad_norm, tokens_per_s and data/*. A step that ran validation carries its val/*
scalars too: they are written even when the step is not a logging step. The trainer
reduces the metrics only on the steps these callbacks report (`logging.every`,
`logging.print_every`, the first and last step, validation steps); on the others the
scalars are empty.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mmfm")


class Callback:
    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        pass

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_fit_end(self) -> None:
        pass


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _has_validation(metrics: dict[str, float]) -> bool:
    return "val/loss" in metrics


class MetricsFile(Callback):
    """Appends one JSON object per logged step to `<run_dir>/metrics.jsonl`.

    On resume, lines of steps after the checkpoint (written before an interruption) are
    dropped so that the file holds each step once.
    """

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0 or _has_validation(metrics):
            row = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def on_fit_end(self) -> None:
        self.file.close()


class TensorBoard(Callback):
    """The same scalars as TensorBoard events under `<run_dir>/tb/`."""

    def __init__(self, log_dir: Path, every: int):
        self.log_dir, self.every = log_dir, every

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a previous, interrupted run wrote after the checkpoint.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0 or _has_validation(metrics):
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def on_fit_end(self) -> None:
        self.writer.close()


def format_metrics(metrics: dict[str, Any]) -> str:
    """One progress line: the loss, loss/<modality>, the z-loss (tiny: in e-notation), ..."""
    parts = [f"loss {metrics['loss']:.4f}"]
    parts += [
        f"{k.split('/')[1]} {v:.3f}"
        for k, v in metrics.items()
        if k.startswith("loss/") and k != "loss/z"
    ]
    if "loss/z" in metrics:
        parts.append(f"z {metrics['loss/z']:.2e}")
    if _has_validation(metrics):
        parts.append(f"val {metrics['val/loss']:.4f}")
    parts += [f"lr {metrics['lr']:.2e}", f"{metrics['tokens_per_s']:,.0f} tok/s"]
    return " | ".join(parts)


class Progress(Callback):
    """A tqdm bar (step, loss, tokens/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, enabled: bool, print_every: int):
        self.use_bar = enabled and sys.stderr.isatty()
        self.print_every = print_every
        self.last_val: float | None = None

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        self.first, self.total = start_step + 1, total_steps
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if _has_validation(metrics):
            self.last_val = metrics["val/loss"]
        if self.use_bar:
            # The bar keeps showing the latest metrics (and val/loss) between reporting steps.
            if "loss" in metrics:
                shown = dict(metrics)
                if self.last_val is not None:
                    shown["val/loss"] = self.last_val
                self.bar.set_postfix_str(format_metrics(shown), refresh=False)
            self.bar.update(1)
        elif (
            step % self.print_every == 0
            or step in (self.first, self.total)
            or _has_validation(metrics)
        ):
            log.info("step %d/%d | %s", step, self.total, format_metrics(metrics))

    def on_fit_end(self) -> None:
        if self.use_bar:
            self.bar.close()
