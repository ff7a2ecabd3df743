"""`mmfm slurm submit | prepare | convert`: render a template of `slurm/`, call sbatch.

Templates are bash with `{{name}}` placeholders (bash's own `${...}` stays untouched). The
training job runs one task per GPU and resumes itself: the script passes a fixed run dir and
`train.resume=auto`, the trainer checkpoints on the pre-timeout SIGUSR1 (or SIGTERM) and then
asks SLURM to requeue the job (`mmfm/parallel/requeue.py`), which resumes from that checkpoint.
Every job script `cd`s to the directory it was submitted from and runs the site's own set-up
(`Site`: sbatch lines, shell lines, a pyxis or apptainer container) before `srun`. Every
value rendered into a script is checked first: none may hold a control character (a line
break would end a `#SBATCH` comment and run what follows), values of `#SBATCH` lines keep to
the characters sbatch reads as one word, and shell-line values are quoted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmfm.config import ConfigError, load_config
from mmfm.config.layout import describe_layout
from mmfm.core.errors import InputNotFound, LaunchError
from mmfm.prepare import check_output, load_prepare_recipe

log = logging.getLogger("mmfm")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_SBATCH_KEY = re.compile(r"[a-z][a-z0-9-]+")
# What a value of a `#SBATCH` line may hold: sbatch splits these lines at blanks and reads
# quotes and backslashes itself, and `%` in --output is one of its file-name patterns.
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
_NAMES = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_@%+=:,./~*&|!\[\]-]*")
_LOG_DIR = re.compile(r"[\w@+=:,./-]+")
_JOB_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")
# sbatch options that `--sbatch` may not set, and what sets them instead.
_LAYOUT = "the job's size must match the layout the config was checked against: use --nodes, "
_LAYOUT += "--ntasks-per-node, --gpus-per-node (--parts for prepare)"
_TEMPLATE = "the template sets it: edit the template or pass --template"
_OWNED_KEYS = {
    **dict.fromkeys(("nodes", "ntasks", "ntasks-per-node", "gpus-per-node", "array"), _LAYOUT),
    **{k: f"use --{k}" for k in ("time", "partition", "account", "cpus-per-task")},
    "signal": "use --signal-seconds",
    **dict.fromkeys(("output", "error", "open-mode", "chdir"), _TEMPLATE),
}


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


def _one_line(option: str, value: str) -> str:
    """`value` for a (quoted) shell line of a job script: refused with a line break or another
    control character, which no quoting keeps inside a `#SBATCH` comment."""
    if not value.isprintable():
        raise ConfigError(
            f"{option} {value!r}: a line break, tab or other control character cannot go "
            "into a job script: remove it"
        )
    return value


def _sbatch_value(option: str, value: str, allowed: re.Pattern, form: str) -> str:
    if not allowed.fullmatch(_one_line(option, value)):
        raise ConfigError(f"{option} {value!r}: {form}")
    return value


def _time(time: str) -> str:
    form = "write a SLURM time limit: MM, HH:MM:SS, D-HH or D-HH:MM:SS"
    return _sbatch_value("--time", time, _TIME, form)


def _log_dir(option: str, path: Path) -> str:
    """`path` for `#SBATCH --output=`, where no quoting helps: word characters only."""
    form = (
        "the job writes its log there (#SBATCH --output), which takes letters, digits and "
        "_ @ + = : , . / - only: choose a path without blanks, quotes or %"
    )
    return _sbatch_value(option, str(path), _LOG_DIR, form)


def _job_name(prefix: str, option: str, name: str) -> str:
    """A job name is a label: characters sbatch would split at become `_`."""
    return prefix + _JOB_NAME_UNSAFE.sub("_", _one_line(option, name))


def _count(option: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{option} {value!r}: give a whole number")
    return value


def render(template: Path, values: dict[str, object]) -> str:
    text = template.read_text()
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise ConfigError(f"{template}: no value for placeholder(s) {missing}")
    # Values are checked where they come in, naming their option; only these hold lines.
    lines = ("extra_sbatch", "setup")
    assert all(str(v).isprintable() for k, v in values.items() if k not in lines), values
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


@dataclass(frozen=True)
class Site:
    """How this cluster runs a job, beyond its size: `sbatch` lines (`--sbatch KEY=VALUE`),
    shell lines run before srun (`--setup`: modules, conda, NCCL settings), a container
    (pyxis `--container-image`, or apptainer for a `.sif` file) and the interpreter."""

    sbatch: Sequence[str] = ()
    setup: Sequence[str] = ()
    container: str | None = None
    container_mounts: str | None = None
    python: str | None = None


def sbatch_lines(items: Sequence[str]) -> list[str]:
    """`#SBATCH --KEY=VALUE` for each `KEY=VALUE` (`KEY=` for a flag: `exclusive=`)."""
    lines = []
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not eq or not _SBATCH_KEY.fullmatch(key):
            raise ConfigError(
                f"--sbatch {item!r}: write KEY=VALUE with a long sbatch option as KEY "
                "(mem=64G, qos=high, constraint=a100), or KEY= for a flag (exclusive=)"
            )
        if key in _OWNED_KEYS:
            raise ConfigError(f"--sbatch {item!r}: {key} is not passed through: {_OWNED_KEYS[key]}")
        if not _SBATCH_VALUE.fullmatch(_one_line("--sbatch", value)):
            raise ConfigError(
                f"--sbatch {item!r}: the value must be one word, without spaces, quotes or "
                "backslashes (letters, digits and _ @ % + = : , . / ~ * & | ! [ ] -)"
            )
        lines.append(f"#SBATCH --{key}={value}" if value else f"#SBATCH --{key}")
    return lines


def _site_values(
    site: Site, sbatch: dict[str, object], mounts: Sequence[Path], gpus: bool
) -> dict[str, str]:
    """The placeholders every template shares: sbatch lines, set-up, working directory and
    what `srun` runs before `-m mmfm` (the interpreter, inside the container if any)."""
    lines = [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if v]
    lines += sbatch_lines(site.sbatch)
    workdir = Path.cwd()
    for option in ("container", "container_mounts", "python"):
        if getattr(site, option) is not None:
            _one_line(f"--{option.replace('_', '-')}", getattr(site, option))
    return {
        "extra_sbatch": "\n".join(lines),
        "setup": _setup_block(site.setup),
        "workdir": shlex.quote(_one_line("the directory of the submission", str(workdir))),
        "launch": _launch(site, [workdir, *mounts], gpus),
        "python": shlex.quote(site.python or sys.executable),
    }


def _setup_block(setup: Sequence[str]) -> str:
    """The `--setup` lines: shell the user writes, one line each, and no `#SBATCH` line
    (sbatch options go through `--sbatch`, which checks them)."""
    for line in setup:
        if _one_line("--setup", line).lstrip().upper().startswith("#SBATCH"):
            raise ConfigError(f"--setup {line!r}: pass sbatch options as --sbatch KEY=VALUE")
    if not setup:
        return ""
    # Module and conda scripts read unset variables: `set -u` would end the job in them.
    return "\n".join(["set +u", *setup, "set -u"])


def _launch(site: Site, mounts: Sequence[Path], gpus: bool) -> str:
    """The interpreter on the submit host (a shared file system); in a container, the
    container's `python` with the submit and run directories mounted at the same paths."""
    if not site.container:
        return shlex.quote(site.python or sys.executable)
    python = shlex.quote(site.python or "python")
    paths = _outermost(mounts)
    image, workdir = shlex.quote(site.container), shlex.quote(str(mounts[0]))
    if site.container.endswith(".sif"):
        binds = ",".join([*paths, *([site.container_mounts] if site.container_mounts else [])])
        nv = "--nv " if gpus else ""
        return f"apptainer exec {nv}--bind {shlex.quote(binds)} --pwd {workdir} {image} {python}"
    same = [f"{p}:{p}" for p in paths]
    binds = ",".join([*same, *([site.container_mounts] if site.container_mounts else [])])
    return (
        f"--container-image={image} --container-mounts={shlex.quote(binds)} "
        f"--container-workdir={workdir} {python}"
    )


def _outermost(paths: Sequence[Path]) -> list[str]:
    """`paths` without those inside another one of them."""
    unique = sorted({p.resolve() for p in paths})
    return [str(p) for p in unique if not any(o != p and p.is_relative_to(o) for o in unique)]


def _resources(cpus: int | None, partition: str | None, account: str | None) -> dict:
    """The `#SBATCH` lines of --cpus-per-task, --partition and --account, checked."""
    if cpus is not None:
        _count("--cpus-per-task", cpus)
    names = "write SLURM names: letters, digits, _ . - (partitions: comma-separated)"
    for option, value in (("--partition", partition), ("--account", account)):
        if value is not None:
            _sbatch_value(option, value, _NAMES, names)
    return {"cpus-per-task": cpus, "partition": partition, "account": account}


def _shell_words(option: str, words: Sequence[str]) -> str:
    return " ".join(shlex.quote(_one_line(option, w)) for w in words)


def _sbatch(script: Path) -> str:
    try:
        out = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True
        )
    except FileNotFoundError:
        raise SlurmError("sbatch is not installed here: run on a SLURM login node") from None
    except subprocess.CalledProcessError as e:
        raise SlurmError(f"sbatch refused {script.name}: {e.stderr.strip()}") from None
    return out.stdout.strip().split(";")[0]


def submit(
    recipe: str,
    overrides: Sequence[str],
    nodes: int,
    gpus_per_node: int,
    time: str = "01:00:00",
    ntasks_per_node: int | None = None,
    cpus_per_task: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    signal_seconds: int = 120,
    template: str | None = None,
    dry_run: bool = False,
    site: Site = Site(),
) -> str | None:
    """Render train.sbatch for `recipe` and submit it; return the job id (None for dry runs)."""
    tasks = ntasks_per_node or gpus_per_node or 1
    world = nodes * tasks
    job = f"the job has {nodes} node(s) x {tasks} task(s) = {world}"
    # Validates every layout rule on the job's size, and fixes ${now:...} in the run dir once.
    cfg = load_config(recipe, overrides, world_size=world, job=job)
    run_dir = Path(cfg.train.run_dir).resolve()
    kept = [o for o in overrides if not o.startswith(("train.run_dir=", "train.resume="))]
    script = render(
        template_path("train.sbatch", template),
        {
            "job_name": _job_name("mmfm-", "train.run_dir", run_dir.name),
            "nodes": _count("--nodes", nodes),
            "ntasks_per_node": _count("--ntasks-per-node", tasks),
            "time": _time(time),
            "signal_seconds": _count("--signal-seconds", signal_seconds),
            **_site_values(
                site,
                {
                    "gpus-per-node": _count("--gpus-per-node", gpus_per_node),
                    **_resources(cpus_per_task, partition, account),
                },
                [run_dir, Path(recipe).resolve().parent],
                gpus=bool(gpus_per_node) or any("gpu" in item for item in site.sbatch),
            ),
            "run_dir": _log_dir("train.run_dir", run_dir),
            "recipe": _shell_words("recipe", [str(Path(recipe).resolve())]),
            "overrides": _shell_words("override", kept),
        },
    )
    filled = load_config(recipe, overrides).parallel.dp_shard == -1
    print(f"layout: {describe_layout(cfg.parallel, filled)}", file=sys.stderr)
    return _write_and_submit(script, run_dir / "slurm" / "train.sbatch", dry_run, run_dir, "%j")


def _write_and_submit(script: str, path: Path, dry_run: bool, log_dir: Path, pattern: str):
    if dry_run:  # prints only: no run dir or output folder is made for a job never submitted
        print(script, end="")
        return None
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not installed here: run on a SLURM login node")
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    try:
        job = _sbatch(path)
    except SlurmError:  # a job never submitted leaves no run dir or output folder behind
        path.unlink()
        for folder in made:
            with contextlib.suppress(OSError):  # unless another process wrote there meanwhile
                folder.rmdir()
        raise
    print(f"submitted job {job}")
    print(f"log: {log_dir / ('slurm-' + pattern.replace('%j', job).replace('%A', job) + '.out')}")
    print(f"run dir: {log_dir}")
    return job


def submit_prepare(
    recipe: str,
    overrides: Sequence[str],
    parts: int,
    time: str = "01:00:00",
    cpus_per_task: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    template: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    site: Site = Site(),
) -> str | None:
    """An array job of `parts` tasks of `mmfm prepare`. The output is checked here, once: a
    changed recipe is refused before any task starts, and with `overwrite` the shards of the
    old one are removed here (not in a dry run), not by tasks racing each other."""
    prep = load_prepare_recipe(recipe, overrides)
    out = Path(prep.output).resolve()
    script = render(
        template_path("prepare.sbatch", template),
        {
            "job_name": _job_name("mmfm-prepare-", f"name in {recipe}", prep.name),
            "last_task": _count("--parts", parts) - 1,
            "parts": parts,
            "time": _time(time),
            "log_dir": _log_dir(f"output in {recipe}", out),
            **_site_values(
                site,
                _resources(cpus_per_task, partition, account),
                [out, Path(recipe).resolve().parent],
                gpus=False,
            ),
            "recipe": _shell_words("recipe", [str(Path(recipe).resolve())]),
            "overrides": _shell_words("override", overrides),
        },
    )
    if not (dry_run and overwrite):  # after every value is checked; a dry run removes nothing
        check_output(prep, overwrite)
    return _write_and_submit(script, out / "slurm" / "prepare.sbatch", dry_run, out, "%A_0")


def submit_convert(
    checkpoint: str,
    out: str,
    dtype: str = "bf16",
    time: str = "01:00:00",
    cpus_per_task: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    template: str | None = None,
    dry_run: bool = False,
    site: Site = Site(),
) -> str | None:
    out_dir = Path(out).resolve()
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32")
    script = render(
        template_path("convert.sbatch", template),
        {
            "job_name": _job_name("mmfm-convert-", "OUT", out_dir.name),
            "time": _time(time),
            "log_dir": _log_dir("OUT", out_dir),
            **_site_values(
                site,
                _resources(cpus_per_task, partition, account),
                [out_dir, Path(checkpoint).resolve()],
                gpus=False,
            ),
            "checkpoint": _shell_words("CHECKPOINT", [str(Path(checkpoint).resolve())]),
            "out": shlex.quote(str(out_dir)),
            "dtype": dtype,
        },
    )
    return _write_and_submit(script, out_dir / "slurm" / "convert.sbatch", dry_run, out_dir, "%j")
