"""checkpoint.async_save at 2 ranks (FSDP2, TP2): the same losses and weights as synchronous
saves, and a resume from a background-written checkpoint continues the run exactly."""

import pytest
import torch

from mmfm.testing import run_distributed, tiny_demo_model, train_metrics
from mmfm.train.checkpoint import load_checkpoint_model

MODEL = [
    *tiny_demo_model(),
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "data.num_workers=0",
    "train.steps=4",
    "checkpoint.every=2",
]
LAYOUTS = {"fsdp2": ["parallel.dp_shard=2"], "tp2": ["parallel.tp=2"]}


def weights(run_dir, step: int) -> dict:
    model, _ = load_checkpoint_model(run_dir / "checkpoints" / f"step_{step}")
    return model.state_dict()


@pytest.mark.slow  # three 2-rank runs: 43-63 s on 2 loaded cores
@pytest.mark.parametrize("name", LAYOUTS)
def test_async_save_and_resume_equal_sync(name, tmp_path):
    run = [*MODEL, f"data.cache_dir={tmp_path / 'cache'}", *LAYOUTS[name]]

    def metrics(*overrides):
        return run_distributed(train_metrics, 2, args=([*run, *overrides],))[0]

    sync = metrics(f"train.run_dir={tmp_path / 'sync'}")
    background = metrics("checkpoint.async_save=true", f"train.run_dir={tmp_path / 'async'}")
    step2 = tmp_path / "async" / "checkpoints" / "step_2"
    resumed = metrics(
        "checkpoint.async_save=true", f"train.resume={step2}", f"train.run_dir={tmp_path / 'res'}"
    )
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in background] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in sync
    ]
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in sync[2:]]
    want = weights(tmp_path / "sync", 4)
    for got in (weights(tmp_path / "async", 4), weights(tmp_path / "res", 4)):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
