"""checkpoint.async_save at 2 ranks (FSDP2, TP2): the losses of one process (1e-5, as every
layout in test_parity), and a resume from a background-written checkpoint continues the run
bit for bit, weights included. That async saves equal sync ones bit for bit is shown in one
process (tests/e2e/test_checkpoint_async.py), where it costs no 2-rank run."""

import pytest
import torch

from mmfm.testing import run_distributed, tiny_demo_model, train_metrics
from mmfm.train.checkpoint import load_checkpoint_model

MODEL = [
    *tiny_demo_model(n_layers=2),
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


@pytest.mark.slow  # two 2-rank runs and one process: 10-20 s on 2 cores
@pytest.mark.parametrize("name", LAYOUTS)
def test_async_saves_match_one_process_and_resume_exactly(name, tmp_path):
    run = [*MODEL, f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.async_save=true"]

    def metrics(*overrides):
        return run_distributed(train_metrics, 2, args=([*run, *LAYOUTS[name], *overrides],))[0]

    one = train_metrics([*run, f"train.run_dir={tmp_path / 'one'}"])
    background = metrics(f"train.run_dir={tmp_path / 'async'}")
    step2 = tmp_path / "async" / "checkpoints" / "step_2"
    resumed = metrics(f"train.resume={step2}", f"train.run_dir={tmp_path / 'res'}")
    assert [r["step"] for r in background] == [r["step"] for r in one] == [1, 2, 3, 4]
    for got, want in zip(background, one, strict=True):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in background[2:]
    ]
    want = weights(tmp_path / "async", 4)
    got = weights(tmp_path / "res", 4)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
