"""`run_task`: a task's examples generated in batches by a model in memory, and scored
(`PreparedTask` reads and tokenizes the examples once for many runs).

Each example's prompt is tokenized as training tokenized the prompt of that task
(`Tokenizers.prompt`), followed by `<sep>` before a text answer or by the answer's opening
delimiter (`<mask>`, `<svg>`, `<img>`), as `<s> prompt [<sep>] response </s>` rows are
laid out; the answer is generated under the span grammar (a mask span is 1 to
tokens_per_item mask codes, an image span exactly its codes, ...), with the task's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn
from tqdm import tqdm

from mmfm.config.schema import TaskConfig
from mmfm.core.errors import ConfigError
from mmfm.decoding.engine import check_length, generate
from mmfm.decoding.layout import Layout, visual_sizes
from mmfm.decoding.outputs import Span, answer_spans
from mmfm.decoding.sampling import Sampling
from mmfm.tasks.examples import ANSWERS, Example, read_examples
from mmfm.tasks.scoring import SCORERS
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.vocab import Vocab

TEXT_SLACK = 8
"""Tokens beyond the longest target a text or SVG answer may take by default."""


def task_tokenizers(task: TaskConfig, vocab: Vocab | None) -> Tokenizers:
    """The task's tokenizer set, whose vocabulary must be the model's (`vocab`)."""
    tokenizers = Tokenizers.load(load_recipe(task.tokenizers))
    if vocab is None or vocab.fingerprint != tokenizers.vocab.fingerprint:
        mine = "no vocab.json" if vocab is None else f"vocabulary {vocab.fingerprint}"
        raise ConfigError(
            f"eval.tasks[{task.name}].tokenizers {task.tokenizers} has vocabulary "
            f"{tokenizers.vocab.fingerprint}, the model {mine}: give the tokenizer recipe its "
            "data was prepared with"
        )
    return tokenizers


def task_layout(tokenizers: Tokenizers) -> Layout:
    """The id layout of the tokenizer set's vocabulary, with its visual tokenizers' sizes."""
    return Layout.from_vocab(tokenizers.vocab, *visual_sizes(tokenizers.recipe, tokenizers.visual))


def run_task(
    task: TaskConfig,
    model: nn.Module,
    layout: Layout,
    tokenizers: Tokenizers,
    progress: bool = False,
) -> dict[str, float]:
    """The metrics `task/<name>/<metric>` of `model` (one process, any device; left in the
    train / eval mode it came in) on the task's examples."""
    return PreparedTask(task, tokenizers, layout).run(model, progress)


class PreparedTask:
    """A task's examples read and their prompts tokenized once, to score a model as often as
    wanted (a training loop scores its model every so many steps)."""

    def __init__(self, task: TaskConfig, tokenizers: Tokenizers, layout: Layout):
        self.task, self.tokenizers, self.layout = task, tokenizers, layout
        self.examples = read_examples(task)
        self.prompts = [prompt_ids(example, tokenizers, layout) for example in self.examples]
        self.sampling = _sampling(task, self.examples, tokenizers, layout)

    def run(self, model: nn.Module, progress: bool = False) -> dict[str, float]:
        """The metrics `task/<name>/<metric>` of `model`'s generations."""
        task, layout = self.task, self.layout
        longest = max(map(len, self.prompts))
        where = f"eval.tasks[{task.name}].max_new_tokens"
        check_length(longest, self.sampling.max_new_tokens, model.cfg.max_seq_len, where)
        new: list[list[int]] = []
        training = model.training
        model.eval()
        bar = tqdm(
            total=len(self.prompts), desc=f"task {task.name}", unit="example", disable=not progress
        )
        try:
            for batch, start in enumerate(range(0, len(self.prompts), task.batch_size)):
                chunk = self.prompts[start : start + task.batch_size]
                sampling = replace(self.sampling, seed=task.seed + batch)
                new += generate(model, chunk, sampling, layout)
                bar.update(len(chunk))
        finally:
            bar.close()
            model.train(training)
        answers = [
            answer_span(p, n, ANSWERS[task.name], layout)
            for p, n in zip(self.prompts, new, strict=True)
        ]
        scores = SCORERS[task.name](task, self.examples, answers, self.tokenizers, layout)
        return {f"task/{task.name}/{name}": float(value) for name, value in scores.items()}


def prompt_ids(example: Example, tokenizers: Tokenizers, layout: Layout) -> list[int]:
    """`<s>` and the prompt as a training task's prompt, then `<sep>` (a text answer) or
    the answer's opening delimiter."""
    ids = tokenizers.prompt(example.prompt, example.where)
    if example.target.kind == "text":
        return [*ids, layout.specials["<sep>"]]
    return layout.ask(ids, example.target.kind)


def answer_span(prompt: Sequence[int], new: Sequence[int], modality: str, layout) -> Span | None:
    """The generated answer: the span the prompt opened (framed answers), or every text run
    of the generation as one span (a text answer); None when there is none."""
    spans = [s for s in answer_spans(prompt, new, layout) if s.modality == modality]
    if modality != "text":
        return spans[0] if spans else None
    if not spans:
        return None
    body = [t for s in spans for t in s.body]
    return Span("text", spans[0].start, spans[-1].end, body, True)


def _sampling(task: TaskConfig, examples, tokenizers: Tokenizers, layout: Layout) -> Sampling:
    new = task.max_new_tokens or _needed(task, examples, tokenizers, layout)
    try:
        return Sampling(
            max_new_tokens=new,
            temperature=task.temperature,
            top_k=task.top_k,
            top_p=task.top_p,
            seed=task.seed,
            cfg_scale=task.cfg_scale,
        )
    except ValueError as e:
        raise ConfigError(f"eval.tasks[{task.name}]: {e}") from None


def _needed(task: TaskConfig, examples: list[Example], tokenizers, layout: Layout) -> int:
    """The default max_new_tokens: a picture's codes and its closer, the longest target
    clip's frames; the longest target's tokens, its closer or </s> and TEXT_SLACK more for
    text and SVG."""
    answer = ANSWERS[task.name]
    if answer in ("mask", "image"):
        return layout.tokens_per_item[answer] + 1
    if answer == "video":  # frames of codes, each closed by <eof> (the last <eov>), </vision>
        frames = max(len(e.target.value) for e in examples)
        return frames * (layout.tokens_per_item["video"] + 1) + 1
    if answer == "svg":
        longest = max(len(tokenizers.svg.encode(e.target.value, e.where)) for e in examples)
    else:
        longest = max(len(tokenizers.text.encode(e.target.value)) for e in examples)
    return longest + 1 + TEXT_SLACK
