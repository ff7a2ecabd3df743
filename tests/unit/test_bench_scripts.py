"""The training-step benchmarks run (tiny shapes) so they cannot rot between measurements."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Each test starts a Python that imports torch and runs a script: ~10-30 s on 2 loaded cores.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "512"]


def run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_train_step_bench_checks_both_sides_give_the_same_loss(tmp_path):
    out = tmp_path / "train_step.json"
    run("bench/train_step.py", "--shapes", "256x4", "128x1", "--steps", "1", "--warmup", "0",
        *TINY, "--json", str(out))  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["seq"], r["docs"]) for r in rows] == [(256, 4), (128, 1)]
    for r in rows:  # the script refuses to time sides whose losses differ
        assert abs(r["loss_mmfm"] - r["loss_hf"]) <= 1e-5 * r["loss_mmfm"]
        assert r["tokens_per_s_mmfm"] > 0 and r["tokens_per_s_hf"] > 0


def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    run("bench/gpu.py", "--dry-run", "--steps", "2", "--warmup", "1", "--backends", "docs",
        "--out", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    (result,) = report["runs"]
    assert report["dry_run"] and result["attention"] == "docs" and result["seq"] == 256
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["loss_first_last"][1] < result["loss_first_last"][0]


def test_cross_entropy_bench_runs():
    out = run("bench/cross_entropy.py", "--tokens", "64", "--vocab", "128", "--repeats", "1")
    assert out.count("| chunked |") == 2 and out.count("| torch |") == 2


def test_checkpoint_async_bench_times_both_modes(tmp_path):
    out = tmp_path / "checkpoint_async.json"
    run("bench/checkpoint_async.py", "--dim", "64", "--layers", "1", "--steps", "3", "--every",
        "2", "--repeats", "1", "--dir", str(tmp_path), "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [len(runs[mode][0]["blocked_s"]) for mode in ("sync", "async")] == [1, 1]
    assert len(runs["async"][0]["write_s"]) == 1 and report["summary"]["async_over_sync"] > 0


def test_loader_bench_raw_paths_read_the_same_tokens(tmp_path):
    out = tmp_path / "loader.json"
    run("bench/loader.py", "--raw-only", "--repeats", "1", "--verses", "20", "--photos", "2",
        "--json", str(out))  # fmt: skip
    raw = json.loads(out.read_text())["raw"]
    assert raw["raw text (BPE in the stream)"]["tokens"] == raw["prepared text"]["tokens"] > 0
    pictures = [raw[f"raw image-text, {n} per call"] for n in ("1 picture", "16 pictures")]
    assert pictures[0]["tokens"] == pictures[1]["tokens"] > 0  # the same documents
    assert all(row["workers_per_step"] > 0 for row in raw.values())


def test_samples_bench_times_a_step_and_a_sample_evaluation(tmp_path):
    out = tmp_path / "samples.json"
    run("bench/samples.py", "--dim", "64", "--layers", "1", "--seq", "64", "--rows", "2",
        "--repeats", "1", "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["new_tokens"] > 0 and result["tokens_per_step"] == 128
    assert result["step_s"] > 0 and result["samples_s"] > 0 and result["ratio"] > 0
