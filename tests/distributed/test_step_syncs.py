"""Collectives and host reads per training step, counted in 2-rank gloo runs (issue 16).

Besides the model's own communication, a step makes the target-count all_reduce (over
data-parallel ranks), the gradient norm's, one for all partial norm-weight gradients of
sequence parallelism (over tensor-parallel ranks), and `StepFlags`: one all_reduce and one
host read, on reporting and other steps alike (the metrics ride along on reporting steps
only). The counter is bench/step_syncs.py's, which also measures the code before the change.
"""

from pathlib import Path

import pytest

from bench.step_syncs import measure, overrides, summarise_counts
from mmfm.testing import run_distributed

STEPS, EVERY = 6, 3  # reporting steps: 1 (printed), 3, 6 (logged); others: 2, 4, 5
LAYOUTS = {
    # target count, gradient norm, StepFlags
    "fsdp2": (["parallel.dp_shard=2"], 3),
    # partial norm-weight gradients (9 norm weights: 1 collective), gradient norm, StepFlags
    "tp2": (["parallel.tp=2"], 3),
}


def run(layout: list[str], run_dir: Path, cache: str, world_size: int) -> list[dict]:
    cfg = [*overrides(layout, STEPS, str(run_dir), every=EVERY), f"data.cache_dir={cache}"]
    if world_size == 1:
        return [measure("count", cfg)]
    return run_distributed(measure, world_size, args=("count", cfg))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_cache) -> dict:
    (result,) = run([], tmp_path_factory.mktemp("one") / "run", demo_cache, 1)
    return result


def test_one_process_reads_the_host_once_per_step(reference):
    counts = summarise_counts(reference["steps"], EVERY)
    assert counts == {
        "collectives_reporting": 0,
        "host_reads_reporting": 1,
        "collectives_other": 0,
        "host_reads_other": 1,
    }


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_step_makes_one_flag_collective_and_one_host_read(name, reference, tmp_path, demo_cache):
    layout, collectives = LAYOUTS[name]
    ranks = run(layout, tmp_path / "run", demo_cache, 2)
    for result in ranks:
        assert summarise_counts(result["steps"], EVERY) == {
            "collectives_reporting": collectives,
            "host_reads_reporting": 1,
            "collectives_other": collectives,
            "host_reads_other": 1,
        }
    got, want = ranks[0]["metrics"], reference["metrics"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 6]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "grad_norm", *(k for k in w if k.startswith("loss/"))):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)
        data = {k: v for k, v in w.items() if k.startswith("data/")}
        assert data and {k: g[k] for k in data} == data  # counters summed exactly once
