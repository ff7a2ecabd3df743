"""checkpoint.async_save: the same run as synchronous saves, the staged copy taken before the
next optimizer step, a stop signal during a background write, and a write that fails."""

import errno
import json
import signal
import threading
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from mmfm.testing import read_metrics
from mmfm.train import checkpoint as checkpoint_module
from mmfm.train.callbacks import Callback
from mmfm.train.checkpoint import Checkpointer, CheckpointError, is_complete
from mmfm.train.command import build_trainer, train

from helpers import SignalAt

NO_WORKER = "data.num_workers=0"  # the loader is not under test here
ASYNC = "checkpoint.async_save=true"
GATE_TIMEOUT_S = 120
"""How long a gated write waits for its gate before failing the test (never on time alone:
the test opens the gate at a step)."""


def weights(run_dir: Path, step: int, cfg) -> dict:
    trainer = build_trainer(cfg)
    trainer.load(Path(run_dir) / "checkpoints" / f"step_{step}")
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _Gate(Callback):
    """Opens `event` after `step` (after the callbacks before it, e.g. a signal)."""

    def __init__(self, step: int, event: threading.Event):
        self.step, self.event = step, event

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            self.event.set()


def _writer(monkeypatch, write_data):
    """Background saves write through a FileSystemWriter whose `write_data` is
    `write_data(writer, plan, planner, original)`."""

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            return write_data(self, plan, planner, super().write_data)

    monkeypatch.setattr(Checkpointer, "storage_writer", lambda self, path: Writer(path))


def _count_async_saves(monkeypatch) -> list:
    calls, real = [], checkpoint_module.dcp.async_save

    def counting(*args, **kwargs):
        calls.append(kwargs["storage_writer"].path)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.dcp, "async_save", counting)
    return calls


@pytest.mark.slow  # four short runs: 21-30 s on 2 loaded cores
def test_async_run_and_resume_equal_the_synchronous_run(tiny_config, tmp_path, monkeypatch):
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    common = ["train.steps=4", "checkpoint.every=1", NO_WORKER]
    train(tiny_config(*common, f"train.run_dir={sync_dir}"))

    # Async: saves at 1, 2 and 3 in the background, SIGUSR1 at 3, then resumed to 4.
    calls = _count_async_saves(monkeypatch)
    trainer = build_trainer(tiny_config(*common, ASYNC, f"train.run_dir={async_dir}"))
    trainer.callbacks.append(SignalAt(3))
    assert (trainer.fit().step, trainer.checkpointer.in_flight) == (3, None)
    assert [Path(p).name for p in calls] == [".step_1.tmp", ".step_2.tmp", ".step_3.tmp"]
    resumed = tiny_config(*common, ASYNC, f"train.run_dir={async_dir}", "train.resume=auto")
    assert train(resumed).step == 4

    a, b = read_metrics(sync_dir), read_metrics(async_dir)
    assert [r["step"] for r in b] == list(range(1, 5))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    state = json.loads((async_dir / "checkpoints/step_3/train_state.json").read_text())
    assert state == json.loads((sync_dir / "checkpoints/step_3/train_state.json").read_text())
    loading = tiny_config(*common, f"train.run_dir={tmp_path / 'load'}")
    assert_same_weights(weights(sync_dir, 4, loading), weights(async_dir, 4, loading))


def test_staged_copy_is_taken_before_the_next_optimizer_step(tiny_config, monkeypatch):
    # The step-2 write is held until step 4 has run: had the save kept references to the live
    # parameters instead of a copy, it would write step 4's weights into step_2.
    gate, written_after = threading.Event(), []

    def gated(writer, plan, planner, write):
        assert gate.wait(GATE_TIMEOUT_S), "the gate never opened"
        written_after.append(trainer.step)
        return write(plan, planner)

    _writer(monkeypatch, gated)
    trainer = build_trainer(tiny_config("train.steps=4", "checkpoint.every=2", ASYNC, NO_WORKER))
    at_step_2 = {}

    class Snapshot(Callback):
        def on_step_end(self, step, metrics):
            if step == 2:
                at_step_2.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer.callbacks += [Snapshot(), _Gate(4, gate)]
    trainer.fit()
    assert written_after[0] == 4
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loading = tiny_config(NO_WORKER)
    saved = weights(trainer.cfg.train.run_dir, 2, loading)
    assert_same_weights(saved, at_step_2)
    assert any(not torch.equal(saved[k], final[k]) for k in saved)  # the steps did change them
    assert_same_weights(weights(trainer.cfg.train.run_dir, 4, loading), final)


def test_sigterm_during_a_background_write_exits_with_complete_checkpoints(
    tiny_config, monkeypatch
):
    gate = threading.Event()

    def gated(writer, plan, planner, write):
        assert gate.wait(GATE_TIMEOUT_S), "the gate never opened"
        return write(plan, planner)

    _writer(monkeypatch, gated)
    trainer = build_trainer(tiny_config("train.steps=50", "checkpoint.every=2", ASYNC, NO_WORKER))
    # SIGTERM after step 3, while step 2's write is held; the write goes on after it.
    trainer.callbacks += [SignalAt(3, signal.SIGTERM), _Gate(3, gate)]
    result = trainer.fit()
    assert (result.step, result.stopped_by) == (3, "SIGTERM")
    ckpt = Checkpointer(Path(trainer.cfg.train.run_dir) / "checkpoints", 3)
    assert [p.name for p in ckpt.complete()] == ["step_2", "step_3"]
    assert not list(ckpt.root.glob(".step_*"))


def test_failed_background_write_is_reported_and_resume_takes_the_previous(
    tiny_config, tmp_path, monkeypatch
):
    saves = []

    def second_fails(writer, plan, planner, write):
        saves.append(writer.path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(plan, planner)

    _writer(monkeypatch, second_fails)
    common = ["train.steps=6", "checkpoint.every=2", ASYNC, NO_WORKER]
    trainer = build_trainer(tiny_config(*common))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    with pytest.raises(CheckpointError) as failed:
        trainer.fit()
    assert str(failed.value) == (
        f"cannot write checkpoint {ckpt_dir / 'step_4'} (no space left on the device); the "
        f"previous checkpoint {ckpt_dir / 'step_2'} is intact: free space in {ckpt_dir} (or "
        "lower checkpoint.keep), then continue with train.resume=auto"
    )
    # Reported at a later step's end (5, or 6 on a slow write), before anything else is saved.
    assert trainer.step in (5, 6) and len(saves) == 2
    assert [p.name for p in Checkpointer(ckpt_dir, 3).step_dirs()] == ["step_2"]
    assert not list(ckpt_dir.glob(".step_*"))

    monkeypatch.undo()
    assert train(tiny_config(*common, "train.resume=auto")).step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))
    assert [p.name for p in Checkpointer(ckpt_dir, 3).complete()] == ["step_2", "step_4", "step_6"]


def test_the_best_checkpoint_is_copied_from_a_complete_one(tiny_config, tmp_path):
    # Validation (steps 2 and 4) keeps the best checkpoint while the background save of the
    # step before may be in flight: its save waits for that write and completes its own.
    val = ["eval.paths=[builtin:demo]", "eval.every=2", "eval.steps=1", "eval.keep_best=true"]
    train(tiny_config("train.steps=4", "checkpoint.every=1", ASYNC, NO_WORKER, *val))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    best = json.loads((ckpt_dir / "best" / "best.json").read_text())
    assert is_complete(ckpt_dir / "best") and best["step"] in (2, 4)
    assert [p.name for p in Checkpointer(ckpt_dir, 3).complete()] == ["step_2", "step_3", "step_4"]
