"""Context stages (launch/long_context.yaml): each stage a run that starts from the last
one's weights and data streams, with a longer context and a larger RoPE theta."""

import json
from pathlib import Path

import numpy as np
import torch

from mmfm.config import load_config
from mmfm.data.loader import build_loader
from mmfm.testing import read_metrics
from mmfm.train.main import train

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


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "step_1" / "train_state.json").read_text())


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
