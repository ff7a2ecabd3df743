"""Layout validation and the pipeline split, without starting processes."""

import pytest

from mmfm.config import ConfigError, ParallelConfig, load_config
from mmfm.core.errors import LaunchError
from mmfm.model import build_model
from mmfm.parallel.env import ParallelDims, process_ranks
from mmfm.parallel.pipeline import ModelParts, local_stage_ids, stage_layer_counts, stage_module
from mmfm.testing import tiny_shape

MODEL = [*tiny_shape(n_layers=4, seq_len=64), "model.vocab_size=512"]
MODEL += ["train.global_batch_size=8", "train.micro_batch_size=2"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=8"], r"model.n_heads \(4\) must be divisible by parallel.tp \(8\)"),
        (["parallel.tp=4"], r"model.n_kv_heads \(2\) must be divisible by parallel.tp \(4\)"),
        (
            ["parallel.tp=2", "model.vocab_size=385"],
            r"model.vocab_size \(385\) must be divisible",
        ),
        (["parallel.tp=2", "data.seq_len=63"], "with sequence parallelism"),
        (["parallel.tp=2", "model.tie_embeddings=true"], "tie_embeddings is not supported"),
        (["parallel.pp=8"], r"8 stages, but model.n_layers is 4"),
        (
            [
                "parallel.pp=4",
                "parallel.pp_schedule=interleaved_1f1b",
                "parallel.pp_virtual_stages=2",
            ],
            r"8 stages, but model.n_layers is 4",
        ),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], "pp_virtual_stages >= 2"),
        (["parallel.pp=2", "parallel.pp_virtual_stages=2"], "runs one stage per rank"),
        (
            ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=3"],
            "zbv needs pp_virtual_stages=2",
        ),
        (["parallel.pp=2", "parallel.pp_layers=[1,1,2]"], "needs one per stage"),
        (["parallel.pp=2", "parallel.pp_layers=[1,2]"], "sums to 3, model.n_layers is 4"),
        (["parallel.pp=2", "train.micro_batch_size=8"], "needs at least 2"),
        (["parallel.dp_shard=3"], r"must be a multiple of .*\(2 x 3 = 6\)"),
        (["parallel.cp=3"], r"data.seq_len \(64\) must be divisible by 2 x parallel.cp \(6\)"),
        (
            [
                *("parallel.cp=2", "parallel.tp=8", "model.n_heads=8", "model.n_kv_heads=8"),
                *("data.seq_len=72", "model.max_seq_len=128"),
            ],
            r"data.seq_len / parallel.cp = 36\) must be divisible by parallel.tp",
        ),
        (["parallel.cp_attention=star"], "parallel.cp_attention='star' is not one of"),
        (["parallel.pp_schedule=2f2b"], "parallel.pp_schedule='2f2b' is not one of"),
    ],
)
def test_invalid_layouts_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*MODEL, *overrides])


def test_layout_must_match_the_number_of_processes():
    ParallelDims(2, 2, 1, 2, 1, world_size=8)
    with pytest.raises(LaunchError, match=r"2 x 1 x 1 x 2 x 2 = 8, but 4 processes"):
        ParallelDims(2, 1, 1, 2, 2, world_size=4)


def test_balanced_split_puts_the_remainder_in_the_middle():
    cfg = ParallelConfig(pp=4)
    assert stage_layer_counts(6, cfg) == [1, 2, 2, 1]
    assert stage_layer_counts(8, cfg) == [2, 2, 2, 2]
    assert stage_layer_counts(5, ParallelConfig(pp=2)) == [3, 2]
    assert stage_layer_counts(7, ParallelConfig(pp=4, pp_layers=[1, 2, 3, 1])) == [1, 2, 3, 1]


def test_stage_ids_looped_and_v_shaped():
    looped = ParallelConfig(pp=4, pp_schedule="interleaved_1f1b", pp_virtual_stages=2)
    assert [local_stage_ids(r, looped) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    v = ParallelConfig(pp=2, pp_schedule="zbv", pp_virtual_stages=2)
    assert [local_stage_ids(r, v) for r in range(2)] == [[0, 3], [1, 2]]


def test_stages_keep_global_names_and_their_parts():
    cfg = load_config(None, MODEL)
    model = build_model(cfg.model)
    counts = [1, 2, 1]
    stages = [stage_module(model, s, counts) for s in range(3)]
    assert [list(s.layers) for s in stages] == [["0"], ["1", "2"], ["3"]]
    assert stages[0].tok_embeddings is not None and stages[0].norm is None
    assert stages[1].tok_embeddings is None and stages[1].output is None
    assert stages[2].norm is not None and stages[2].output is not None
    merged = ModelParts([stages[0], stages[2]])
    names = {n for n, _ in merged.named_parameters()}
    assert {"tok_embeddings.weight", "layers.0.attention.wq.weight", "output.weight"} <= names
    assert not any(n.startswith("layers.1.") for n in names)


def test_ranks_from_torchrun_or_srun():
    assert process_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert process_ranks({}) == (0, 1, 0)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT are not set"):
        process_ranks(dict(slurm))
    environ = {**slurm, "MASTER_ADDR": "node01", "MASTER_PORT": "29500"}
    assert process_ranks(environ) == (5, 16, 5)
    assert environ["RANK"] == "5" and environ["WORLD_SIZE"] == "16"
