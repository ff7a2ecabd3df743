"""Task metrics during training: `eval.tasks` scored every `eval.tasks_every` steps and after
the last one, from the model's own generations (mmfm/tasks/).

The weights are gathered to rank 0 as samples gather them (samples.py: every rank takes part,
rank 0 builds a plain one-process copy); rank 0 runs each task (`run_task`: batched generation
under the span grammar, seeded) with the training RNG restored afterwards, and its
`task/<name>/<metric>` values join the step's metrics before the reporters see them
(metrics.jsonl, TensorBoard, W&B, MLflow). Each task's tokenizers and examples are read and
its prompts tokenized once, when the run is built, on every rank, so that a bad source or a
prompt too long for the model stops the run before its first step.
"""

from __future__ import annotations

import logging
import time

from torch import nn

from mmfm.config import Config
from mmfm.decoding.engine import check_length
from mmfm.parallel.env import ParallelEnv
from mmfm.tasks.run import PreparedTask, task_layout, task_tokenizers
from mmfm.tokenization.vocab import Vocab
from mmfm.train.callbacks import Callback
from mmfm.train.samples import gather_on_rank0, one_process_copy, untouched_rng

log = logging.getLogger("mmfm")


def build_task_scores(cfg: Config, env: ParallelEnv, model: nn.Module, vocab: Vocab | None):
    """The `TaskScores` callback of `cfg.eval` (None when tasks are not scored in training),
    every task's tokenizers and examples checked on every rank."""
    if not cfg.eval.scoring:
        return None
    tasks = []
    for task in cfg.eval.tasks:  # a missing or unreadable source fails here, not at step N
        tokenizers = task_tokenizers(task, vocab)
        prepared = PreparedTask(task, tokenizers, task_layout(tokenizers))
        longest = max(map(len, prepared.prompts))
        where = f"eval.tasks[{task.name}].max_new_tokens"
        check_length(longest, prepared.sampling.max_new_tokens, cfg.model.max_seq_len, where)
        tasks.append(prepared)
    names = ", ".join(task.name for task in cfg.eval.tasks)
    log.info("task scores: %s every %d steps", names, cfg.eval.tasks_every)
    return TaskScores(cfg, env, model, tasks)


class TaskScores(Callback):
    """Every `eval.tasks_every` steps and at the last: task/<name>/<metric> added to the
    step's metrics on rank 0. On every rank (the gather is collective)."""

    def __init__(
        self,
        cfg: Config,
        env: ParallelEnv,
        model: nn.Module,
        tasks: list[PreparedTask],
    ):
        self.cfg, self.env, self.model, self.tasks = cfg, env, model, tasks
        self.every = cfg.eval.tasks_every

    def on_fit_start(self, start_step: int, total_steps: int) -> None:
        self.total = total_steps

    def wants_metrics(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if not self.wants_metrics(step):
            return
        start = time.perf_counter()
        state = gather_on_rank0(self.model, self.env)
        if not self.env.is_main:
            return
        model = one_process_copy(self.cfg, state, self.env.device)
        scores: dict[str, float] = {}
        with untouched_rng(self.env.device):
            for task in self.tasks:
                scores |= task.run(model)
        del model
        scores["task/seconds"] = time.perf_counter() - start
        metrics.update(scores)
        log.info("task scores of step %d in %.1f s", step, scores["task/seconds"])
