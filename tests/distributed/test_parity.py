"""Every parallel layout against one process: same seed, same data, fp32, gloo on CPU.

The losses and gradient norms of the first 2 optimizer steps must equal the single-process
run within 1e-5 relative (step 2 starts from the updated weights and the optimizer's state,
so the gradients themselves must agree, not only their norm). Ranks are spawned with
`run_distributed` (OLMo-core style) and run the real `mmfm train` path.
"""

import subprocess
import sys

import pytest

from mmfm.testing import read_metrics, run_distributed, tiny_demo_model, train_metrics

REL = 1e-5

MODEL = [
    *tiny_demo_model(),
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "logging.progress=false",
    "logging.tensorboard=false",
]

LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2_no_sp": ["parallel.tp=2", "parallel.sequence_parallel=false"],
    "pp2_1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    "pp2_interleaved": [
        "parallel.pp=2",
        "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_virtual_stages=2",
    ],
    "pp2_zbv": ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"],
    "fsdp2": ["parallel.dp_shard=2"],
    "hsdp2x2": ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp2_fsdp2": ["parallel.tp=2", "parallel.dp_shard=2"],
    "pp2_fsdp2": ["parallel.pp=2", "parallel.dp_shard=2"],
    "fsdp2_activation_checkpoint": ["parallel.dp_shard=2", "parallel.activation_checkpoint=1"],
    "cp2": ["parallel.cp=2"],
    "cp2_allgather": ["parallel.cp=2", "parallel.cp_attention=allgather"],
    "cp4": ["parallel.cp=4"],
    "cp2_tp2": ["parallel.cp=2", "parallel.tp=2"],
    "cp2_pp2": ["parallel.cp=2", "parallel.pp=2"],
}


def world_size(layout: list[str]) -> int:
    size = 1
    for item in layout:
        key, value = item.split("=")
        if key in (
            "parallel.tp",
            "parallel.pp",
            "parallel.cp",
            "parallel.dp_shard",
            "parallel.dp_replicate",
        ):
            size *= int(value)
    return size


# Four ranks on 2 cores: 18-34 s each in CI, so `-m "not slow"` leaves them out.
FOUR_RANKS = {name for name, layout in LAYOUTS.items() if world_size(layout) == 4}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")
    return [*MODEL, f"data.cache_dir={cache}", "train.steps=2", "checkpoint.at_end=false"]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> list[dict]:
    return train_metrics([*base, f"train.run_dir={tmp_path_factory.mktemp('ref')}"])


def assert_same_run(got: list[dict], want: list[dict], keys=("loss", "grad_norm")) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=REL), (g["step"], key, g[key], w[key])


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in FOUR_RANKS else []) for n in LAYOUTS]
)
def test_layout_matches_one_process(name, base, reference, tmp_path):
    layout = LAYOUTS[name]
    results = run_distributed(
        train_metrics, world_size(layout), args=([*base, *layout, f"train.run_dir={tmp_path}"],)
    )
    assert_same_run(results[0], reference)


def test_single_process_options_match(base, reference, tmp_path):
    options = ["parallel.activation_checkpoint=2"]  # every 2nd block checkpointed
    assert_same_run(train_metrics([*base, *options, f"train.run_dir={tmp_path}"]), reference)


MOT = "model.mot.groups={language: [text, dna, svg], vision: [image, mask, video]}"
MOT_LAYOUTS = ("tp2_no_sp", "pp2_1f1b", "cp2")  # fsdp2: test_mot_fsdp2_matches_and_reshards


@pytest.fixture(scope="module")
def mot_base(base) -> list[str]:
    """A Mixture-of-Transformers model (language and vision groups, on demo rows that pack
    text, captioned pictures and DNA together) of 2 blocks, over 3 steps."""
    return [*base, MOT, "model.n_layers=2", "train.steps=3"]


@pytest.fixture(scope="module")
def mot_reference(mot_base, tmp_path_factory) -> list[dict]:
    return train_metrics([*mot_base, f"train.run_dir={tmp_path_factory.mktemp('mot_ref')}"])


@pytest.mark.slow  # 10-40 s each on 2 cores
@pytest.mark.parametrize("name", MOT_LAYOUTS)
def test_mot_layout_matches_one_process(name, mot_base, mot_reference, tmp_path):
    layout = LAYOUTS[name]
    results = run_distributed(
        train_metrics, world_size(layout), args=([*mot_base, *layout, f"train.run_dir={tmp_path}"],)
    )
    assert len(mot_reference) == 3
    assert_same_run(results[0], mot_reference)


@pytest.mark.slow  # 2 ranks, then one process: 15-25 s
def test_mot_fsdp2_matches_and_reshards(mot_base, mot_reference, tmp_path):
    """MoT at FSDP2 with every block's activations recomputed equals one process; its
    checkpoint of step 2 resumes in one process with step 3 as the uninterrupted run's."""
    saved = tmp_path / "fsdp2"
    layout = [*LAYOUTS["fsdp2_activation_checkpoint"], "checkpoint.every=2"]
    fsdp = run_distributed(train_metrics, 2, args=([*mot_base, *layout, f"train.run_dir={saved}"],))
    assert_same_run(fsdp[0], mot_reference)
    step2 = saved / "checkpoints" / "step_2"
    single = train_metrics(
        [*mot_base, f"train.resume={step2}", f"train.run_dir={tmp_path / 'one'}"]
    )
    assert_same_run(single, mot_reference[2:])


@pytest.mark.slow  # inductor compiles a block's forward and backward: 40-60 s on 2 cores
def test_compiled_blocks_match_one_process(base, reference, tmp_path):
    # Four micro-batches a step, each its own document layout: one compile for all of them
    # (the `docs` attention runs outside the compiled graphs; test_attention.py checks that
    # a new layout is no recompile).
    got = train_metrics([*base, "parallel.compile=true", f"train.run_dir={tmp_path}"])
    assert_same_run(got, reference)


@pytest.mark.slow  # eight ranks on 2 cores: 29-48 s
def test_eight_ranks_context_tensor_and_data_parallel(base, reference, tmp_path):
    """The one eight-rank composition (each pair of the three, and pp with each, run at four
    ranks above): context-parallel ranks reduce gradients with the FSDP shards of the same
    tensor-parallel slice."""
    layout = ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=2"]
    results = run_distributed(
        train_metrics, 8, args=([*base, *layout, f"train.run_dir={tmp_path}"],)
    )
    assert_same_run(results[0], reference)


def test_cli_nproc_launches_local_processes(base, reference, tmp_path):
    # `mmfm train ... --nproc 2` goes through torchrun's launcher, like a user would.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("parallel:\n  pp: 2\n  pp_schedule: gpipe\n")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmfm", "train", str(recipe), *base, f"train.run_dir={run_dir}"]
    out = subprocess.run([*cmd, "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(read_metrics(run_dir), reference)


@pytest.mark.slow  # four runs at three layouts: 35-45 s
def test_checkpoint_reshards_across_layouts(base, tmp_path):
    # 4 steps: TP2 x PP2 saves at step 2; FSDP2 and one process resume there for steps 3-4.
    four = [o for o in base if not o.startswith(("train.steps", "checkpoint.at_end"))]
    four += ["train.steps=4"]
    straight = train_metrics([*four, f"train.run_dir={tmp_path / 'straight'}"])
    saved = tmp_path / "tp2pp2"
    at_tp2pp2 = run_distributed(
        train_metrics,
        4,
        args=(
            [
                *four,
                "parallel.tp=2",
                "parallel.pp=2",
                "checkpoint.every=2",
                f"train.run_dir={saved}",
            ],
        ),
    )[0]
    step2 = saved / "checkpoints" / "step_2"
    fsdp = run_distributed(
        train_metrics,
        2,
        args=(
            [
                *four,
                "parallel.dp_shard=2",
                f"train.resume={step2}",
                f"train.run_dir={tmp_path / 'fsdp'}",
            ],
        ),
    )[0]
    single = train_metrics([*four, f"train.resume={step2}", f"train.run_dir={tmp_path / 'one'}"])
    assert_same_run(at_tp2pp2, straight)
    assert_same_run(fsdp, straight[2:], keys=("loss",))
    assert_same_run(single, straight[2:], keys=("loss",))
