"""A decomposed run (a new row length every step: 16, 32, 64) at TP2, CP2 and FSDP2 against
one process: losses and gradient norms within 1e-5, as tests/distributed/test_parity.py."""

import pytest

from mmfm.testing import run_distributed, tiny_demo_model, train_metrics

REL = 1e-5

BASE = [
    *tiny_demo_model(),
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "train.steps=3",
    "checkpoint.at_end=false",
    "data.packing=decompose",
    "data.buckets=[16,32,64]",
    "data.curriculum=grow_p2",
    "data.num_cycles=1",
]


@pytest.fixture(scope="module")
def base(demo_cache) -> list[str]:
    return [*BASE, f"data.cache_dir={demo_cache}"]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> list[dict]:
    return train_metrics([*base, f"train.run_dir={tmp_path_factory.mktemp('ref')}"])


def test_one_process_changes_the_row_length_every_step(reference):
    assert [r["data/seq_len"] for r in reference] == [16, 32, 64]


@pytest.mark.parametrize(
    "layout",
    [["parallel.tp=2"], ["parallel.cp=2"], ["parallel.dp_shard=2"]],
    ids=["tp2", "cp2", "fsdp2"],
)
def test_decomposed_steps_match_one_process(layout, base, reference, tmp_path):
    got = run_distributed(train_metrics, 2, args=([*base, *layout, f"train.run_dir={tmp_path}"],))
    assert [r["data/seq_len"] for r in got[0]] == [16, 32, 64]
    for g, w in zip(got[0], reference, strict=True):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=REL), (g["step"], key, g[key], w[key])
