"""`mmfm eval CKPT DATA...`: the held-out loss of a checkpoint, at any parallel layout;
`mmfm eval CKPT --task NAME`: task metrics of its generations (mmfm/tasks/), in one process.

The checkpoint's own config rebuilds the model and the packing (seq_len, loss weights,
batch size); `parallel.*` overrides choose the layout to run it at (one process unless
given), independently of the layout that trained it. DATA are prepared shards (any
`data.paths` syntax) or raw `.txt` files, tokenized with the checkpoint's vocabulary: one
document per paragraph (blank-line separated), framed like `mmfm prepare` frames text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mmfm.config import Config, ConfigError, load_structured
from mmfm.config.layout import resolve_layout
from mmfm.config.schema import TASKS, EvalConfig, ParallelConfig, SourceConfig, TaskConfig
from mmfm.core.errors import DataError, InputNotFound
from mmfm.core.types import Document, Modality
from mmfm.data.demo import SPECIAL, TEXT_OFFSET
from mmfm.data.shards import write_shard
from mmfm.parallel.env import ParallelEnv, process_ranks
from mmfm.parallel.parallelize import parallelize
from mmfm.tasks.run import run_task, task_layout, task_tokenizers
from mmfm.tokenization.text import text_of_vocab
from mmfm.tokenization.vocab import VOCAB_FILE, Vocab
from mmfm.train.checkpoint import (
    STATE_FILE,
    Checkpointer,
    CheckpointError,
    checkpoint_config,
    load_checkpoint_model,
    require_checkpoint,
)
from mmfm.train.command import check_sources_vocab
from mmfm.train.evaluate import EvalResult, Evaluator, text_byte_table
from mmfm.train.stateful import ModelState
from mmfm.train.step_runner import build_step_runner
from mmfm.train.train_state import saved_step

log = logging.getLogger("mmfm")


def eval_config(checkpoint: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The checkpoint's config with `overrides`; the layout comes only from the overrides."""
    path = Path(checkpoint)
    layout = [o.removeprefix("parallel.") for o in overrides if o.startswith("parallel.")]
    rest = [o for o in overrides if not o.startswith("parallel.")]
    cfg = checkpoint_config(path, rest)  # checked against the weights before the model is built
    parallel = load_structured(ParallelConfig, None, layout)
    try:
        return dataclasses.replace(cfg, parallel=parallel)
    except ConfigError as e:
        raise ConfigError(f"{e} (mmfm eval: override train.* to fit the layout)") from None


def _checkpoint_vocab(checkpoint: Path) -> Vocab | None:
    path = checkpoint / VOCAB_FILE
    return Vocab.load(path) if path.is_file() else None


def text_documents(path: Path, vocab: Vocab | None) -> list[Document]:
    """A raw text file as documents, one per paragraph: <bos> text <eos>."""
    if vocab is None:  # the demo's layout: one id per byte
        bos, eos = SPECIAL["<bos>"], SPECIAL["<eos>"]

        def encode(s: str) -> list[int]:
            return [TEXT_OFFSET + b for b in s.encode()]
    else:
        if vocab.text_model is None:
            raise CheckpointError(
                f"the checkpoint's {VOCAB_FILE} holds no text model: prepare {path} into "
                "shards with mmfm prepare instead"
            )
        text = text_of_vocab(vocab)
        bos, eos, encode = text.bos_id, text.eos_id, text.encode
    try:
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    docs = []
    for i, text in enumerate(p for p in paragraphs if p):
        tokens = np.array([bos, *encode(text), eos], dtype=np.int32)
        modality = np.full(len(tokens), Modality.TEXT, dtype=np.uint8)
        docs.append(Document(tokens, modality, f"{path.stem}-{i:06d}", str(path)))
    if not docs:
        raise DataError(f"{path} holds no text to evaluate on")
    return docs


def _sources(data: Sequence[str], vocab: Vocab | None, scratch: Path) -> list[SourceConfig]:
    """Shard paths as one source; every .txt file tokenized into a shard of its own."""
    paths = []
    for item in data:
        if item.endswith(".txt"):
            shard = scratch / f"{Path(item).stem}-{len(paths):03d}.tar"
            write_shard(shard, text_documents(Path(item), vocab))
            item = str(shard)
        paths.append(item)
    return EvalConfig(paths=paths).source_list()


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: Sequence[str],
    overrides: Sequence[str] = (),
    steps: int = 0,
    json_path: str | Path | None = None,
    progress: bool = True,
    cfg: Config | None = None,
) -> EvalResult:
    """Evaluate `checkpoint` on `data` (`steps` global batches, 0: a whole pass); the main
    rank prints the table and writes `json_path`. `cfg`: its `eval_config` with `overrides`,
    when the caller has loaded it already."""
    checkpoint = Path(checkpoint)
    cfg = eval_config(checkpoint, overrides) if cfg is None else cfg
    cfg = resolve_layout(cfg, process_ranks(os.environ)[1])
    check_json_path(json_path)  # before the model is built
    for item in data:
        if item.endswith(".txt") and not Path(item).is_file():
            raise InputNotFound(f"{item}: no such file (held-out text for mmfm eval)")
    _check_data_vocab(checkpoint, data)
    require_checkpoint(checkpoint, model_only=True)  # before a model is made for them
    step = _saved_step(checkpoint)
    env = ParallelEnv.from_config(cfg.parallel, cfg.train.device)
    try:
        torch.manual_seed(cfg.train.seed)
        runner = build_step_runner(cfg, env, parallelize(cfg, env))
        model = ModelState(runner.model)
        tensors = model.state_dict()
        Checkpointer.load_model(checkpoint, tensors["model"])
        model.load_state_dict(tensors)
        vocab = _checkpoint_vocab(checkpoint)
        table = text_byte_table(vocab, cfg.model.vocab_size)
        with tempfile.TemporaryDirectory(prefix="mmfm-eval-") as scratch:
            sources = _sources(data, vocab, Path(scratch))
            evaluator = Evaluator(cfg, env, runner, sources, steps, table)
            result = evaluator.run(progress=progress)
        if env.is_main:
            _report(checkpoint, step, data, cfg, result, json_path)
        return result
    finally:
        env.close()


def task_configs(cfg: Config, names: Sequence[str]) -> list[TaskConfig]:
    """The `eval.tasks` entries `--task NAME` names, in the order named."""
    have = {task.name: task for task in cfg.eval.tasks}
    for name in names:
        if name not in TASKS:
            raise ConfigError(f"--task {name!r} is not a task ({', '.join(TASKS)})")
        if name not in have:
            raise ConfigError(
                f"--task {name}: the config has no eval.tasks entry named {name} (it has "
                f"{', '.join(have) or 'none'}): add one, e.g. eval.tasks='[{{name: {name}, "
                "paths: [...], tokenizers: tokenizers/multimodal.yaml}]'"
            )
    return [have[name] for name in dict.fromkeys(names)]


def evaluate_tasks(
    checkpoint: str | Path,
    names: Sequence[str],
    overrides: Sequence[str] = (),
    json_path: str | Path = "eval.json",
    progress: bool = True,
) -> dict[str, float]:
    """Score `checkpoint`'s generations on the `eval.tasks` named (its config with
    `overrides`), in one process on train.device; print the metrics and write them to
    `json_path`."""
    checkpoint = Path(checkpoint)
    cfg = eval_config(checkpoint, overrides)
    tasks = task_configs(cfg, names)
    check_json_path(json_path)
    vocab = _checkpoint_vocab(checkpoint)
    sets = [task_tokenizers(task, vocab) for task in tasks]  # before the model is loaded
    step = _saved_step(checkpoint)
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_checkpoint_model(checkpoint, device)
    metrics: dict[str, float] = {}
    for task, tokenizers in zip(tasks, sets, strict=True):
        metrics |= run_task(task, model, task_layout(tokenizers), tokenizers, progress)
    for name, value in metrics.items():
        print(f"{name:<40} {value:.4f}")
    summary = {"checkpoint": str(checkpoint), "step": step, "tasks": list(dict.fromkeys(names))}
    Path(json_path).write_text(json.dumps({**summary, "metrics": metrics}, indent=1) + "\n")
    print(f"{json_path}: {len(metrics)} metrics", file=sys.stderr)
    return metrics


def check_json_path(path: str | Path | None) -> None:
    """Refuse a `--json` file that cannot be written, before anything is evaluated."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--json {path} is a directory: name a file to write")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(
            f"--json {path}: cannot write it ({e.strerror}); name a file in a writable folder"
        ) from None
    if not existed:
        path.unlink()


def _check_data_vocab(checkpoint: Path, data: Sequence[str]) -> None:
    """Held-out shards must be made with the checkpoint's vocabulary, checked as training
    checks its sources (raw .txt files are tokenized here with the checkpoint's own)."""
    vocab_file = checkpoint / VOCAB_FILE
    reference = (Vocab.load(vocab_file).fingerprint, vocab_file) if vocab_file.is_file() else None
    shards = [item for item in data if not item.endswith(".txt")]
    held_out = EvalConfig(paths=shards).source_list() if shards else []
    for note in check_sources_vocab(held_out, reference) if held_out else []:
        log.info(note)


def _saved_step(checkpoint: Path) -> int | None:
    """The step of the checkpoint's `train_state.json` (checked), None without one."""
    if not (checkpoint / STATE_FILE).is_file():
        return None
    return saved_step(checkpoint / STATE_FILE, Checkpointer.load_state(checkpoint))


def _report(
    checkpoint: Path,
    step: int | None,
    data: Sequence[str],
    cfg: Config,
    result: EvalResult,
    json_path,
) -> None:
    print(
        f"{checkpoint} (step {step}) on {', '.join(data)}: {result.rows} rows of "
        f"{cfg.data.seq_len} tokens in {result.steps} batches",
        file=sys.stderr,
    )
    if result.skipped:
        print(f"skipped bad documents: {result.skipped}", file=sys.stderr)
    if result.text_bytes is None:
        print("bits per byte: the text tokenizer is unknown (no text model)", file=sys.stderr)
    print(result.table())
    if json_path is not None:
        summary = {"checkpoint": str(checkpoint), "step": step, "data": list(data)}
        summary["seq_len"] = cfg.data.seq_len
        summary["loss_weights"] = dict(cfg.data.loss_weights)
        Path(json_path).write_text(json.dumps({**summary, **result.summary()}, indent=1) + "\n")
