"""Held-out loss: validation during training and `mmfm eval`.

An `Evaluator` runs the training step's forward and loss (`StepLoss` through the same step
runner, whole model or pipeline, with no backward) over held-out shards packed exactly like
the training data, at whatever parallel layout the model is in. Every evaluation reads a
fresh set of streams from the start, each source at most once, so it sees the same rows
every time and never touches the training stream's state. Sums (weighted and unweighted
cross-entropy and targets per modality, text bytes) are reduced over ranks like a training
step's and divided at the end, so the result is normalised by the global target counts at
any layout.

What it reports: `loss` (val/loss) is the held-out cross-entropy normalised as the training
loss is (`loss.normalize`, `loss.modality_weights`, data.loss_weights), over the whole
evaluation instead of one step; the z-loss is a regulariser of training and is left out, as
it is from the training metric `loss` (which reports it apart as loss/z). Per-modality losses
and bits per byte are unweighted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmfm.config.schema import Config, LossConfig, SourceConfig
from mmfm.core.types import MODALITY_NAMES, Batch, Modality
from mmfm.data.demo import TEXT_OFFSET
from mmfm.data.loader import micro_batches, rank_streams, source_specs, stream_settings
from mmfm.data.packing import Exhausted, RowBuilder
from mmfm.data.skips import SKIP_REASONS
from mmfm.data.stream import VirtualStream
from mmfm.parallel.env import ParallelEnv
from mmfm.tokenization.text import TextTokenizer
from mmfm.tokenization.vocab import Vocab
from mmfm.train.callbacks import Callback
from mmfm.train.checkpoint import Checkpointing
from mmfm.train.loss import StepLoss, count_modality_targets, modality_scales, split_totals
from mmfm.train.step_runner import StepRunner

log = logging.getLogger("mmfm")


def text_byte_table(vocab: Vocab | None, vocab_size: int) -> torch.Tensor | None:
    """UTF-8 bytes each id decodes to as text (0 for specials and codes), or None when the
    text tokenizer is unknown. No vocabulary means the demo's layout (one id per byte)."""
    table = torch.zeros(vocab_size, dtype=torch.float32)
    if vocab is None:
        table[TEXT_OFFSET : TEXT_OFFSET + 256] = 1
        return table
    if vocab.text_kind == "bytes":
        table[: vocab.text_size] = 1
        return table
    if vocab.text_kind != "sentencepiece" or vocab.text_model is None:
        return None

    sp = TextTokenizer(vocab.text_model).sp
    for i in range(vocab.text_size):
        if sp.is_byte(i):
            table[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            table[i] = len(sp.decode([i]).encode())
    return table


@dataclass
class EvalResult:
    """Sums over every held-out target of one evaluation, and what follows from them."""

    steps: int = 0
    rows: int = 0
    """Packed rows of held-out documents (not counting the padding rows of streams that ran
    out first)."""
    weighted_ce: float = 0.0
    """Sum of loss weight x cross-entropy (nats), as in the training loss."""
    weighted_targets: float = 0.0
    """Targets with a loss weight > 0 (the training loss's denominator)."""
    modality_weighted_ce: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(MODALITY_NAMES, 0.0)
    )
    """`weighted_ce` per target modality."""
    modality_weighted_targets: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(MODALITY_NAMES, 0.0)
    )
    """`weighted_targets` per target modality."""
    loss_config: LossConfig = field(default_factory=LossConfig)
    """How `loss` is normalised: the training run's `loss` section."""
    ce: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODALITY_NAMES, 0.0))
    """Unweighted cross-entropy sum per target modality, over its targets with weight > 0
    (a prompt's labels are no targets)."""
    targets: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODALITY_NAMES, 0.0))
    """Targets with weight > 0 per target modality."""
    text_bytes: float | None = 0.0
    """UTF-8 bytes of the text targets with weight > 0 (None: the text tokenizer is unknown)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Held-out documents skipped as bad, by reason (logged by the reader)."""

    @property
    def loss(self) -> float:
        """Weighted and normalised like the training loss: with loss.normalize=tokens,
        sum(weight x ce) / targets with weight > 0; with modality_mean, the weighted mean of
        each modality's sum(weight x ce) / its targets with weight > 0."""
        if self.loss_config.normalize == "tokens":
            return self.weighted_ce / max(self.weighted_targets, 1.0)
        counts, sums = (
            torch.tensor([d[n] for n in MODALITY_NAMES], dtype=torch.float64)
            for d in (self.modality_weighted_targets, self.modality_weighted_ce)
        )
        return float((modality_scales(counts, self.loss_config) * sums).sum())

    @property
    def loss_unweighted(self) -> float:
        return sum(self.ce.values()) / max(sum(self.targets.values()), 1.0)

    def modality_loss(self, name: str) -> float | None:
        return self.ce[name] / self.targets[name] if self.targets[name] else None

    @property
    def bits_per_byte(self) -> float | None:
        if not self.text_bytes:
            return None
        return self.ce["text"] / math.log(2) / self.text_bytes

    def metrics(self, prefix: str = "val/") -> dict[str, float]:
        """Scalars for metrics.jsonl / TensorBoard: loss, loss/<modality>, bits_per_byte, and
        skipped/<reason> when held-out documents were bad."""
        out = {f"{prefix}loss": self.loss}
        for name in MODALITY_NAMES:
            value = self.modality_loss(name)
            if value is not None:
                out[f"{prefix}loss/{name}"] = value
        if self.bits_per_byte is not None:
            out[f"{prefix}bits_per_byte"] = self.bits_per_byte
        for reason, n in self.skipped.items():
            out[f"{prefix}skipped/{reason}"] = float(n)
        return out

    def summary(self) -> dict:
        """Everything, JSON-able (the `mmfm eval --json` file)."""
        modalities = {}
        for name in MODALITY_NAMES:
            loss = self.modality_loss(name)
            if loss is None:
                continue
            row = {"targets": int(self.targets[name]), "loss": loss, "perplexity": _ppl(loss)}
            if name == "text":
                row["bytes"] = None if self.text_bytes is None else int(self.text_bytes)
                row["bits_per_byte"] = self.bits_per_byte
            modalities[name] = row
        return {
            "loss": self.loss,
            "loss_normalize": self.loss_config.normalize,
            "perplexity": _ppl(self.loss),
            "loss_unweighted": self.loss_unweighted,
            "perplexity_unweighted": _ppl(self.loss_unweighted),
            "targets": int(sum(self.targets.values())),
            "weighted_targets": int(self.weighted_targets),
            "rows": self.rows,
            "steps": self.steps,
            "skipped": dict(self.skipped),
            "modalities": modalities,
        }

    def table(self) -> str:
        """A short terminal table: one line per modality, then the totals."""
        lines = [f"{'modality':<18}{'targets':>10}{'loss':>9}{'ppl':>10}{'bits/byte':>11}"]
        for name, row in self.summary()["modalities"].items():
            bpb = row.get("bits_per_byte")
            bpb_text = f"{bpb:>11.4f}" if bpb is not None else f"{'':>11}"
            lines.append(
                f"{name:<18}{row['targets']:>10,}{row['loss']:>9.4f}{row['perplexity']:>10.3f}"
                + bpb_text
            )
        total = int(sum(self.targets.values()))
        for label, loss, count in (
            ("all, unweighted", self.loss_unweighted, total),
            ("all, as trained", self.loss, int(self.weighted_targets)),
        ):
            lines.append(f"{label:<18}{count:>10,}{loss:>9.4f}{_ppl(loss):>10.3f}")
        return "\n".join(lines)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class HeldOutRows:
    """This rank's share of the held-out global batches, read from the start each pass.

    The rows come from one virtual stream per row of the global batch, as in training, with
    every source capped at one epoch; a stream that has run out contributes padding rows
    (no targets) until every stream on every rank has, which ends the pass.
    """

    def __init__(self, cfg: Config, sources: list[SourceConfig], env: ParallelEnv):
        held_out = [dataclasses.replace(s, max_epochs=1) for s in sources]
        # Decomposed training rows vary in length; held-out loss is read on full packed rows.
        packing = "best_fit" if cfg.data.packing == "decompose" else cfg.data.packing
        data = dataclasses.replace(cfg.data, paths=[], sources=held_out, packing=packing)
        held_cfg = dataclasses.replace(cfg, data=data)
        self.sources, self.settings = source_specs(held_cfg), stream_settings(held_cfg)
        self.stream_ids = rank_streams(cfg.train.global_batch_size, env.dp_rank, env.dims.dp)
        self.micro_batch_size = cfg.train.micro_batch_size
        self.cp_rank, self.cp_size = env.coordinate("cp"), env.dims.cp
        self.env = env

    def describe(self) -> str:
        return ", ".join(f"{s.name} ({len(s.urls)} shards)" for s in self.sources)

    def batches(self, max_steps: int, skipped: dict[str, int]) -> Iterator[tuple[list[Batch], int]]:
        """(micro-batches, global rows read) per global batch, at most `max_steps` (0: all);
        skips counted by the readers are added to `skipped`."""
        streams = [VirtualStream(i, self.sources, self.settings) for i in self.stream_ids]
        live = [True] * len(streams)
        empty = RowBuilder(self.settings.seq_len, self.settings.weights).finish()
        step = 0
        while not max_steps or step < max_steps:
            rows = []
            for i, stream in enumerate(streams):
                if live[i]:
                    try:
                        rows.append(stream.next_row()[0])
                        continue
                    except Exhausted:
                        live[i] = False
                rows.append(empty)
            # Ranks that differ only in cp, tp or pp read the same streams: the sum over
            # data-parallel ranks is the same number everywhere.
            count = torch.tensor([float(sum(live))], device=self.env.device)
            global_rows = int(self.env.all_reduce(count, "dp").item())
            if not global_rows:
                break
            step += 1
            yield (
                micro_batches(rows, self.micro_batch_size, self.cp_size, self.cp_rank),
                global_rows,
            )
        for stream in streams:
            for reason, n in stream.skips.counts.items():
                skipped[reason] = skipped.get(reason, 0) + n


class Evaluator:
    """The held-out loss of the model as it is now (forward only, any parallel layout)."""

    def __init__(
        self,
        cfg: Config,
        env: ParallelEnv,
        runner: StepRunner,
        sources: list[SourceConfig],
        max_steps: int,
        byte_table: torch.Tensor | None,
    ):
        self.env, self.max_steps, self.loss_config = env, max_steps, cfg.loss
        self.model, self.runner = runner.model, runner
        self.data = HeldOutRows(cfg, sources, env)
        self.byte_table = byte_table  # on the host, like the batches the reader makes

    def run(self, progress: bool = False) -> EvalResult:
        from tqdm import tqdm

        result = EvalResult(
            text_bytes=None if self.byte_table is None else 0.0, loss_config=self.loss_config
        )
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(
            total=self.max_steps or None,
            desc="eval",
            unit="batch",
            disable=not (progress and self.env.is_main),
            dynamic_ncols=True,
        )
        try:
            for micro_batches, rows in self.data.batches(self.max_steps, result.skipped):
                self._accumulate(micro_batches, result)
                result.steps += 1
                result.rows += rows
                bar.update(1)
                bar.set_postfix_str(f"loss {result.loss:.4f}", refresh=False)
        finally:
            bar.close()
            self.model.train(was_training)
        skips = torch.tensor([float(result.skipped.get(r, 0)) for r in SKIP_REASONS])
        skips = self.env.all_reduce(skips.to(self.env.device), "dp").tolist()
        result.skipped = {r: int(n) for r, n in zip(SKIP_REASONS, skips, strict=True) if n}
        return result

    def _accumulate(self, micro_batches: list[Batch], result: EvalResult) -> None:
        device = self.env.device
        # A loss normalised by 1: the raw weighted sum, divided by the global count at the end.
        step_loss = StepLoss(torch.tensor(1.0, device=device))
        self.runner.run(micro_batches, step_loss, forward_only=True)
        weighted_ce, _, sums = split_totals(
            self.env.all_reduce(step_loss.totals(), "dp_cp", "pp").tolist()
        )
        counts = torch.cat(
            [count_modality_targets(micro_batches), self._text_bytes(micro_batches)[None]]
        )
        counts = self.env.all_reduce(counts.to(device), "dp_cp").tolist()
        result.weighted_ce += weighted_ce
        for name, (ce, targets, weighted) in sums.items():
            result.ce[name] += ce
            result.targets[name] += targets
            result.modality_weighted_ce[name] += weighted
        for name, weighted_targets in zip(MODALITY_NAMES, counts[:-1], strict=True):
            result.modality_weighted_targets[name] += weighted_targets
        result.weighted_targets += sum(counts[:-1])
        if result.text_bytes is not None:
            result.text_bytes += counts[-1]

    def _text_bytes(self, micro_batches: list[Batch]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32)
        if self.byte_table is None:
            return total
        for b in micro_batches:
            text = (b.loss_weights > 0) & (b.modality == Modality.TEXT)  # as `modality_sums`
            total += self.byte_table[b.labels[text]].sum()
        return total


def build_evaluator(
    cfg: Config, env: ParallelEnv, runner: StepRunner, vocab: Vocab | None
) -> Evaluator | None:
    """The validation of `cfg.eval` (None when it names no held-out data)."""
    if not cfg.eval.enabled:
        return None
    sources = cfg.eval.source_list()
    table = text_byte_table(vocab, cfg.model.vocab_size)
    return Evaluator(cfg, env, runner, sources, cfg.eval.steps, table)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links cost no space; checkpoint files are never rewritten in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class BestCheckpoint:
    """`<checkpoints>/best`: the checkpoint with the lowest val/loss so far (eval.keep_best).

    A copy made of hard links of a saved `step_<N>` (so pruning that one does not remove
    it), replaced atomically; its `best.json` holds the step and val/loss, which a resumed
    run reads to go on comparing against it.
    """

    def __init__(self, root: str | Path, env: ParallelEnv):
        self.path, self.env = Path(root) / "best", env
        info = self.path / "best.json"
        self.loss = json.loads(info.read_text())["val/loss"] if info.is_file() else math.inf

    def improves(self, loss: float) -> bool:
        return loss < self.loss

    def keep(self, checkpoint: Path, step: int, loss: float) -> None:
        self.loss = loss
        if self.env.is_main:
            tmp, old = self.path.with_name(".best.tmp"), self.path.with_name(".best.old")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint, tmp, copy_function=_link_or_copy)
            (tmp / "best.json").write_text(json.dumps({"step": step, "val/loss": loss}))
            if self.path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
            log.info("step %d: val/loss %.4f is the best so far: kept as %s", step, loss, self.path)
        self.env.barrier()


class Validation(Callback):
    """Every `every` steps and at the last: the held-out loss (val/*) added to the step's
    metrics, before the reporters see them; with `checkpointing`, the best checkpoint kept
    (eval.keep_best) in `<checkpoints>/best`."""

    def __init__(
        self,
        evaluator: Evaluator,
        every: int,
        checkpointing: Checkpointing | None = None,
        root: Path | None = None,
    ):
        self.evaluator, self.every = evaluator, every
        self.checkpointing, self.root = checkpointing, root

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        self.total = total_steps
        # Read after a resume: a resumed run goes on comparing against its best.
        keep = self.checkpointing is not None and self.root is not None
        self.best = BestCheckpoint(self.root, self.evaluator.env) if keep else None

    def wants_metrics(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self.wants_metrics(step):
            metrics.update(self.validate())

    def validate(self) -> dict[str, float]:
        """val/* metrics of the held-out data now; the best checkpoint kept if it is."""
        start = time.perf_counter()
        result = self.evaluator.run()
        metrics = result.metrics("val/")
        metrics["val/seconds"] = time.perf_counter() - start
        if self.best is not None and self.best.improves(result.loss):
            assert self.checkpointing is not None
            self.best.keep(self.checkpointing.save_once(), self.trainer.step, result.loss)
        return metrics
