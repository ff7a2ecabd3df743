"""Validation at every parallel layout against one process: val/loss within 1e-5.

Each run trains two steps of the same tiny model on the demo corpus and evaluates two
held-out global batches after each (the training path, `mmfm train`, on gloo ranks spawned
with `run_distributed`). The second step's gradient norm shows that validation left no
gradient behind (zbv, which torch cannot run forward-only, runs whole and drops them).
`mmfm eval --nproc 2` of the saved checkpoint must give the same numbers.
"""

import json
import subprocess
import sys

import pytest

from mmfm.testing import run_distributed, tiny_demo_model, train_metrics

REL = 1e-5

BASE = [
    *tiny_demo_model(),
    "data.num_workers=0",
    "data.loss_weights.dna=0.5",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.steps=2",
    "optim.warmup_steps=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "eval.paths=[builtin:demo]",
    "eval.every=1",
    "eval.steps=2",
]

LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "pp2_zbv": ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
    "cp2": ["parallel.cp=2"],
    "fsdp2": ["parallel.dp_shard=2"],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    return [*BASE, f"data.cache_dir={tmp_path_factory.mktemp('cache')}"]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> tuple[dict, str]:
    run_dir = tmp_path_factory.mktemp("ref")
    rows = train_metrics([*base, f"train.run_dir={run_dir}"])
    return rows, str(run_dir / "checkpoints" / "step_2")


def assert_same_validation(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want, strict=True):
        keys = [k for k in w if k.startswith("val/") and k != "val/seconds"]
        assert {"val/loss", "val/loss/text", "val/loss/dna", "val/bits_per_byte"} <= set(keys)
        assert keys == [k for k in g if k.startswith("val/") and k != "val/seconds"]
        for key in ["loss", "grad_norm", *keys]:
            assert g[key] == pytest.approx(w[key], rel=REL), (g["step"], key, g[key], w[key])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_val_loss_matches_one_process(name, base, reference, tmp_path):
    overrides = [*base, *LAYOUTS[name], f"train.run_dir={tmp_path}"]
    rows = run_distributed(train_metrics, 2, args=(overrides,))[0]
    assert_same_validation(rows, reference[0])


def test_mmfm_eval_at_two_processes_matches_validation(reference, tmp_path):
    want, checkpoint = reference[0][-1], reference[1]
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "mmfm", "eval", checkpoint, "builtin:demo", "--steps", "2"]
    cmd += ["--json", str(out), "parallel.pp=2", "--nproc", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["loss"] == pytest.approx(want["val/loss"], rel=REL)
    for name, row in got["modalities"].items():
        assert row["loss"] == pytest.approx(want[f"val/loss/{name}"], rel=REL), name
    assert got["modalities"]["text"]["bits_per_byte"] == pytest.approx(
        want["val/bits_per_byte"], rel=REL
    )
