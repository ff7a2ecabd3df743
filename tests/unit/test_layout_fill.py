"""`parallel.dp_shard=-1` filled from the world size, every broken layout rule in one error
with a layout that fits (checked here by loading it), and one 2-rank gloo run with -1."""

import re
from pathlib import Path

import pytest
import yaml

from mmfm.cli import main
from mmfm.config import ConfigError, load_config
from mmfm.config.layout import resolve_layout, suggest_layout
from mmfm.core.errors import LaunchError
from mmfm.parallel.env import ParallelDims
from mmfm.testing import run_distributed, tiny_shape, train_metrics

# 4 query and 4 KV heads, a vocabulary and MLP divisible by 4: tp 1, 2 and 4 all fit.
MODEL = [*tiny_shape(n_layers=4, seq_len=64), "model.n_kv_heads=4", "model.vocab_size=512"]
BATCH = ["train.global_batch_size=32", "train.micro_batch_size=1"]
DEMO = str(Path(__file__).resolve().parents[2] / "launch/demo.yaml")


def suggestion(message: str) -> tuple[int, list[str]]:
    found = re.search(r"a layout that fits (\d+) processes: (.*)$", message)
    assert found, message
    return int(found.group(1)), found.group(2).split()


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_minus_one_fills_what_the_other_dimensions_leave(world, tp):
    overrides = [*MODEL, *BATCH, "parallel.dp_shard=-1", f"parallel.tp={tp}"]
    if world % tp:
        with pytest.raises(LaunchError, match=f"= {tp} leave, but {tp} does not divide"):
            load_config(None, overrides, world_size=world)
        return
    asked = load_config(None, overrides)
    assert asked.parallel.dp_shard == -1  # resolved only where the world size is known
    cfg = load_config(None, overrides, world_size=world)
    assert cfg.parallel.dp_shard == world // tp and cfg.parallel.world_size == world
    assert cfg.micro_batches_per_step == 32 // (world // tp)
    dims = ParallelDims.from_config(asked.parallel, world)
    assert (dims.dp_shard, dims.tp, dims.dp) == (world // tp, tp, world // tp)
    assert resolve_layout(cfg, world) is cfg  # a resolved layout stays as it is


def test_minus_one_with_replicas_pipeline_and_context():
    overrides = [*MODEL, *BATCH, "parallel.dp_shard=-1", "parallel.dp_replicate=2"]
    overrides += ["parallel.pp=2", "parallel.cp=2"]
    cfg = load_config(None, overrides, world_size=32)
    assert cfg.parallel.dp_shard == 4 and cfg.parallel.dp_size == 8
    assert cfg.micro_batches_per_step == 4


def test_only_dp_shard_may_be_minus_one():
    with pytest.raises(ConfigError, match=r"parallel\.tp must be positive, got -1"):
        load_config(None, [*MODEL, "parallel.tp=-1"])
    with pytest.raises(ConfigError, match=r"dp_shard must be positive, or -1 to fill the job"):
        load_config(None, [*MODEL, "parallel.dp_shard=-2"])


def test_the_rules_on_the_data_parallel_size_wait_for_the_world_size():
    overrides = [*MODEL, "train.global_batch_size=6", "train.micro_batch_size=2"]
    load_config(None, [*overrides, "parallel.dp_shard=-1"])  # dp unknown: not checked yet
    with pytest.raises(ConfigError, match=r"must be a multiple of .*\(2 x 2 = 4\)") as e:
        load_config(None, [*overrides, "parallel.dp_shard=-1"], world_size=2)
    world, fix = suggestion(str(e.value))
    assert world == 2 and fix == ["train.micro_batch_size=1"]


CASES = {
    # scaling to 2 x 8 GPUs: the product, heads vs tp and the batch, broken together
    "product, heads, kv heads, batch": (
        ["parallel.tp=8", "parallel.dp_shard=4", "train.global_batch_size=6"],
        ["= 32, but the job has", "n_heads (4) must be divisible", "n_kv_heads (4) must be",
         "must be a multiple of"],
    ),
    "fill, heads, sequence shards": (
        ["parallel.tp=3", "parallel.dp_shard=-1"],
        ["= 3 leave, but 3 does not divide", "n_heads (4)", "tokens per rank"],
    ),
    "pipeline micro-batches, context chunks": (
        ["parallel.pp=4", "parallel.cp=3", "parallel.dp_shard=-1", "train.micro_batch_size=4",
         "train.global_batch_size=4"],
        ["does not divide", "2 x parallel.cp (6)"],
    ),
    "interleaved schedule, tied embeddings": (
        ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=4", "model.tie_embeddings=true",
         "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
         "train.global_batch_size=12", "train.micro_batch_size=1"],
        ["tie_embeddings is not supported with parallel.tp", "with parallel.pp > 1",
         "needs the micro-batch count (3) to be a multiple of parallel.pp (2)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_one_error_lists_every_broken_rule_and_a_layout_that_fits(name):
    layout, expected = CASES[name]
    overrides = [*MODEL, *layout]
    job = "the job has 2 node(s) x 8 task(s) = 16"
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, world_size=16, job=job)
    message = str(e.value)
    broken = re.search(r"the parallel layout breaks (\d+) rules: ", message)
    assert "\n" not in message and broken and int(broken.group(1)) >= len(expected)
    for part in expected:
        assert part in message, (part, message)
    world, fix = suggestion(message)
    assert world == 16 and fix
    cfg = load_config(None, [*overrides, *fix], world_size=16, job=job)  # the fix validates
    assert cfg.parallel.world_size == 16


def test_no_suggestion_when_only_the_model_can_change():
    overrides = [*MODEL, "data.seq_len=63", "parallel.dp_shard=2"]  # odd rows: cp=1 breaks
    with pytest.raises(ConfigError, match="no layout of 2 processes fits this model and data"):
        load_config(None, overrides)


def test_the_suggestion_keeps_tp_and_pp_and_fills_data_parallel():
    cfg = load_config(None, [*MODEL, *BATCH, "parallel.tp=2", "parallel.pp=2"])
    assert suggest_layout(cfg, 16) == ["parallel.dp_shard=4"]


def test_started_processes_alone_are_an_environment_error(tiny_config):
    cfg = tiny_config("parallel.dp_shard=2")
    with pytest.raises(LaunchError, match="= 2, but 1 processes were started") as e:
        resolve_layout(cfg, 1)
    assert suggestion(str(e.value)) == (1, ["parallel.dp_shard=1"])
    with pytest.raises(ConfigError, match="but --nproc 4 starts 4"):
        resolve_layout(cfg, 4, "--nproc 4 starts 4")


def test_train_dry_run_shows_the_resolved_layout_and_creates_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["train", DEMO, "parallel.dp_shard=-1", "parallel.tp=2", "--nproc", "8",
          "--dry-run", f"train.run_dir={run_dir}", "train.micro_batch_size=1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "dp_shard=4 (-1: filled) x cp=1 x tp=2 x pp=1 = 8 processes" in out
    assert "8 rows per step = 2 micro-batch(es) of 1 rows x 4 data-parallel rank(s)" in out
    assert not run_dir.exists()


def test_slurm_dry_run_shows_the_layout_of_the_job(tmp_path, capsys):
    main(["slurm", "submit", DEMO, "--nodes", "2", "--gpus-per-node", "8",
          "--dry-run", "parallel.dp_shard=-1", "parallel.dp_replicate=2", "parallel.tp=2",
          f"train.run_dir={tmp_path / 'run'}", "train.micro_batch_size=1",
          "train.global_batch_size=32"])  # fmt: skip
    err = capsys.readouterr().err
    assert "layout: dp_replicate=2 x dp_shard=4 (-1: filled) x cp=1 x tp=2 x pp=1 = 16" in err


@pytest.mark.slow  # two spawned ranks that import torch and train: 23 s on 2 loaded cores
def test_two_ranks_train_with_minus_one(tiny_overrides):
    overrides = [*tiny_overrides, "parallel.dp_shard=-1", "train.steps=2"]
    overrides += ["data.num_workers=0", "logging.every=1"]
    rows = run_distributed(train_metrics, 2, args=(overrides,))[0]
    assert [r["step"] for r in rows] == [1, 2]
    run_dir = load_config(None, overrides).train.run_dir
    saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    assert saved["parallel"]["dp_shard"] == 2  # the run dir records the layout that ran
    assert "2 process(es), layout dp_shard=2" in (Path(run_dir) / "train.log").read_text()
