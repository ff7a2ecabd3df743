"""Samples during training are the same at every layout that gathers them: the one-process
run's answers, token for token, under tensor parallelism and FSDP2 (2 gloo ranks, the real
`mmfm train` path; rank 0 gathers the shards with DCP's full state dict and samples)."""

import json
from pathlib import Path

import pytest

from mmfm.config import ConfigError, load_config
from mmfm.testing import run_distributed, tiny_demo_model, train_metrics

BASE = [
    *tiny_demo_model(n_layers=2, seq_len=64),
    "model.max_seq_len=128",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.steps=2",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",  # two steps that move the weights enough to change the answers
    "logging.progress=false",
    "logging.tensorboard=false",
    "checkpoint.at_end=false",
    "eval.samples_every=2",
    "eval.samples=" + json.dumps([
        {"prompt": "a red square", "modality": "image", "max_new_tokens": 66},
        {"prompt": "hello", "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7},
        {"prompt": "a gene", "modality": "dna", "max_new_tokens": 12, "temperature": 1.0},
    ]),
]  # fmt: skip


def answers(run_dir: Path) -> list[list[int]]:
    lines = (run_dir / "samples" / "samples.jsonl").read_text().splitlines()
    return [json.loads(line)["new_ids"] for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[list[int]]:
    run_dir = tmp_path_factory.mktemp("ref")
    train_metrics([*BASE, f"train.run_dir={run_dir}"])
    return answers(run_dir)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.dp_shard=2"]], ids=str)
def test_samples_match_one_process(layout, reference, tmp_path):
    run_distributed(train_metrics, 2, args=([*BASE, *layout, f"train.run_dir={tmp_path}"],))
    assert len(reference) == 3 and all(reference)
    assert answers(tmp_path) == reference


def test_pipeline_parallel_samples_are_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"eval\.samples with parallel\.pp=2: .*mmfm generate"):
        load_config(None, [*BASE, "parallel.pp=2", "train.micro_batch_size=1"])
