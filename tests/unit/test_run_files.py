"""The files a run and an export leave: train.log with the progress bar on, no folder for a
dry run, exported files under the umask, tokenizer_config.json's model_max_length."""

import json
import os
import sys
from pathlib import Path

import pytest

from mmfm.cli import main
from mmfm.config import load_config
from mmfm.convert.hf import export_hf
from mmfm.testing import tiny_shape
from mmfm.tokenization.vocab import Vocab
from mmfm.train.command import build_trainer, train

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_run_files")

REPO = Path(__file__).resolve().parents[2]
BASE_VOCAB = REPO / "tokenizers/base/vocab.json"


def test_train_log_gets_every_step_line_under_the_progress_bar(tiny_config, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar is on
    cfg = tiny_config(
        "data.num_workers=0",
        "logging.tensorboard=false",
        "logging.progress=true",
        "logging.print_every=2",
        "train.steps=3",
        "checkpoint.at_end=false",
    )
    train(cfg)
    logged = (Path(cfg.train.run_dir) / "train.log").read_text()
    for step in (1, 2, 3):  # the first, every print_every-th and the last
        assert f"step {step}/3 | loss " in logged
    terminal = capsys.readouterr().err
    assert "3/3" in terminal and "step 2/3 |" not in terminal  # the bar, not the lines


def test_a_slurm_dry_run_makes_no_folder(tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    job = ["--time", "00:10:00", "--dry-run"]
    submit = ["slurm", "submit", str(REPO / "launch/demo.yaml"), "--nodes", "1"]
    main([*submit, "--gpus-per-node", "1", *job, f"train.run_dir={run_dir}"])
    main(["slurm", "convert", str(tmp_path / "ckpt"), str(out), *job])
    printed = capsys.readouterr().out
    assert printed.count("#SBATCH --time=00:10:00") == 2
    assert not run_dir.exists() and not out.exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_cache) -> Path:
    """A step-0 checkpoint of a tiny model with the base vocabulary (nothing trained)."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    vocab_size = -(-Vocab.load(BASE_VOCAB).size // 64) * 64
    cfg = load_config(
        None,
        [
            *tiny_shape(n_layers=1, seq_len=64, max_seq_len=96),
            "data.paths=[builtin:demo]",
            f"data.cache_dir={demo_cache}",
            "data.num_workers=0",
            f"data.vocab={BASE_VOCAB}",
            f"model.vocab_size={vocab_size}",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            f"train.run_dir={run_dir}",
            "logging.tensorboard=false",
        ],
    )
    trainer = build_trainer(cfg)
    try:
        return trainer.save()
    finally:
        trainer.loader.close()
        trainer.env.close()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_every_exported_file_honours_the_umask(checkpoint, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = export_hf(checkpoint, tmp_path / "hf", dtype="fp32")
    finally:
        os.umask(previous)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 96
