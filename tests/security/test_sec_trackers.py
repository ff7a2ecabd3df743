"""Damaged run-dir files, unreachable trackers and a full disk: one `mmfm:` line, no traceback.

A truncated `trackers.json`, an MLflow server nobody listens on (refused at start-up, in
seconds, not after MLflow's minutes of retries), a W&B tag over W&B's 64 characters, and
`metrics.jsonl` on a full disk (a write raising ENOSPC; the same error again when the file
is closed in the trainer's `finally`) each end as an `MmfmError` with its documented exit
code. The trackers run offline: W&B in offline mode, MLflow in the local file store.
"""

import errno
import json
import socket
import time
from pathlib import Path

import pytest

from mmfm.cli import main
from mmfm.config import ConfigError, load_config
from mmfm.core.errors import LaunchError, MmfmError
from mmfm.train import callbacks
from mmfm.train.callbacks import TRACKERS_FILE, MetricsFile

OFFLINE = ["logging.wandb.enabled=true", "logging.wandb.mode=offline"]
OFFLINE += ["logging.mlflow.enabled=true"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("text", ['{"wandb": "abc', "", "[1, 2]", '{"mlflow": 5}'])
def test_a_damaged_trackers_json_is_one_error_naming_it(tmp_path, text):
    (tmp_path / TRACKERS_FILE).write_text(text)
    cfg = load_config(None, OFFLINE)
    with pytest.raises(MmfmError, match=r"trackers\.json") as at_start:
        callbacks.require_trackers(cfg.logging, tmp_path)
    assert at_start.value.exit_code == 1 and "delete it" in str(at_start.value)
    for tracker in callbacks.trackers(cfg, tmp_path):  # resumed, past the start-up check
        with pytest.raises(MmfmError, match=r"trackers\.json"):
            tracker.on_fit_start(5, 10)


def test_an_unreachable_mlflow_server_is_refused_at_start_up_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # old code: fail, not wait
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = load_config(None, ["logging.mlflow.enabled=true", f"logging.mlflow.tracking_uri={uri}"])
    began = time.monotonic()
    with pytest.raises(LaunchError, match=r"logging\.mlflow\.tracking_uri .*cannot connect"):
        callbacks.require_trackers(cfg.logging, tmp_path)
    (tracker,) = callbacks.trackers(cfg, tmp_path)
    with pytest.raises(LaunchError, match=r"logging\.mlflow"):
        tracker.on_fit_start(0, 1)
    assert time.monotonic() - began < 10


def test_a_long_wandb_tag_is_a_config_error():
    with pytest.raises(ConfigError, match=r"logging\.wandb\.tags.*300 characters.*64"):
        load_config(None, [*OFFLINE, f"logging.wandb.tags=[ok,{'a' * 300}]"])
    with pytest.raises(ConfigError, match=r"logging\.wandb\.tags"):
        load_config(None, [*OFFLINE, "logging.wandb.tags=['']"])


class FullDisk:
    """A file on a full disk: every write and flush raises ENOSPC."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    flush = close = lambda self: self.write("")


def test_metrics_jsonl_on_a_full_disk_is_one_error_and_closing_it_raises_nothing(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl", every=1)
    metrics.on_fit_start(0, 2)
    metrics.file.close()
    metrics.file = FullDisk()
    with pytest.raises(LaunchError, match=r"metrics\.jsonl.*No space left") as full:
        metrics.on_step_end(1, {"loss": 1.0})
    try:
        raise full.value
    except LaunchError:
        metrics.on_fit_end()  # in the trainer's `finally`, with the error on its way out


def test_a_resume_drops_a_line_cut_by_a_crash_or_a_full_disk(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    metrics = MetricsFile(path, every=1)
    metrics.on_fit_start(2, 4)
    metrics.on_step_end(3, {"loss": 1.0})
    metrics.on_fit_end()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_full_disk_under_mmfm_train_ends_as_one_line(tmp_path, capsys, monkeypatch, demo_cache):
    """`metrics.jsonl` and `train.log` on /dev/full: each flush raises ENOSPC, and again when
    the file is closed; the log says so in one warning line, the metrics stop the run."""
    start = MetricsFile.on_fit_start

    def on_full_disk(self, start_step, total_steps):
        start(self, start_step, total_steps)
        self.file.close()
        self.file = open("/dev/full", "w")  # noqa: SIM115 (closed by on_fit_end)

    monkeypatch.setattr(MetricsFile, "on_fit_start", on_full_disk)
    tiny = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1"]
    tiny += ["model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0"]
    tiny += ["train.global_batch_size=1", "train.micro_batch_size=1", "train.steps=2"]
    tiny += ["logging.tensorboard=false", "logging.progress=false", "checkpoint.every=0"]
    tiny += ["checkpoint.at_end=false", f"data.cache_dir={demo_cache}"]
    demo = Path(__file__).resolve().parents[2] / "launch/demo.yaml"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.log").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as stop:
        main(["train", str(demo), *tiny, f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 3 and "Traceback" not in err and "Logging error" not in err, err
    assert err.count("train.log (") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mmfm: environment error:") and "metrics.jsonl" in last, err
