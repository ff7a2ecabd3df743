"""`mmfm slurm prepare` checks the output once, at submission: a changed recipe is refused
before a job exists, and `--overwrite` removes the old shards there, not in racing tasks."""

from pathlib import Path

import pytest

from mmfm import slurm
from mmfm.cli import main
from mmfm.prepare import load_prepare_recipe, prepare

REPO = Path(__file__).resolve().parents[2]


def test_slurm_prepare_refuses_a_changed_recipe_and_overwrite_clears_it_once(
    tmp_path, monkeypatch, real_data, capsys
):
    real_data("kjv")
    recipe, out = tmp_path / "prep.yaml", tmp_path / "out"
    recipe.write_text(
        f"name: t\noutput: {out}\ntokenizer: {REPO / 'tokenizers/base.yaml'}\n"
        "shard_size: 10\nsources:\n  - {kind: text, paths: [real:kjv], limit: 20}\n"
    )
    prepare(load_prepare_recipe(recipe), workers=1, progress=False)
    old = sorted(out.glob("t-*.tar"))
    assert len(old) == 2 and (out / "manifest.json").is_file()
    scripts = []
    monkeypatch.setattr(slurm, "_sbatch", lambda path: scripts.append(path.read_text()) or "7")
    cmd = ["slurm", "prepare", str(recipe), "shard_size=5", "--parts", "2"]

    with pytest.raises(SystemExit) as refused:
        main(cmd)
    assert refused.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main([*cmd, "--overwrite", "--dry-run"])  # prints the job, removes nothing
    assert not scripts and sorted(out.glob("t-*.tar")) == old

    main([*cmd, "--overwrite"])
    assert len(scripts) == 1 and "--overwrite" not in scripts[0]  # the tasks remove nothing
    assert not list(out.glob("t-*.tar")) and not (out / "manifest.json").exists()
    main(cmd)  # nothing of the old recipe is left: submitted again without --overwrite
    assert len(scripts) == 2
