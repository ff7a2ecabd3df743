"""What a training checkpoint holds, as a list of stateful components.

As torchtitan's `CheckpointManager(states={...})`: each component has `state_dict()` (the
top-level entries it owns) and `load_state_dict(state)` (it reads them back from the whole
state), and is either tensors (written by DCP, resharded at load) or JSON (written to
`train_state.json`, checked before any tensor is read). `save_states` and `load_states` are
the one piece of code that saves and loads them; the trainer only lists its components.
Optimizer hyper-parameters are not saved: they come from the config, and the learning rate
from the scheduler state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmfm.data.loader import Loader
from mmfm.parallel.env import ParallelEnv
from mmfm.train.checkpoint import Checkpointer

# Optimizer state keyed by parameter name, so that it reshards across layouts.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class Stateful(Protocol):
    tensors: bool
    """Whether the state is tensors (DCP) or JSON (train_state.json)."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelState:
    tensors = True

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"])


class OptimizerState:
    """The optimizer's per-parameter state (`state.*`); its groups come from the config."""

    tensors = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self._full: dict = {}

    def state_dict(self) -> dict[str, Any]:
        self._full = get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIM_OPTIONS)
        return {"optim": {k: v for k, v in self._full.items() if k.startswith("state.")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After `state_dict()` gave the structure that `state` was loaded into."""
        full = {**self._full, **state["optim"]}
        set_optimizer_state_dict(self.model, self.optimizer, full, options=_OPTIM_OPTIONS)


class RngState:
    tensors = True

    def state_dict(self) -> dict[str, Any]:
        return {"rng": {"cpu": torch.get_rng_state()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["rng"]["cpu"])


class SchedulerState:
    """The schedule; loading it also sets the optimizer's learning rate to the schedule's."""

    tensors = False

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        groups = self.scheduler.optimizer.param_groups
        for group, lr in zip(groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr


class LoaderState:
    """The data streams: each data-parallel rank holds the state of its own streams."""

    tensors = False

    def __init__(self, loader: Loader, env: ParallelEnv):
        self.loader, self.env = loader, env

    def state_dict(self) -> dict[str, Any]:
        states = self.env.all_gather_object(self.loader.state_dict(), "dp")
        return {"loader": self.loader.merge_states(states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])


def state_dicts(components: Sequence[Stateful]) -> tuple[dict, dict]:
    """(tensors for DCP, JSON-able state) of `components`."""
    tensors: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for component in components:
        (tensors if component.tensors else state).update(component.state_dict())
    return tensors, state


def save_states(
    checkpointer: Checkpointer,
    step: int,
    components: Sequence[Stateful],
    config_yaml: str,
    background: bool = False,
) -> Path:
    tensors, state = state_dicts(components)
    return checkpointer.save(step, tensors, state, config_yaml, background)


def load_states(
    checkpointer: Checkpointer,
    path: str | Path,
    components: Sequence[Stateful],
    whole_model: bool,
    check_state: Callable[[Path, dict], None],
) -> None:
    """Load every component from checkpoint `path`, in the order listed, once the JSON state
    passed `check_state` and every tensor's name and shape were checked."""
    tensors: dict[str, Any] = {}
    for component in components:
        if component.tensors:
            tensors.update(component.state_dict())  # the structure DCP loads into
    state = checkpointer.load(path, tensors, whole_model, check_state)
    for component in components:
        component.load_state_dict(tensors if component.tensors else state)
