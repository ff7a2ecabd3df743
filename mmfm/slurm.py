"""`mmfm slurm submit | prepare | convert`: render a template of `slurm/`, call sbatch.

Templates are bash with `{{name}}` placeholders (bash's own `${...}` stays untouched). The
training job runs one task per GPU and resumes itself: the script passes a fixed run dir and
`train.resume=auto`, the trainer checkpoints on the pre-timeout SIGUSR1 (or SIGTERM) and then
asks SLURM to requeue the job (`requeue_after_stop`), which resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mmfm.config import ConfigError, load_config
from mmfm.core.errors import InputNotFound, LaunchError
from mmfm.prepare import check_output, load_prepare_recipe

log = logging.getLogger("mmfm")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class SlurmError(LaunchError):
    """sbatch or scontrol failed; the message carries their output."""


def template_path(name: str, template: str | None = None) -> Path:
    """`--template`, else `slurm/<name>` here, else the one next to this installation."""
    if template and not Path(template).is_file():
        raise InputNotFound(f"--template {template}: no such file")
    for candidate in (template, f"slurm/{name}", Path(__file__).parents[1] / "slurm" / name):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise InputNotFound(
        f"no SLURM template {name!r}: run from the mmfm repository or pass --template"
    )


def render(template: Path, values: dict[str, object]) -> str:
    text = template.read_text()
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise ConfigError(f"{template}: no value for placeholder(s) {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def _extra(gpus_per_node: int, partition: str | None, account: str | None) -> str:
    lines = []
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    return "\n".join(lines)


def _sbatch(script: Path) -> str:
    try:
        out = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True
        )
    except FileNotFoundError:
        raise SlurmError("sbatch is not installed here: run on a SLURM login node") from None
    except subprocess.CalledProcessError as e:
        raise SlurmError(f"sbatch {script} failed: {e.stderr.strip()}") from None
    return out.stdout.strip().split(";")[0]


def submit(
    recipe: str,
    overrides: Sequence[str],
    nodes: int,
    gpus_per_node: int,
    time: str = "01:00:00",
    ntasks_per_node: int | None = None,
    cpus_per_task: int = 8,
    partition: str | None = None,
    account: str | None = None,
    signal_seconds: int = 120,
    template: str | None = None,
    dry_run: bool = False,
) -> str | None:
    """Render train.sbatch for `recipe` and submit it; return the job id (None for dry runs)."""
    cfg = load_config(recipe, overrides)  # validates, and fixes ${now:...} in the run dir once
    tasks = ntasks_per_node or gpus_per_node or 1
    world = nodes * tasks
    if cfg.parallel.world_size != world:
        raise ConfigError(
            f"parallel.* multiply to {cfg.parallel.world_size} processes but the job has "
            f"{nodes} node(s) x {tasks} task(s) = {world}: change the layout or the job size"
        )
    run_dir = Path(cfg.train.run_dir).resolve()
    kept = [o for o in overrides if not o.startswith(("train.run_dir=", "train.resume="))]
    script = render(
        template_path("train.sbatch", template),
        {
            "job_name": f"mmfm-{run_dir.name}",
            "nodes": nodes,
            "ntasks_per_node": tasks,
            "cpus_per_task": cpus_per_task,
            "time": time,
            "signal_seconds": signal_seconds,
            "extra_sbatch": _extra(gpus_per_node, partition, account),
            "run_dir": shlex.quote(str(run_dir)),
            "python": shlex.quote(sys.executable),
            "recipe": shlex.quote(str(Path(recipe).resolve())),
            "overrides": " ".join(shlex.quote(o) for o in kept),
        },
    )
    return _write_and_submit(script, run_dir / "slurm" / "train.sbatch", dry_run, run_dir, "%j")


def _write_and_submit(script: str, path: Path, dry_run: bool, log_dir: Path, pattern: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if dry_run:
        print(script, end="")
        return None
    job = _sbatch(path)
    print(f"submitted job {job}")
    print(f"log: {log_dir / ('slurm-' + pattern.replace('%j', job).replace('%A', job) + '.out')}")
    print(f"run dir: {log_dir}")
    return job


def submit_prepare(
    recipe: str,
    overrides: Sequence[str],
    parts: int,
    time: str = "01:00:00",
    cpus_per_task: int = 8,
    partition: str | None = None,
    account: str | None = None,
    template: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
) -> str | None:
    """An array job of `parts` tasks of `mmfm prepare`. The output is checked here, once: a
    changed recipe is refused before any task starts, and with `overwrite` the shards of the
    old one are removed here (not in a dry run), not by tasks racing each other."""
    prep = load_prepare_recipe(recipe, overrides)
    out = Path(prep.output).resolve()
    if not (dry_run and overwrite):  # a dry run removes nothing
        check_output(prep, overwrite)
    script = render(
        template_path("prepare.sbatch", template),
        {
            "job_name": f"mmfm-prepare-{prep.name}",
            "last_task": parts - 1,
            "parts": parts,
            "cpus_per_task": cpus_per_task,
            "time": time,
            "log_dir": shlex.quote(str(out)),
            "extra_sbatch": _extra(0, partition, account),
            "python": shlex.quote(sys.executable),
            "recipe": shlex.quote(str(Path(recipe).resolve())),
            "overrides": " ".join(shlex.quote(o) for o in overrides),
        },
    )
    return _write_and_submit(script, out / "slurm" / "prepare.sbatch", dry_run, out, "%A_0")


def submit_convert(
    checkpoint: str,
    out: str,
    dtype: str = "bf16",
    time: str = "01:00:00",
    cpus_per_task: int = 8,
    partition: str | None = None,
    account: str | None = None,
    template: str | None = None,
    dry_run: bool = False,
) -> str | None:
    out_dir = Path(out).resolve()
    script = render(
        template_path("convert.sbatch", template),
        {
            "job_name": f"mmfm-convert-{out_dir.name}",
            "cpus_per_task": cpus_per_task,
            "time": time,
            "log_dir": shlex.quote(str(out_dir)),
            "extra_sbatch": _extra(0, partition, account),
            "python": shlex.quote(sys.executable),
            "checkpoint": shlex.quote(str(Path(checkpoint).resolve())),
            "out": shlex.quote(str(out_dir)),
            "dtype": dtype,
        },
    )
    return _write_and_submit(script, out_dir / "slurm" / "convert.sbatch", dry_run, out_dir, "%j")


def restart_count() -> int | None:
    """How often SLURM restarted this job (None outside SLURM)."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def requeue_after_stop(max_requeues: int) -> bool:
    """After a signal-triggered checkpoint under SLURM: requeue this job (it resumes from the
    checkpoint). Only this path requeues: a job that fails with an error does not."""
    count = restart_count()
    if count is None:
        return False
    if count >= max_requeues:
        log.warning("not requeueing: the job restarted %d times (train.max_requeues)", count)
        return False
    job = os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.info("requeued SLURM job %s (restart %d); it resumes from the checkpoint", job, count + 1)
    return True
