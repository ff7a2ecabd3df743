"""Job scripts of `mmfm slurm` against values that would run a command when the job starts.

Each hostile value (a line break in `--time`, `--partition`, a run dir, a prepare recipe's
`name`, ...; `;` and `$(...)` in values that land on a shell line) is rendered with
`--dry-run` in this process. Either it is refused as one config line naming its option, or
the rendered script is run with `bash`, with stub `srun` and `scontrol` on PATH and the SLURM
variables a job sees: the file the payload would touch must not appear anywhere, and values
that were accepted reach `srun` as one literal word.
"""

import os
import subprocess
from pathlib import Path

import pytest

from mmfm.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "launch/demo.yaml"
TOKENIZER = REPO / "tokenizers/base.yaml"
MARK = "pwned"  # the payloads touch this file, relative to wherever the script runs
BREAK = f"\ntouch {MARK}\n#"
STUBS = {
    "srun": 'printf "%s\\n" "$@" > "$SRUN_ARGS"',
    "scontrol": "echo node1",
    "sbatch": "echo 1",
}


@pytest.fixture
def job(tmp_path, monkeypatch, capsys):
    """`job(*argv)`: (exit code, stderr) of a refused `mmfm slurm ARGV --dry-run`, else the
    rendered script run with bash, returning (0, the arguments srun got)."""
    monkeypatch.chdir(tmp_path)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)

    def run(*argv: str) -> tuple[int, str]:
        try:
            main(["slurm", *argv, "--dry-run"])
        except SystemExit as refused:
            err = capsys.readouterr().err
            assert "Traceback" not in err and len(err.splitlines()) == 1, err
            return refused.code, err
        script = tmp_path / "job.sbatch"
        script.write_text(capsys.readouterr().out)
        env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
        env.update(SRUN_ARGS=str(tmp_path / "srun.args"), SLURM_JOB_ID="7", SLURM_NTASKS="1")
        env.update(SLURM_JOB_NODELIST="node1", SLURM_CPUS_ON_NODE="2", SLURM_NTASKS_PER_NODE="1")
        env.update(SLURM_ARRAY_TASK_ID="0")
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        assert not list(tmp_path.rglob(MARK)), f"the job ran the payload:\n{script.read_text()}"
        assert done.returncode == 0, done.stderr
        return 0, (tmp_path / "srun.args").read_text()

    return run


def _train(tmp_path: Path, *options: str) -> list[str]:
    return ["submit", str(DEMO), f"train.run_dir={tmp_path / 'run'}", *options]


def _prepare_recipe(tmp_path: Path, name: str = "t", output: str = "out") -> str:
    recipe = tmp_path / "prep.yaml"
    (tmp_path / "x.txt").write_text("a line\n")
    recipe.write_text(
        f"name: {name}\noutput: {tmp_path / output}\ntokenizer: {TOKENIZER}\n"
        f"sources:\n  - {{kind: text, paths: [{tmp_path / 'x.txt'}]}}\n"
    )
    return str(recipe)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--time", f"01:00:00{BREAK}"),
        ("--partition", f"gpu{BREAK}"),
        ("--account", f"lab{BREAK}"),
        ("--partition", "gpu --chdir=/"),  # one more sbatch option on the same line
        ("--time", "1:00:00 --uid=0"),
        ("--sbatch", f"comment=x{BREAK}"),
        ("--sbatch", "comment='a"),
        ("--setup", f"true{BREAK}"),
        ("--setup", "#SBATCH --partition=other"),
        ("--container", f"img{BREAK}"),
        ("--container-mounts", f"/data{BREAK}"),
        ("--python", f"python3{BREAK}"),
    ],
)
def test_a_line_break_or_extra_word_in_an_option_is_refused(job, tmp_path, option, value):
    code, err = job(*_train(tmp_path, option, value))
    assert code == 2 and err.startswith("mmfm: config error:") and option in err


def test_a_line_break_in_the_run_dir_of_a_recipe_is_refused(job, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    text = DEMO.read_text().replace("runs/demo-${now:%Y%m%d-%H%M%S}", '"runs/x\\ntouch pwned\\n#"')
    recipe.write_text(text)
    code, err = job("submit", str(recipe))
    assert code == 2 and "train.run_dir" in err and "control character" in err
    code, err = job("submit", str(DEMO), f"train.run_dir=runs/x{BREAK}")
    assert code == 2 and "train.run_dir" in err


def test_a_run_dir_sbatch_would_split_is_refused(job, tmp_path):
    code, err = job("submit", str(DEMO), f"train.run_dir={tmp_path / 'my run'}")
    assert code == 2 and "train.run_dir" in err and "#SBATCH --output" in err


def test_a_line_break_in_a_prepare_name_or_output_is_refused(job, tmp_path):
    code, err = job("prepare", _prepare_recipe(tmp_path, name='"t\\ntouch pwned\\n#"'))
    assert code == 2 and "name in" in err
    code, err = job("prepare", _prepare_recipe(tmp_path, output='"out\\ntouch pwned\\n#"'))
    assert code == 2 and "output in" in err


def test_a_line_break_in_the_paths_of_a_convert_job_is_refused(job, tmp_path):
    code, err = job("convert", str(tmp_path / "ckpt"), str(tmp_path / f"hf{BREAK}"))
    assert code == 2 and "OUT" in err
    code, err = job("convert", str(tmp_path / f"ckpt{BREAK}"), str(tmp_path / "hf"))
    assert code == 2 and "CHECKPOINT" in err


def test_a_line_break_in_an_override_is_refused(job, tmp_path):
    code, err = job(*_train(tmp_path, f"data.cache_dir=/c{BREAK}"))
    assert code == 2 and "override" in err
    code, err = job("prepare", _prepare_recipe(tmp_path), f"shard_size=5{BREAK}")
    assert code == 2 and "override" in err


def test_semicolons_and_substitutions_stay_literal_words(job, tmp_path):
    payload = f"$(touch {MARK});touch {MARK};`touch {MARK}`"
    cache = f"data.cache_dir=/c/{payload}"
    code, args = job(*_train(tmp_path, cache, "--container", f"img{payload}", "--python", payload))
    assert code == 0
    words = args.splitlines()
    assert cache in words and f"--container-image=img{payload}" in words and payload in words
    code, args = job("prepare", _prepare_recipe(tmp_path), f"name=t{payload}", "--python", payload)
    assert code == 0 and f"name=t{payload}" in args.splitlines()
    (tmp_path / payload).mkdir()  # the submit directory itself
    os.chdir(tmp_path / payload)
    code, args = job("convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert code == 0 and str(tmp_path / "ckpt") in args.splitlines()


def test_ordinary_site_values_still_render(job, tmp_path):
    site = ["--time", "2-12:00:00", "--partition", "gpu,gpu-long", "--account", "lab_1.x"]
    site += ["--sbatch", "constraint=a100&ib", "--sbatch", "gres=gpu:a100:2", "--sbatch", "mem=0"]
    site += ["--setup", "export X=$HOME; true", "--cpus-per-task", "4"]
    code, args = job(*_train(tmp_path, *site))
    assert code == 0 and "train" in args.splitlines()
