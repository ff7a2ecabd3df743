"""A newcomer's first commands (issue 30): a missing optional extra is named before any work,
`| head` ends quietly, a refused run leaves nothing behind, shards of another vocabulary are
named, and the parameter count says what it counts.

The CLI cases run `mmfm.cli.main` in this process, as tests/e2e/test_cli_errors.py does; the
pipe case runs `python -m mmfm` for a real pipe closed early.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from mmfm import cli

REPO = Path(__file__).resolve().parents[2]


def refused(capsys, *args) -> tuple[int, str]:
    """(exit code, the last stderr line) of `mmfm ARGS`; fails on a traceback or a last line
    that is not `mmfm: ...` (a command may log before it is refused)."""
    with pytest.raises(SystemExit) as stop:
        cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("mmfm: "), err
    return stop.value.code, lines[-1]


# -- 1. a missing optional extra ----------------------------------------------------------------


def test_visual_tokenizer_without_pyav_names_the_extra_before_any_work(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    out, cache = tmp_path / "seed", tmp_path / "cache"
    code, line = refused(
        capsys,
        "tokenizer",
        "train",
        REPO / "tokenizers/seed_image.yaml",
        f"output_dir={out}",
        f"cache_dir={cache}",
    )
    assert code == 3 and line.startswith("mmfm: environment error:"), line
    assert "pip install 'mmfm[video]'" in line, line
    assert not out.exists() and not cache.exists()  # nothing fetched, nothing written


def test_mask_tokenizer_without_cairosvg_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cairosvg", None)
    icons = tmp_path / "icons"
    icons.mkdir()
    (icons / "a.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    code, line = refused(
        capsys,
        "tokenizer",
        "train",
        REPO / "tokenizers/himtok_mask.yaml",
        f"data=[{icons}]",
        f"output_dir={tmp_path / 'mask'}",
    )
    assert code == 3 and "pip install 'mmfm[svg]'" in line, line


def test_prepare_video_without_pyav_names_the_extra_before_writing(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "a.mp4").write_bytes(b"\0" * 64)
    recipe = tmp_path / "prepare.yaml"
    recipe.write_text(
        f"name: v\noutput: {tmp_path / 'shards'}\ntokenizer: {REPO / 'tokenizers/base.yaml'}\n"
        f"sources:\n  - {{kind: video, paths: ['{clips}']}}\n"
    )
    code, line = refused(capsys, "prepare", recipe, "--workers", "1")
    assert code == 3 and "pip install 'mmfm[video]'" in line, line
    assert not (tmp_path / "shards").exists()


def test_hf_tokenizer_without_tokenizers_names_the_extra(tmp_path, monkeypatch):
    from mmfm.core.errors import LaunchError
    from mmfm.tokenization.text import HfTextTokenizer

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(LaunchError, match=r"pip install 'mmfm\[hf\]'"):
        HfTextTokenizer(b"{}", 1, 2)


def test_a_raw_clip_without_pyav_stops_the_stream_rather_than_counting_a_reject(monkeypatch):
    """A raw video shard read while training (or prepared): without PyAV no clip decodes, so
    the first one stops the run naming the extra; it is not counted as undecodable."""
    from mmfm.config.schema import RawFields
    from mmfm.core.errors import LaunchError
    from mmfm.data.raw import RawDecoder

    monkeypatch.setitem(sys.modules, "av", None)
    decode, rejects = RawDecoder(RawFields(record="video")), []
    sample = {"__key__": "clip", "mp4": b"\0" * 64, "txt": b"a clip"}
    with pytest.raises(LaunchError, match=r"pip install 'mmfm\[video\]'"):
        decode("s.tar", sample, lambda *reject: rejects.append(reject))
    assert rejects == []


def test_a_task_with_a_clip_without_pyav_stops_the_prepare(capsys, tmp_path, monkeypatch):
    """A prompt-response record whose prompt holds a clip: the reader meets it first, and
    stops the prepare naming the extra instead of rejecting each such record."""
    monkeypatch.setitem(sys.modules, "av", None)
    (tmp_path / "a.mp4").write_bytes(b"\0" * 64)
    line = '{"prompt": [{"video": "a.mp4"}, "What happens?"], "response": "a clip"}'
    (tmp_path / "tasks.jsonl").write_text(line + "\n")
    recipe = tmp_path / "prepare.yaml"
    recipe.write_text(
        f"name: t\noutput: {tmp_path / 'shards'}\ntokenizer: {REPO / 'tokenizers/base.yaml'}\n"
        f"sources:\n  - {{kind: prompt-response, paths: ['{tmp_path / 'tasks.jsonl'}']}}\n"
    )
    code, line = refused(capsys, "prepare", recipe, "--workers", "1")
    assert code == 3 and "pip install 'mmfm[video]'" in line, line


# -- 2. a pipe closed early ---------------------------------------------------------------------


def test_decode_into_a_pipe_closed_after_one_line_exits_quietly():
    """`mmfm tokenizer decode ... | head -1`: the reader goes after one line, with far more
    than a pipe's buffer (64 KiB) still to come; no traceback, exit 141 as for SIGPIPE."""
    ids = " ".join(["630"] * 40_000)  # "▁one": 160 KB of text
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfm", "tokenizer", "decode", "tokenizers/base.yaml"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdin.write(ids.encode())
    proc.stdin.close()
    assert proc.stdout.readline() == b"[text]\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == "", err


# -- 3. a refused command leaves nothing behind -------------------------------------------------

DEMO = REPO / "launch/demo.yaml"


def test_slurm_submit_without_sbatch_creates_nothing(capsys, tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    run = tmp_path / "run"
    code, line = refused(capsys, "slurm", "submit", DEMO, f"train.run_dir={run}")
    assert code == 3 and "sbatch is not installed here" in line, line
    assert not run.exists()


def test_slurm_submit_that_sbatch_refuses_leaves_no_run_dir(capsys, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'invalid partition specified' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    run = tmp_path / "run"
    code, line = refused(capsys, "slurm", "submit", DEMO, f"train.run_dir={run}")
    assert code == 3 and "invalid partition specified" in line, line
    assert not run.exists()


@pytest.mark.parametrize("start", ["train.init_from", "train.resume"])
def test_train_from_a_folder_that_is_no_checkpoint_creates_no_run_dir(capsys, tmp_path, start):
    from helpers import TINY

    (tmp_path / "notes").mkdir()
    run = tmp_path / "run"
    overrides = [*TINY, f"train.run_dir={run}", f"{start}={tmp_path / 'notes'}"]
    code, line = refused(capsys, "train", DEMO, *overrides)
    assert code == 1 and line.startswith("mmfm: checkpoint error:") and "notes" in line, line
    assert not run.exists()


# -- 4. what the commands write is ignored by git -----------------------------------------------


def _default_outputs() -> list[str]:
    """Every folder a command writes into the checkout by default: the --out folders, the
    default run dir, and the run dirs and outputs the bundled recipes name."""
    import yaml

    from mmfm.config.schema import TrainConfig

    parser = cli._parser()
    outputs = [
        parser.parse_args(["generate", "ckpt", "--prompt", "x"]).out,
        parser.parse_args(["tokenizer", "decode", "recipe.yaml"]).out,
        TrainConfig().run_dir,
    ]
    for recipe in sorted(REPO.glob("launch/*.yaml")):
        run_dir = ((yaml.safe_load(recipe.read_text()) or {}).get("train") or {}).get("run_dir")
        outputs += [run_dir.replace("${now:%Y%m%d-%H%M%S}", "20260101-000000")] if run_dir else []
    for recipe in sorted([*REPO.glob("data_pipelines/*.yaml"), *REPO.glob("tokenizers/*.yaml")]):
        raw = yaml.safe_load(recipe.read_text()) or {}
        outputs += [raw[key] for key in ("output", "output_dir") if key in raw]
    return sorted(set(outputs))


def test_what_the_commands_write_by_default_is_ignored_by_git():
    if subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "-C", REPO, "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    outputs = [o for o in _default_outputs() if not any(t.startswith(f"{o}/") for t in tracked)]
    assert {"generations", "decoded", "runs/default"} <= set(outputs), outputs
    for output in outputs:
        probe = subprocess.run(
            ["git", "-C", REPO, "check-ignore", "-q", "--no-index", f"{output}/a-file"]
        )
        assert probe.returncode == 0, f"{output}/ is not in .gitignore"


# -- 5. shards of another vocabulary than the model's -------------------------------------------


def test_demo_model_on_shards_of_a_larger_vocabulary_is_refused_naming_both(capsys, tmp_path):
    """The demo recipe (no data.vocab: the demo's own 384 ids) on shards prepared with
    tokenizers/base.yaml (their vocab.json beside them, as mmfm prepare leaves it): refused
    at start-up, naming the shards' vocabulary and the model's size, instead of every
    document counted as a bad sample up to data.max_error_rate."""
    import shutil
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(REPO / "tokenizers/base/vocab.json", shards / "vocab.json")
    tarfile.open(shards / "notes-000000.tar", "w").close()
    run = tmp_path / "run"
    overrides = [f"data.paths=[{shards}]", f"train.run_dir={run}", "train.steps=1"]
    code, line = refused(capsys, "train", REPO / "launch/demo.yaml", *overrides)
    assert code == 2 and line.startswith("mmfm: config error:"), line
    assert f"{shards / 'vocab.json'}" in line and "model.vocab_size (384)" in line, line
    assert "data.vocab=" in line, line
    assert not run.exists()


# -- 6. the parameter count of the start-up line ------------------------------------------------


def test_parameter_counts_give_the_whole_model_and_the_share_each_rank_holds():
    """Split as tp=2 (each matrix sharded over 2 ranks) and as pp=2 (each stage a part of the
    layers): the total is the whole model's every time; a rank's share is its shards, or its
    stage, and the stages' shares add up to the total. tp=2 runs on a fake 2-rank group in
    this process (torch's test backend: sharding only, nothing is sent)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mmfm.config import load_config
    from mmfm.config.schema import ParallelConfig
    from mmfm.model import build_model
    from mmfm.parallel.parallelize import parameter_counts
    from mmfm.parallel.pipeline import stage_layer_counts, stage_module
    from mmfm.parallel.tensor_parallel import apply_tensor_parallel
    from mmfm.testing import tiny_demo_model

    cfg = load_config(None, [*tiny_demo_model(n_layers=3), "model.tie_embeddings=false"])
    whole = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert parameter_counts(cfg.model, "cpu", build_model(cfg.model)) == (whole, whole)

    counts = stage_layer_counts(cfg.model.n_layers, ParallelConfig(pp=2))
    stages = [stage_module(build_model(cfg.model), s, counts) for s in range(2)]
    shares = [parameter_counts(cfg.model, "cpu", stage) for stage in stages]
    assert [total for total, _ in shares] == [whole, whole]
    assert 0 < shares[0][1] < whole and shares[0][1] + shares[1][1] == whole

    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        model = build_model(cfg.model)
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=False)
        total, mine = parameter_counts(cfg.model, "cpu", model)
    finally:
        dist.destroy_process_group()
    norms = sum(p.numel() for n, p in build_model(cfg.model).named_parameters() if "norm" in n)
    assert total == whole and mine == (whole - norms) // 2 + norms  # norms are replicated
