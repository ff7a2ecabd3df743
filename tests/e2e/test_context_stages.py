"""Context stages (launch/long_context.yaml): each stage a run that starts from the last
one's weights and data streams, with a longer context and a larger RoPE theta; started by
hand (train.init_from + train.init_data) or as train.stages of one run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfm.config import load_config
from mmfm.core.errors import ConfigError
from mmfm.data.loader import build_loader
from mmfm.testing import read_metrics
from mmfm.train import command as main_module
from mmfm.train.command import build_trainer, train
from mmfm.train.stages import stage_configs, train_stages

from helpers import SignalAt

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
            with build_loader(cfg) as loader:
                loader.load_state_dict(_state(before)["loader"])
                loader.next_step()
                assert loader.state_dict()["streams"] == _state(run_dir)["loader"]["streams"]
            with build_loader(cfg) as fresh:
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


def _stages_run(run_dir: Path, cache, *extra: str) -> tuple[list, object]:
    stages = [
        "train.stages=[{steps: 1}, "
        "{steps: 2, data.seq_len: 1024, model.max_seq_len: 1024, model.rope_theta: 1e6}, "
        "{steps: 1, data.seq_len: 2048, model.max_seq_len: 2048, model.rope_theta: 1e7}]"
    ]
    base = [*TINY, f"data.cache_dir={cache}", "train.global_batch_size=2", *stages]
    base += [f"train.run_dir={run_dir}", *extra]

    def load(extra):
        return load_config(RECIPE, [*base, *extra])

    return stage_configs(load([]), load), load


def test_stages_in_one_run_resume_mid_stage_exactly(tmp_path, demo_cache, monkeypatch):
    straight, _ = _stages_run(tmp_path / "straight", demo_cache)
    assert [c.data.seq_len for c in straight] == [512, 1024, 2048]
    assert straight[2].train.init_from == str(tmp_path / "straight/stage-1/checkpoints/step_2")
    assert train_stages(straight).step == 1
    resumed, _ = _stages_run(tmp_path / "resumed", demo_cache)
    real = main_module._callbacks

    def stop_in_stage_two(cfg, run_dir):
        extra = [SignalAt(1)] if Path(run_dir).name == "stage-1" else []
        return [*real(cfg, run_dir), *extra]

    monkeypatch.setattr(main_module, "_callbacks", stop_in_stage_two)
    result = train_stages(resumed)
    assert (result.step, result.stopped_by) == (1, "SIGUSR1")
    assert not (tmp_path / "resumed" / "stage-2").exists()
    monkeypatch.setattr(main_module, "_callbacks", real)
    with pytest.raises(ConfigError, match=r"set train\.resume=auto"):
        train_stages(resumed)  # without resume=auto a stage holding checkpoints is refused
    again, _ = _stages_run(tmp_path / "resumed", demo_cache, "train.resume=auto")
    assert train_stages(again).step == 1  # stage 1 skipped, stage 2 resumed at step 1
    for k in range(3):
        a = read_metrics(tmp_path / "straight" / f"stage-{k}")
        b = read_metrics(tmp_path / "resumed" / f"stage-{k}")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for x, y in zip(a, b, strict=True):
            assert abs(x["loss"] - y["loss"]) <= 1e-6, (k, x["step"], x["loss"], y["loss"])
        state_a = _state(tmp_path / "straight" / f"stage-{k}", len(a))
        state_b = _state(tmp_path / "resumed" / f"stage-{k}", len(b))
        assert state_a["loader"]["streams"] == state_b["loader"]["streams"]


def test_a_stage_of_train_stages_that_breaks_a_rule_fails_at_start_naming_it(tmp_path):
    bad = "train.stages=[{steps: 1}, {steps: 1, parallel.cp: 2, data.seq_len: 2050}]"
    base = [bad, "model.max_seq_len=4096", f"train.run_dir={tmp_path}"]

    def load(extra):
        return load_config(RECIPE, [*base, *extra])

    with pytest.raises(
        ConfigError,
        match=r"train\.stages\[1\] \(steps=1, parallel\.cp=2.*"
        r"data\.seq_len \(2050\) must be divisible by 2 x parallel\.cp \(4\)",
    ):
        stage_configs(load([]), load)
    assert not tmp_path.joinpath("stage-0").exists()
    for stage, match in [
        ("{data.seq_len: 64}", r"train\.stages\[0\] needs steps"),
        ("{steps: 2, train.run_dir: x}", r"train\.stages\[0\] sets \['train\.run_dir'\]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(RECIPE, [f"train.stages=[{stage}]"])
    with pytest.raises(ConfigError, match=r"checkpoint\.at_end=true"):
        load_config(RECIPE, ["train.stages=[{steps: 1}]", "checkpoint.at_end=false"])
