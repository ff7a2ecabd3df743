"""Context stages (launch/long_context.yaml): each stage a run that starts from the last
one's weights and data streams, with a longer context and a larger RoPE theta."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfm.config import load_config
from mmfm.core.errors import ConfigError
from mmfm.data.loader import build_loader
from mmfm.testing import SignalAt, read_metrics
from mmfm.train.main import build_trainer, train

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "launch" / "long_context.yaml"
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.ffn_multiple_of=32",
    "train.steps=1",
    "optim.warmup_steps=1",
    "data.num_workers=0",
    "logging.progress=false",
]
STAGES = [(512, 1e4), (2048, 1e6), (8192, 1e7)]  # the recipe's, at cp=1 (one process)


def _state(run_dir: Path, step: int = 1) -> dict:
    path = run_dir / "checkpoints" / f"step_{step}" / "train_state.json"
    return json.loads(path.read_text())


def test_three_stages_hand_over_the_weights_and_the_data_stream(tmp_path, demo_cache):
    before = None
    for i, (seq_len, theta) in enumerate(STAGES):
        run_dir = tmp_path / f"stage{i + 1}"
        stage = [
            *TINY,
            f"data.cache_dir={demo_cache}",
            f"data.seq_len={seq_len}",
            f"model.max_seq_len={seq_len}",
            f"model.rope_theta={theta}",
            f"train.run_dir={run_dir}",
        ]
        if before is not None:
            last = before / "checkpoints" / "step_1"
            stage += [f"train.init_from={last}", "train.init_data=true"]
        cfg = load_config(RECIPE, stage)
        train(cfg)
        assert all(np.isfinite(r["loss"]) for r in read_metrics(run_dir))
        if before is not None:
            # The stream read on from the last stage's state: the same rows as a loader of
            # this stage restored from it and stepped once.
            loader = build_loader(cfg)
            loader.load_state_dict(_state(before)["loader"])
            loader.next_step()
            assert loader.state_dict()["streams"] == _state(run_dir)["loader"]["streams"]
            fresh = build_loader(cfg)
            fresh.next_step()
            assert fresh.state_dict()["streams"] != _state(run_dir)["loader"]["streams"]
        before = run_dir
    assert torch.isfinite(torch.tensor(read_metrics(before)[-1]["loss"]))


def _stage(run_dir: Path, seq_len: int, theta: float, cache, *extra: str) -> list[str]:
    return [
        *TINY,
        f"data.cache_dir={cache}",
        f"data.seq_len={seq_len}",
        f"model.max_seq_len={seq_len}",
        f"model.rope_theta={theta}",
        f"train.run_dir={run_dir}",
        *extra,
    ]


def test_a_stage_interrupted_after_the_stage_change_resumes_exactly(tmp_path, demo_cache):
    small = "train.global_batch_size=2"
    train(load_config(RECIPE, _stage(tmp_path / "stage1", 512, 1e4, demo_cache, small)))
    handover = [
        f"train.init_from={tmp_path / 'stage1' / 'checkpoints' / 'step_1'}",
        "train.init_data=true",
        "train.steps=2",
        small,
    ]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    train(load_config(RECIPE, _stage(straight_dir, 1024, 1e6, demo_cache, *handover)))
    cfg = load_config(RECIPE, _stage(resumed_dir, 1024, 1e6, demo_cache, *handover))
    trainer = build_trainer(cfg)
    trainer.load_model(cfg.train.init_from, data=True)  # as `train` starts a stage
    trainer.callbacks.append(SignalAt(1))  # one step into stage 2
    assert trainer.fit().step == 1
    trainer.loader.close()
    again = _stage(resumed_dir, 1024, 1e6, demo_cache, *handover, "train.resume=auto")
    assert train(load_config(RECIPE, again)).step == 2  # resumed, not started from stage 1
    a, b = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x["step"], x["loss"], y["loss"])
    sa, sb = _state(straight_dir, 2), _state(resumed_dir, 2)
    assert sa["loader"]["streams"] == sb["loader"]["streams"]


def test_a_stage_that_breaks_a_divisibility_rule_fails_at_start_naming_the_stage(tmp_path):
    start = tmp_path / "stage1" / "checkpoints" / "step_20"
    stage = [f"train.init_from={start}", "train.init_data=true", "parallel.cp=2"]
    with pytest.raises(ConfigError) as seq:
        load_config(RECIPE, [*stage, "data.seq_len=2050", "model.max_seq_len=2050"])
    with pytest.raises(ConfigError) as bucket:
        load_config(RECIPE, [*stage, "data.packing=decompose", "data.buckets=[2,4,8,16]"])
    for e in (seq, bucket):
        assert f"context stage from train.init_from={start}" in str(e.value)
    assert "data.seq_len (2050) must be divisible by 2 x parallel.cp (4)" in str(seq.value)
    assert "bucket 2 must be divisible by 2 x parallel.cp (4)" in str(bucket.value)
    with pytest.raises(ConfigError) as first:  # a first stage has no stage to name
        load_config(RECIPE, ["parallel.cp=2", "data.seq_len=2050", "model.max_seq_len=2050"])
    assert "init_from" not in str(first.value)
