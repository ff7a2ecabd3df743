"""`mmfm slurm submit` against a real SLURM (slurmctld + slurmd + munge) started here.

The daemons come from Debian's packages, which .ci/run installs (this file installs nothing:
without them the tests that need a cluster skip outside CI and fail in CI, `CI=true`), and
run as root with a configuration under a temporary directory. The test submits a 2-task
data-parallel job, then a longer one that gets the pre-timeout SIGUSR1 mid-run: it must
checkpoint, requeue itself, resume and end with the loss of an uninterrupted run. The 2-task
job also has a `--setup` line exporting a variable its training processes then read. The
rendered script (`--setup`, `--container`, `--sbatch`) is checked without a cluster too.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfm.cli import main
from mmfm.testing import free_port, read_metrics, tiny_shape, train_metrics

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_slurm")

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _require_slurm() -> None:
    """Skip on a machine without SLURM, but never in CI, where a missing daemon would hide the
    feature behind a skip: .ci/run installs them."""
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(b)]
    if not missing:
        return
    reason = (
        f"SLURM is not installed (no {', '.join(missing)}): apt-get install {' '.join(PACKAGES)}"
    )
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}; CI must run this test (.ci/run installs them)")
    pytest.skip(reason)


def _config(root: Path, host: str) -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    return f"""ClusterName=mmfmtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MpiDefault=none
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _require_slurm()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "munge").chmod(0o755)
    munge = root / "munge"
    subprocess.run(
        ["munged", "--force", f"--socket={munge}/munge.socket.2", f"--key-file={key}",
         f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
         f"--seed-file={munge}/munged.seed"],
        check=True,
    )  # fmt: skip
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_config(root, host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
        if state.stdout.strip() == "idle":
            break
        time.sleep(1)
    else:
        pytest.fail(
            f"the SLURM node never became idle: {(root / 'log/slurmctld.log').read_text()[-2000:]}"
        )
    yield env
    for pid_file in (root / "slurmd.pid", root / "slurmctld.pid", munge / "munged.pid"):
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


TINY = [
    *tiny_shape(n_layers=2, seq_len=128), "data.num_workers=0", "logging.print_every=1000",
    "logging.tensorboard=false", "checkpoint.every=1000",
]  # fmt: skip


def submit(env, run_dir, steps, *extra) -> str:
    """A 2-task job; no --cpus-per-task: the tasks share what the job gets on the node."""
    cmd = [sys.executable, "-m", "mmfm", "slurm", "submit", str(REPO / "launch/demo.yaml")]
    cmd += ["--nodes", "1", "--ntasks-per-node", "2"]
    cmd += ["--time", "00:10:00", "parallel.dp_shard=2", *TINY, f"train.steps={steps}"]
    cmd += [f"train.run_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'cache'}", *extra]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=env, check=True, cwd=run_dir.parent
    )
    assert f"log: {run_dir}/slurm-" in out.stdout
    return out.stdout.split()[2]


def job_state(env, job) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env
    )
    return out.stdout.strip()


def wait_until_gone(env, job, timeout=240):
    deadline = time.time() + timeout
    while job_state(env, job) and time.time() < deadline:
        time.sleep(1)
    assert not job_state(env, job), f"job {job} still {job_state(env, job)}"


def test_two_task_job_trains_and_checkpoints(slurm, tmp_path):
    """Also the site set-up: the `--setup` line's variable reaches the training processes
    (rank 0 logs it with the NCCL settings and the rank table), a relative path of the recipe
    resolves in the submit directory, and the `--sbatch` line reaches sbatch."""
    run = tmp_path / "run"
    site = ["--setup", "export NCCL_SOCKET_IFNAME=lo", "--sbatch", "mem=200M"]
    job = submit(slurm, run, 6, *site, "data.cache_dir=relative-cache")
    wait_until_gone(slurm, job)
    log = (run / f"slurm-{job}.out").read_text()
    assert "2 tasks, restart 0" in log and "layout dp_shard=2" in log
    assert "NCCL settings: NCCL_SOCKET_IFNAME=lo TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in log
    assert (tmp_path / "relative-cache").is_dir() and not (tmp_path / "cache").exists()
    assert "\n#SBATCH --mem=200M\n" in (run / "slurm" / "train.sbatch").read_text()
    table = log.split("ranks (NCCL settings: ")[1].splitlines()[1:4]
    assert table[0].split() == ["rank", "host", "device", "gpu", "dp_shard"]
    host = socket.gethostname().split(".")[0]
    assert [row.split() for row in table[1:]] == [
        ["0", host, "cpu", "-", "0"],
        ["1", host, "cpu", "-", "1"],
    ]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))
    assert (run / "checkpoints" / "step_6" / "train_state.json").is_file()


@pytest.mark.slow  # 60 steps on 2 tasks, a requeue and a reference run: 81 s, loaded
def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    # The signal comes after step 10 and the handler saves 2-3 steps later on loaded cores:
    # the other steps are a fast machine's margin and the resumed part. At 120 steps the test
    # took 167 s on the same loaded cores (28 s of them the job's steps, 40 s the reference).
    run, steps = tmp_path / "run", 60
    job = submit(slurm, run, steps)
    deadline = time.time() + 120
    while time.time() < deadline:  # let it train a little
        if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 10:
            break
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=slurm)
    deadline = time.time() + 120
    while job_state(slurm, job) not in ("PENDING", "") and time.time() < deadline:
        time.sleep(0.5)
    assert job_state(slurm, job) == "PENDING", "the job did not requeue itself"
    # SLURM holds a requeued job back until the old job's credential expires (cred_expire=10
    # here): starting it sooner gets it killed as "credential revoked". Then release it, unless
    # the controller already has ("Job is no longer pending": no check, the outcome is below).
    time.sleep(12)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm)
    wait_until_gone(slurm, job)

    log = (run / f"slurm-{job}.out").read_text()
    assert "SIGUSR1 received: saved" in log and f"requeued SLURM job {job}" in log
    assert "restart 1" in log and "resumed from" in log
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 2 and f"step_{steps}" in saved  # the signal's checkpoint, and the end
    reference = train_metrics(
        [*TINY, f"train.steps={steps}", f"train.run_dir={tmp_path / 'ref'}",
         f"data.cache_dir={tmp_path / 'cache'}"],
        recipe=REPO / "launch/demo.yaml",
    )  # fmt: skip
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[-1]["loss"] == pytest.approx(reference[-1]["loss"], rel=1e-5)


def test_prepare_array_job_writes_every_shard_and_the_manifest(slurm, tmp_path, real_data):
    real_data("kjv")
    recipe = tmp_path / "prep.yaml"
    recipe.write_text(
        f"name: t\noutput: {tmp_path / 'out'}\ntokenizer: {REPO / 'tokenizers/base.yaml'}\n"
        "shard_size: 20\nsources:\n  - {kind: text, paths: [real:kjv], limit: 100}\n"
    )
    cmd = [sys.executable, "-m", "mmfm", "slurm", "prepare", str(recipe), "--parts", "2"]
    cmd += ["--cpus-per-task", "1", "--time", "00:05:00"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=slurm, cwd=REPO, check=True)
    job = out.stdout.split()[2]
    wait_until_gone(slurm, job)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples"] == 100 and len(manifest["shards"]) == 5


def test_dry_run_prints_the_job_and_checks_the_layout(tmp_path):
    cmd = [sys.executable, "-m", "mmfm", "slurm", "submit", str(REPO / "launch/demo.yaml")]
    cmd += ["--nodes", "2", "--gpus-per-node", "8", "--time", "04:00:00", "--partition", "gpu"]
    cmd += ["--dry-run", f"train.run_dir={tmp_path / 'run'}", "train.micro_batch_size=1"]
    layout = ["parallel.dp_replicate=2", "parallel.dp_shard=4", "parallel.tp=2"]
    out = subprocess.run([*cmd, *layout], capture_output=True, text=True, check=True)
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu"):
        assert f"#SBATCH {line}" in out.stdout
    assert "--signal=USR1@120" in out.stdout and "--requeue" in out.stdout
    assert f"train.run_dir={tmp_path / 'run'} train.resume=auto" in out.stdout
    bad = subprocess.run([*cmd, "parallel.dp_shard=4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "2 node(s) x 8 task(s) = 16" in bad.stderr


def _dry_run(capsys, tmp_path, *options) -> str:
    main(["slurm", "submit", str(REPO / "launch/demo.yaml"), "--dry-run", *options,
          f"train.run_dir={tmp_path / 'run'}"])  # fmt: skip
    return capsys.readouterr().out


def test_setup_container_and_sbatch_lines_in_the_script(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    site = ["--setup", "module load cuda/12.4", "--setup", "export NCCL_IB_HCA=mlx5_0"]
    site += ["--sbatch", "qos=high", "--sbatch", "exclusive=", "--sbatch=--constraint=a100"]
    script = _dry_run(capsys, tmp_path, *site, "--container", "nvcr.io#nvidia/pytorch:24.05-py3")
    assert f"\ncd {tmp_path}  #" in script and "--cpus-per-task" not in script.split("set -e")[0]
    for line in ("--qos=high", "--exclusive", "--constraint=a100"):
        assert f"\n#SBATCH {line}\n" in script
    assert "set +u\nmodule load cuda/12.4\nexport NCCL_IB_HCA=mlx5_0\nset -u\n" in script
    setup, srun = script.index("\nmodule load"), script.index("\nsrun ")
    assert script.index(f"cd {tmp_path}") < setup < srun
    mounts = sorted(p.resolve() for p in (tmp_path, REPO / "launch"))  # wherever the clone is
    pyxis = (
        "--container-image='nvcr.io#nvidia/pytorch:24.05-py3' "
        f"--container-mounts={','.join(f'{m}:{m}' for m in mounts)} "
        f"--container-workdir={tmp_path} python -m mmfm train"
    )
    assert pyxis in script
    image = tmp_path / "mmfm.sif"
    script = _dry_run(capsys, tmp_path, "--gpus-per-node", "1", "--container", str(image),
                      "--container-mounts", "/data", "--python", "python3")  # fmt: skip
    binds = ",".join([*map(str, mounts), "/data"])
    assert f"apptainer exec --nv --bind {binds} --pwd {tmp_path} {image} python3 -m mmfm" in script
    assert "#SBATCH --gpus-per-node=1" in script


@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("exclusive", "write KEY=VALUE"),
        ("m=1G", "write KEY=VALUE"),
        ("ntasks=16", "the job's size must match the layout"),
        ("nodes=2", "use --nodes"),
        ("time=1:00:00", "use --time"),
        ("output=x.out", "the template sets it"),
        ("comment=two words", "one word"),
    ],
)
def test_a_bad_sbatch_item_is_one_config_error(capsys, tmp_path, item, why):
    with pytest.raises(SystemExit) as refused:
        _dry_run(capsys, tmp_path, "--sbatch", item)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and why in err and item in err and len(err.splitlines()) == 1
