"""The trainer on decomposed rows: the row length follows the curriculum step by step (rows x
length = the token budget), and a run interrupted mid-curriculum resumes exactly."""

import torch

from mmfm.testing import read_metrics
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.command import build_trainer, train

from helpers import SignalAt

DECOMPOSE = [
    "data.packing=decompose",
    "data.buckets=[16,32,64,128]",
    "data.curriculum=grow_p2",
    "data.num_cycles=1",
    "train.steps=4",
    "data.num_workers=0",
]


def _weights(run_dir, cfg) -> dict:
    trainer = build_trainer(cfg)
    trainer.load(Checkpointer(run_dir / "checkpoints", 1).latest())
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_decomposed_run_follows_the_curriculum_and_resumes_exactly(tiny_config, tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = tiny_config(*DECOMPOSE, f"train.run_dir={straight_dir}")
    train(straight)
    a = read_metrics(straight_dir)
    assert [r["data/seq_len"] for r in a] == [16, 32, 64, 128]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in a)

    interrupted = tiny_config(*DECOMPOSE, f"train.run_dir={resumed_dir}")
    trainer = build_trainer(interrupted)
    trainer.callbacks.append(SignalAt(2))  # mid-curriculum: the next length is 64
    assert trainer.fit().step == 2
    resumed = tiny_config(*DECOMPOSE, f"train.run_dir={resumed_dir}", "train.resume=auto")
    assert train(resumed).step == 4
    b = read_metrics(resumed_dir)
    assert [r["step"] for r in b] == list(range(1, 5))
    for x, y in zip(a, b, strict=True):
        assert x["data/seq_len"] == y["data/seq_len"]
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x["step"], x["loss"], y["loss"])
    wa, wb = _weights(straight_dir, resumed), _weights(resumed_dir, resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
