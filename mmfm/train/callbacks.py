"""Trainer callbacks: metrics.jsonl, TensorBoard, and the progress bar.

The trainer owns the loop and calls `on_fit_start`, `on_step_end` (with the step's scalars),
`on_train_end` and `on_fit_end` (`Callback`); everything that reports lives here, checkpointing
and validation are callbacks of their own modules. The scalars are `loss` (the
normalised cross-entropy), `loss/z` (the z-loss, when loss.z_loss is on), loss/<modality>,
lr, grad_norm, tokens_per_s and data/*. A step that ran validation carries its val/*
scalars too: they are written even when the step is not a logging step. The trainer
reduces the metrics only on the steps these callbacks report (`logging.every`,
`logging.print_every`, the first and last step, validation steps); on the others the
scalars are empty.

Weights & Biases and MLflow (`logging.wandb`, `logging.mlflow`) get the scalars of
metrics.jsonl at the same steps and the config; their packages are imported only when they
are on. Their run ids are kept in `<run_dir>/trackers.json`, so a resumed run continues the
same tracker run rather than starting a second one. The samples of `eval.samples`
(train/samples.py) reach TensorBoard, W&B and MLflow as `Media` through `on_media`, in the
same runs as the scalars.

What the run dir, the trackers or the disk refuse ends as one `MmfmError`: a damaged
trackers.json (checked at start-up), an MLflow server that does not answer (probed at
start-up, before MLflow's minutes of retries), a tracker error, or metrics.jsonl on a full
disk. A callback's `on_fit_end` raises nothing while another error is on its way out.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import json
import logging
import math
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageSequence

from mmfm.config import Config, ConfigError
from mmfm.config.schema import LoggingConfig, MlflowConfig, WandbConfig
from mmfm.core.errors import LaunchError, TrainingError

if TYPE_CHECKING:
    from mmfm.train.trainer import Trainer

log = logging.getLogger("mmfm")

TRACKERS_FILE = "trackers.json"
"""<run_dir>/trackers.json: the W&B and MLflow run ids of this run directory."""

CONNECT_TIMEOUT_S = 10
"""How long the start-up probe of an MLflow server waits for its connection."""

BAR_SHOWS = "mmfm_bar_shows"
"""Set on a log record that the progress bar already shows: `terminal_filter` keeps it out of
the terminal (it would break the bar), train.log still gets it."""


@dataclass(frozen=True)
class Media:
    """One decoded span of a sample (`eval.samples`), as the trackers show it."""

    tag: str
    """`samples/<k>-<modality>`: the same tag at every step, so a tracker shows its history."""
    caption: str
    """The prompt it answers."""
    path: Path | None
    """The decoded file (PNG, GIF, SVG, FASTA, text); None when the span could not be."""
    text: str
    """The answer as text (a text span, DNA, SVG code), or why it was not decoded."""

    def picture(self) -> np.ndarray | None:
        """The file as an RGB picture `[H, W, 3]`: a PNG, the PNG render of an SVG, a GIF's
        frames side by side; None for other files."""
        if self.path is None:
            return None
        path = self.path
        if path.suffix == ".svg":
            path = path.with_suffix(".svg.png")
        if path.suffix not in (".png", ".gif") or not path.is_file():
            return None
        with Image.open(path) as picture:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(picture)]
        return np.concatenate(frames, axis=1)

    def markdown(self) -> str:
        """Prompt and answer for a text panel (TensorBoard's text plugin renders markdown)."""
        where = f"`{self.path.name}`" if self.path is not None else "(no file)"
        answer = "    " + "\n    ".join(self.text.splitlines() or [""])
        return f"**prompt:** {self.caption}\n\n**answer:** {where}\n\n{answer}"


class Callback:
    """A hook of `Trainer.fit`, as OLMo-core's: the reporters here run on the main rank;
    checkpointing (`train/checkpoint.py`) and validation (`train/evaluate.py`) run on every
    rank. `trainer` is set when the trainer takes the callback."""

    trainer: Trainer

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        pass

    def wants_metrics(self, step: int) -> bool:
        """Whether `step` must reduce its metrics for this callback (every rank must agree:
        only callbacks present on every rank may say yes)."""
        return False

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """After the optimizer step; earlier callbacks may have added to `metrics`."""

    def on_media(self, step: int, media: list[Media]) -> None:
        """Samples of the model at `step` (`samples.Samples`, on the main rank), for the
        reporters that show pictures and text."""

    def on_train_end(self, stopped_by: str | None) -> None:
        """The loop ended without an error: at the last step, or stopped by signal
        `stopped_by` (its name)."""

    def on_fit_end(self) -> None:
        """Always, last, also when an error is on its way out: close what was opened."""


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _has_validation(metrics: dict[str, float]) -> bool:
    return "val/loss" in metrics


def _logged(step: int, every: int, metrics: dict[str, float]) -> bool:
    """Whether metrics.jsonl, TensorBoard and the trackers log this step."""
    return bool(metrics) and (step % every == 0 or _has_validation(metrics))


def terminal_filter(record: logging.LogRecord) -> bool:
    """For the terminal's log handler: drop the step lines the progress bar shows."""
    return not getattr(record, BAR_SHOWS, False)


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank line or one cut short."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


class MetricsFile(Callback):
    """Appends one JSON object per logged step to `<run_dir>/metrics.jsonl`.

    On resume, lines of steps after the checkpoint (written before an interruption) are
    dropped so that the file holds each step once, and so is a line a crash or a full disk
    cut short.
    """

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        if self.path.exists():
            steps = [(line, _step_of(line)) for line in self.path.read_text().splitlines()]
            kept = [line for line, step in steps if step is not None and step <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if _logged(step, self.every, metrics):
            row = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk, a quota, a file system gone
                raise LaunchError(
                    f"cannot write {self.path} ({e.strerror or e}): free space there, then "
                    "resume from the last checkpoint (train.resume=auto)"
                ) from None

    def on_fit_end(self) -> None:
        failing = _failing()  # then the write that failed first is the error to report
        try:
            self.file.close()
        except OSError:
            if not failing:
                raise


class TensorBoard(Callback):
    """The same scalars as TensorBoard events under `<run_dir>/tb/`."""

    def __init__(self, log_dir: Path, every: int):
        self.log_dir, self.every = log_dir, every

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a previous, interrupted run wrote after the checkpoint.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if _logged(step, self.every, metrics):
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def on_media(self, step: int, media: list[Media]) -> None:
        for item in media:
            picture = item.picture()
            if picture is not None:
                self.writer.add_image(item.tag, picture, step, dataformats="HWC")
            self.writer.add_text(item.tag, item.markdown(), step)
        self.writer.flush()

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
    """A tqdm bar (step, loss, tokens/s, ETA) on a terminal; plain log lines otherwise.

    The log lines of the printed steps are logged under the bar too, marked `BAR_SHOWS`:
    train.log gets every one, the terminal none (`terminal_filter`).
    """

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
        printed = step % self.print_every == 0 or step in (self.first, self.total)
        if "loss" in metrics and (printed or _has_validation(metrics)):
            extra = {BAR_SHOWS: self.use_bar}
            log.info("step %d/%d | %s", step, self.total, format_metrics(metrics), extra=extra)

    def on_fit_end(self) -> None:
        if self.use_bar:
            self.bar.close()


# -- experiment trackers --------------------------------------------------------------------


def require_trackers(cfg: LoggingConfig, run_dir: Path) -> None:
    """Refuse, on every rank and before anything is built, a tracker whose package is missing,
    a damaged trackers.json and an MLflow server nobody answers at (only rank 0 logs, and a
    failure there alone would leave the other ranks waiting)."""
    for name, on in (("wandb", cfg.wandb.enabled), ("mlflow", cfg.mlflow.enabled)):
        if on and importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"logging.{name}.enabled needs the {name} package: pip install 'mmfm[{name}]', "
                f"or set logging.{name}.enabled=false"
            )
    if cfg.wandb.enabled or cfg.mlflow.enabled:
        _tracker_ids(run_dir)
    if cfg.mlflow.enabled and cfg.mlflow.tracking_uri:
        _probe_server(cfg.mlflow.tracking_uri)


def _probe_server(uri: str) -> None:
    """Connect once to an http(s) tracking server: MLflow itself retries a refused or silent
    server for minutes before it fails."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:  # ValueError: a port out of range
        raise LaunchError(
            f"logging.mlflow.tracking_uri {uri}: cannot connect ({e}): start the server, fix "
            "the URI, or leave it empty for the local file store <run_dir>/mlruns"
        ) from None


def trackers(cfg: Config, run_dir: Path) -> list[Callback]:
    """The W&B and MLflow callbacks the config turns on."""
    found: list[Callback] = []
    if cfg.logging.wandb.enabled:
        found.append(WandB(cfg.logging.wandb, run_dir, cfg.logging.every, cfg))
    if cfg.logging.mlflow.enabled:
        found.append(MLflow(cfg.logging.mlflow, run_dir, cfg.logging.every, cfg))
    return found


def _tracker_ids(run_dir: Path) -> dict[str, str]:
    """The run ids of `run_dir`'s trackers.json ({} without one)."""
    path = run_dir / TRACKERS_FILE
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except (ValueError, OSError):  # truncated, not UTF-8, unreadable
        ids = None
    if not isinstance(ids, dict) or not all(isinstance(v, str) for v in ids.values()):
        raise TrainingError(
            f"{path} is damaged (not a JSON object of W&B/MLflow run ids): repair it, or delete "
            "it to start new tracker runs"
        )
    return ids


def tracker_id(run_dir: Path, name: str) -> str | None:
    """The run id `name` ("wandb", "mlflow") has in `run_dir`'s trackers.json, if any."""
    return _tracker_ids(run_dir).get(name)


def _keep_tracker_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = _tracker_ids(run_dir)
    (run_dir / TRACKERS_FILE).write_text(json.dumps({**ids, name: run_id}, indent=1) + "\n")


def _run_to_continue(run_dir: Path, name: str, start_step: int) -> str | None:
    """The tracker run a resumed run continues; a run from step 0 starts a new one (as
    metrics.jsonl starts empty)."""
    return tracker_id(run_dir, name) if start_step > 0 else None


def _failing() -> bool:
    """Whether an exception is on its way out: `on_fit_end` runs in the trainer's `finally`,
    so a run that failed is marked failed in the tracker, not finished."""
    return sys.exc_info()[0] is not None


@contextmanager
def _tracker_errors(name: str, errors: tuple[type[Exception], ...]):
    """A tracker's own exceptions as one `LaunchError` naming it; in `on_fit_end` of a run
    that is failing already, a warning (the first error is the one to report)."""
    failing = _failing()
    try:
        yield
    except errors as e:
        text = " ".join(str(e).split())[:500] or type(e).__name__
        if failing:
            log.warning("logging.%s: %s", name, text)
            return
        raise LaunchError(
            f"logging.{name}: {text}; check the tracker's server and settings, or set "
            f"logging.{name}.enabled=false"
        ) from None


def flat_params(cfg: Config) -> dict[str, str]:
    """The config as MLflow params: dotted keys, scalars as text, lists and maps as JSON."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and all(isinstance(k, str) for k in node):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            text = node if isinstance(node, str) else json.dumps(node)
            flat[mlflow_name(prefix[:-1])] = text[:6000]  # MLflow's longest param value

    walk("", dataclasses.asdict(cfg))
    return flat


class WandB(Callback):
    """The scalars of metrics.jsonl, at the same steps, and the config in a W&B run; `mode`
    offline writes it under `<run_dir>/wandb/` only."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, every: int, config: Config):
        self.cfg, self.run_dir, self.every = cfg, run_dir, every
        self.config = dataclasses.asdict(config)

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        import wandb

        self.errors = (wandb.errors.Error, OSError)
        run_id = _run_to_continue(self.run_dir, "wandb", start_step)
        try:
            self.run = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                name=self.cfg.name or self.run_dir.resolve().name,
                tags=self.cfg.tags or None,
                dir=str(self.run_dir),
                mode=self.cfg.mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
        except wandb.errors.Error as e:
            raise LaunchError(
                f"logging.wandb: wandb.init failed ({e}); run `wandb login`, or set "
                "logging.wandb.mode=offline (upload later with `wandb sync`)"
            ) from None
        except ValueError as e:  # W&B's validation of its settings
            text = " ".join(str(e).split())
            raise ConfigError(f"logging.wandb: W&B refused a setting: {text}") from None
        with _tracker_errors("wandb", self.errors):
            # A resumed run may change fields (train.steps, ...): the latest config wins.
            self.run.config.update(self.config, allow_val_change=True)
        _keep_tracker_id(self.run_dir, "wandb", self.run.id)
        log.info("W&B run %s (%s)", self.run.id, self.cfg.mode)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if _logged(step, self.every, metrics):
            with _tracker_errors("wandb", self.errors):
                self.run.log(dict(metrics), step=step)

    def on_media(self, step: int, media: list[Media]) -> None:
        import wandb

        logged: dict[str, Any] = {}
        for item in media:
            suffix = "" if item.path is None else item.path.suffix
            if suffix == ".png":
                logged[item.tag] = wandb.Image(str(item.path), caption=item.caption)
            elif suffix in (".gif", ".mp4"):
                logged[item.tag] = wandb.Video(str(item.path), caption=item.caption)
            elif suffix == ".svg":
                logged[item.tag] = wandb.Html(item.text)
            else:
                logged[item.tag] = wandb.Html(f"<pre>{html.escape(item.markdown())}</pre>")
        with _tracker_errors("wandb", self.errors):
            self.run.log(logged, step=step)

    def on_fit_end(self) -> None:
        if getattr(self, "run", None) is not None:
            with _tracker_errors("wandb", self.errors):
                self.run.finish(exit_code=1 if _failing() else 0)


def mlflow_name(name: str) -> str:
    """A metric name MLflow's file store can keep: `loss` and `loss/text` would be a file and
    a folder of one name, so `/` becomes `.`; characters MLflow refuses become `_`."""
    return re.sub(r"[^\w\-. :]", "_", name.replace("/", "."))


class MLflow(Callback):
    """The scalars of metrics.jsonl, at the same steps (names through `mlflow_name`), and the
    config as params in an MLflow run; by default in the file store `<run_dir>/mlruns`."""

    def __init__(self, cfg: MlflowConfig, run_dir: Path, every: int, config: Config):
        self.cfg, self.run_dir, self.every = cfg, run_dir, every
        self.params = flat_params(config)
        self.uri = cfg.tracking_uri or (run_dir / "mlruns").resolve().as_uri()

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        if self.uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance and refuses it unless asked; a
            # local store is an offline one, so its usage telemetry stays off unless set.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.metric, self.param = Metric, Param
        self.errors = (MlflowException, OSError)
        self.run_id = _run_to_continue(self.run_dir, "mlflow", start_step)
        _probe_server(self.uri)
        with _tracker_errors("mlflow", self.errors):
            self.client = MlflowClient(self.uri)
            if self.run_id is None:
                self.run_id = self._new_run()
            else:
                self.client.update_run(self.run_id, status="RUNNING")
            self._log_params()
        _keep_tracker_id(self.run_dir, "mlflow", self.run_id)
        log.info("MLflow run %s in %s", self.run_id, self.uri)

    def _new_run(self) -> str:
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.cfg.experiment)
        )
        name = self.cfg.run_name or self.run_dir.resolve().name
        return self.client.create_run(experiment_id, run_name=name).info.run_id

    def _log_params(self) -> None:
        """The params the run lacks. MLflow params cannot change: a resumed run whose config
        changed keeps the first values (the new ones are in config.yaml), with a warning."""
        logged = self.client.get_run(self.run_id).data.params
        changed = [k for k, v in self.params.items() if k in logged and logged[k] != v]
        if changed:
            log.warning("MLflow params keep their first values: %s changed", ", ".join(changed))
        new = [self.param(k, v) for k, v in self.params.items() if k not in logged]
        for start in range(0, len(new), 100):  # MLflow's most params per batch
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if _logged(step, self.every, metrics):
            now = int(time.time() * 1000)
            rows = [self.metric(mlflow_name(k), float(v), now, step) for k, v in metrics.items()]
            with _tracker_errors("mlflow", self.errors):
                self.client.log_batch(self.run_id, metrics=rows)

    def on_media(self, step: int, media: list[Media]) -> None:
        """Pictures as MLflow images (a step slider per tag), every file as an artifact
        under samples/step_<N>/."""
        with _tracker_errors("mlflow", self.errors):
            for item in media:
                picture = item.picture()
                if picture is not None:
                    key = mlflow_name(item.tag)
                    self.client.log_image(self.run_id, picture, key=key, step=step)
                if item.path is not None:
                    where = f"samples/step_{step}"
                    self.client.log_artifact(self.run_id, str(item.path), where)

    def on_fit_end(self) -> None:
        if getattr(self, "run_id", None) is not None and hasattr(self, "client"):
            with _tracker_errors("mlflow", self.errors):
                status = "FAILED" if _failing() else "FINISHED"
                self.client.set_terminated(self.run_id, status=status)
