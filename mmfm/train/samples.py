"""Samples during training: what the model answers to `eval.samples`, every
`eval.samples_every` steps and after the last one.

Every rank takes part in gathering the weights (DCP's full state dict: tensor-parallel and
FSDP2 shards become whole tensors on rank 0, in CPU memory); rank 0 loads them into a plain
`Transformer` of the config, answers each prompt with `mmfm.decoding` (KV cache, span
grammar, the sample's own seeded generator, under `fork_rng`: the training RNG, data stream
and model are never touched, so a resumed run stays exact), decodes every answer span to
`<run_dir>/samples/step_<N>/<k>-<modality>.<ext>`, appends a line per sample to
`<run_dir>/samples/samples.jsonl` and hands the spans to the reporters as `Media`
(TensorBoard, W&B, MLflow). Prompts are encoded and checked when the run is built, on every
rank, so that a bad file or a too-long prompt stops the run before its first step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mmfm.config import Config, ConfigError
from mmfm.config.schema import SampleConfig
from mmfm.core.errors import LaunchError
from mmfm.decoding.engine import check_length, generate
from mmfm.decoding.layout import Layout, demo_layout
from mmfm.decoding.outputs import Span, SpanWriter, answer_spans, visual_decoders
from mmfm.decoding.prompts import (
    Prompt,
    check_prompt,
    check_recipe_vocab,
    encode_prompts,
    needs_tokenizers,
)
from mmfm.decoding.sampling import Sampling
from mmfm.model import build_model
from mmfm.parallel.env import ParallelEnv
from mmfm.tokenization.vocab import Vocab
from mmfm.train.callbacks import Callback, Media

log = logging.getLogger("mmfm")

SAMPLES_DIR = "samples"
SAMPLES_FILE = "samples.jsonl"
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Plan:
    """What rank 0 samples: the prompts' ids and settings, and how answers are decoded."""

    prompts: list[Prompt]
    ids: list[list[int]]
    sampling: list[Sampling]
    layout: Layout
    visual: object | None
    """`VisualTokenizers` of eval.samples_tokenizers (None: the demo's pictures only)."""


def build_samples(cfg: Config, env: ParallelEnv, model: nn.Module, vocab: Vocab | None):
    """The `Samples` callback of `cfg.eval` (None when samples are off), its prompts encoded
    and checked on every rank (one rank alone failing would leave the others waiting)."""
    if not cfg.eval.sampling:
        return None
    plan = _plan(cfg, vocab)
    log.info(
        "samples: %d prompt(s) every %d steps -> %s/%s/step_<N>/",
        len(plan.prompts),
        cfg.eval.samples_every,
        cfg.train.run_dir,
        SAMPLES_DIR,
    )
    return Samples(cfg, env, model, plan if env.is_main else None)


def _plan(cfg: Config, vocab: Vocab | None) -> Plan:
    samples, recipe = cfg.eval.samples, cfg.eval.samples_tokenizers
    prompts = [_prompt(k, s) for k, s in enumerate(samples)]
    for prompt in prompts:
        check_prompt(prompt)
    needs_tokenizers(prompts, recipe)
    heads = encode_prompts(prompts, recipe)
    if any(heads):
        check_recipe_vocab(recipe, "eval.samples_tokenizers", vocab, f"data.vocab={cfg.data.vocab}")
    visual, sizes, num_codes, framing = visual_decoders(recipe, vocab)
    layout = _layout(cfg, vocab, sizes, num_codes, framing)
    ids = [_ids(layout, p, head, sizes) for p, head in zip(prompts, heads, strict=True)]
    sampling = [_sampling(k, s) for k, s in enumerate(samples)]
    for k, (prompt_ids, settings) in enumerate(zip(ids, sampling, strict=True)):
        limit = cfg.model.max_seq_len
        check_length(
            len(prompt_ids), settings.max_new_tokens, limit, f"eval.samples[{k}].max_new_tokens"
        )
    return Plan(prompts, ids, sampling, layout, visual)


def _ids(layout: Layout, prompt: Prompt, head: list[int] | None, sizes: dict) -> list[int]:
    """The prompt's ids, ending with the opening delimiter of its answer's modality, which
    the vocabulary must have and (for a picture, outside the demo) a visual tokenizer
    decode."""
    picture = prompt.modality in ("image", "mask", "video")
    if picture and not layout.demo and prompt.modality not in sizes:
        raise ConfigError(
            f"{prompt.origin}: a {prompt.modality} answer is decoded by the "
            f"{prompt.modality}_tokenizer of eval.samples_tokenizers: set it to the tokenizer "
            "recipe the data was prepared with"
        )
    try:
        return (
            layout.ask(head, prompt.modality)
            if head
            else layout.prompt(prompt.text, prompt.modality)
        )
    except ValueError as e:  # VocabError: the vocabulary has no spans of that modality
        raise ConfigError(f"{prompt.origin}: {e}") from None


def _prompt(k: int, sample: SampleConfig) -> Prompt:
    return Prompt(sample.prompt, sample.files(), sample.modality, f"eval.samples[{k}]")


def _sampling(k: int, s: SampleConfig) -> Sampling:
    try:
        return Sampling(s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.cfg_scale)
    except ValueError as e:
        raise ConfigError(f"eval.samples[{k}]: {e}") from None


def _layout(cfg: Config, vocab: Vocab | None, sizes: dict, num_codes: dict, framing) -> Layout:
    """The ids of prompts and answers: the vocabulary of data.vocab, or the demo corpus's."""
    try:
        if vocab is not None:
            return Layout.from_vocab(vocab, sizes, num_codes, framing)
    except ValueError as e:  # VocabError: a vocabulary without its text model
        raise ConfigError(f"eval.samples: data.vocab={cfg.data.vocab}: {e}") from None
    if list(cfg.data.paths) == ["builtin:demo"] and not cfg.data.sources:
        return demo_layout()
    raise ConfigError(
        "eval.samples needs data.vocab (the vocab.json of the tokenizers the data was "
        "prepared with) to encode its prompts and decode the answers"
    )


class Samples(Callback):
    """Every `eval.samples_every` steps and at the last: the samples of `plan` written and
    handed to the reporters. On every rank (the gather is collective); `plan` is rank 0's."""

    def __init__(self, cfg: Config, env: ParallelEnv, model: nn.Module, plan: Plan | None):
        self.cfg, self.env, self.model, self.plan = cfg, env, model, plan
        self.every = cfg.eval.samples_every
        self.root = Path(cfg.train.run_dir) / SAMPLES_DIR

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        self.total = total_steps
        if self.plan is not None:
            _drop_after(self.root / SAMPLES_FILE, start_step)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every and step != self.total:
            return
        start = time.perf_counter()
        state = self._gather()
        if self.plan is None:
            return
        try:
            media = self.sample(step, state)
        except OSError as e:  # a full disk, a quota, a file system gone
            raise LaunchError(
                f"cannot write the samples of step {step} under {self.root} "
                f"({e.strerror or e}): free space there, then resume from the last checkpoint "
                "(train.resume=auto)"
            ) from None
        for callback in self.trainer.callbacks:
            callback.on_media(step, media)
        seconds = time.perf_counter() - start
        log.info("samples of step %d: %d span(s) in %.1f s", step, len(media), seconds)

    def _gather(self) -> dict[str, torch.Tensor]:
        return gather_on_rank0(self.model, self.env)

    def sample(self, step: int, state: dict[str, torch.Tensor]) -> list[Media]:
        """The answers of a model with weights `state`, written under step_<step>/."""
        plan, device = self.plan, self.env.device
        assert plan is not None
        model = one_process_copy(self.cfg, state, device)
        with untouched_rng(device):
            answers = [
                generate(model, [ids], sampling, plan.layout)[0]
                for ids, sampling in zip(plan.ids, plan.sampling, strict=True)
            ]
        del model
        writer = SpanWriter(plan.layout, self.root / f"step_{step}", plan.visual)
        media, lines = [], []
        for k, (prompt, ids, new) in enumerate(zip(plan.prompts, plan.ids, answers, strict=True)):
            spans = answer_spans(ids, new, plan.layout)
            for j, span in enumerate(spans):
                stem = f"{k}-{span.modality}" if j == 0 else f"{k}-{j}-{span.modality}"
                writer.write(span, stem)
                media.append(self._media(stem, prompt, span))
            lines.append(self._line(step, k, prompt, new, spans))
        with open(self.root / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        return media

    def _media(self, stem: str, prompt: Prompt, span: Span) -> Media:
        path = None if span.path is None else Path(span.path)
        text = span.note or ""
        if path is not None and path.suffix in (".txt", ".fasta", ".svg"):
            text = path.read_text(encoding="utf-8") + (f"\n({span.note})" if span.note else "")
        return Media(f"samples/{stem}", prompt.text, path, text)

    def _line(self, step: int, k: int, prompt: Prompt, new: list[int], spans) -> dict:
        settings = self.cfg.eval.samples[k]
        files = {"files": dict(prompt.files)} if prompt.files else {}
        rows = [
            {
                "modality": s.modality,
                "path": None if s.path is None else str(Path(s.path).relative_to(self.root)),
                "note": s.note,
                "closed": s.closed,
                "length": len(s.body),
            }
            for s in spans
        ]
        head = {"step": step, "index": k, "prompt": prompt.text, **files}
        return (
            head
            | {"modality": prompt.modality, "seed": settings.seed, "new_ids": new}
            | {"spans": rows}
        )


def gather_on_rank0(model: nn.Module, env: ParallelEnv) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0, in CPU memory ({} on the other ranks); every rank
    must call it (tensor-parallel and FSDP2 shards are gathered collectively)."""
    with torch.no_grad():
        if env.world_size == 1:  # the names of a plain model, as checkpoints have
            return get_model_state_dict(model)
        return get_model_state_dict(model, options=_FULL_ON_RANK0)


def one_process_copy(cfg: Config, state: dict[str, torch.Tensor], device) -> nn.Module:
    """A plain `Transformer` of `cfg.model` on `device` with the gathered weights `state`, in
    eval mode: the training model (sharded, compiled, wrapped) is never used to generate."""
    model = build_model(cfg.model, device)
    model.to_empty(device=device)
    model.load_state_dict(state)
    return model.eval()


def untouched_rng(device: torch.device):
    """The training RNG state (CPU, and the device's on CUDA) restored on exit: what samples
    and task scores draw never shifts the run, so a resumed run stays exact."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _drop_after(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step`: a resumed run samples the later ones again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8")
