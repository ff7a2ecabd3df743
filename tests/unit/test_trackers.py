"""W&B (offline) and MLflow (file store) runs hold the scalars of metrics.jsonl; a resume
continues the same tracker runs; a missing tracker package is a config error."""

import glob
import json
import socket
from pathlib import Path

import pytest

from mmfm.config import ConfigError, load_config
from mmfm.core.errors import LaunchError
from mmfm.testing import read_metrics
from mmfm.train import callbacks
from mmfm.train.callbacks import TRACKERS_FILE, flat_params, mlflow_name
from mmfm.train.command import train

from helpers import wandb_records

# One worker runs this file (make test: --dist loadgroup): mlflow and wandb (~3 s of CPU to
# import) are imported there, at the tests that use them, not at every worker's collection.
pytestmark = pytest.mark.xdist_group("test_trackers")

TRACKED = [
    "data.num_workers=0",
    "train.global_batch_size=2",
    "logging.tensorboard=false",
    "logging.every=1",
    "logging.wandb.enabled=true",
    "logging.wandb.mode=offline",
    "logging.mlflow.enabled=true",
]


def wandb_history(run_dir: Path) -> tuple[set[str], dict[int, dict]]:
    """(the run ids, {step: scalars}) of every offline W&B run under `run_dir`."""
    ids, steps = set(), {}
    for file in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        for record in wandb_records(Path(file)):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = record.history.item
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                scalars = {k: v for k, v in row.items() if not k.startswith("_")}
                if scalars:  # not the bare _runtime row W&B adds at the end
                    steps[row["_step"]] = scalars
    return ids, steps


def wandb_config(run_dir: Path) -> dict:
    config = {}
    for file in glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")):
        for record in wandb_records(Path(file)):
            if record.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    return config


@pytest.fixture
def no_server(monkeypatch, tmp_path):
    """W&B's settings and caches under tmp_path, its server address a local socket that
    counts the connections made to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # set back afterwards, unlike mmfm's
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield server
    server.close()


def connections(server: socket.socket) -> int:
    count = 0
    while True:
        try:
            server.accept()[0].close()
            count += 1
        except BlockingIOError:
            return count


def test_trackers_hold_the_scalars_of_metrics_jsonl_and_a_resume_continues_their_runs(
    tiny_config, no_server
):
    first = tiny_config(*TRACKED, "train.steps=1")
    train(first)
    run_dir = Path(first.train.run_dir)
    ids = json.loads((run_dir / TRACKERS_FILE).read_text())
    train(tiny_config(*TRACKED, "train.steps=2", "train.resume=auto"))

    rows = {row.pop("step"): row for row in read_metrics(run_dir)}
    assert list(rows) == [1, 2]
    assert json.loads((run_dir / TRACKERS_FILE).read_text()) == ids  # the same runs

    wandb_ids, history = wandb_history(run_dir)
    assert wandb_ids == {ids["wandb"]}  # two offline run folders, one run id
    assert history == rows
    assert wandb_config(run_dir)["model"]["dim"] == first.model.dim

    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]] and runs[0].info.status == "FINISHED"
    for name in {name for row in rows.values() for name in row}:
        logged = client.get_metric_history(ids["mlflow"], mlflow_name(name))
        expected = {step: row[name] for step, row in rows.items() if name in row}
        assert {m.step: m.value for m in logged} == expected, name
    assert runs[0].data.params == flat_params(first)  # the first run's: params cannot change
    assert connections(no_server) == 0


def test_wandb_online_without_a_login_is_an_environment_error(tmp_path, no_server, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_MODE")
    cfg = load_config(None, ["logging.wandb.enabled=true"])
    (tracker,) = callbacks.trackers(cfg, tmp_path)
    with pytest.raises(LaunchError, match=r"wandb login.*logging\.wandb\.mode=offline"):
        tracker.on_fit_start(0, 1)
    assert connections(no_server) == 0


def test_a_run_that_raises_is_a_failed_mlflow_run(tmp_path, no_server):
    (tracker,) = callbacks.trackers(load_config(None, ["logging.mlflow.enabled=true"]), tmp_path)
    tracker.on_fit_start(0, 1)
    with pytest.raises(KeyError):
        try:
            raise KeyError("a step that fails")
        finally:  # as in Trainer.fit
            tracker.on_fit_end()
    from mlflow.tracking import MlflowClient

    run = MlflowClient((tmp_path / "mlruns").as_uri()).get_run(tracker.run_id)
    assert run.info.status == "FAILED"


def test_a_missing_tracker_package_is_refused_before_anything_is_built(tiny_config, monkeypatch):
    real = callbacks.importlib.util.find_spec
    monkeypatch.setattr(
        callbacks.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n)
    )
    cfg = tiny_config("logging.mlflow.enabled=true")
    with pytest.raises(ConfigError, match=r"pip install 'mmfm\[mlflow\]'"):
        train(cfg)
    assert not Path(cfg.train.run_dir).exists()


def test_mlflow_names_keep_a_metric_and_its_parts_apart():
    assert mlflow_name("loss") != mlflow_name("loss/text") == "loss.text"
    assert mlflow_name("data/mix/a+b") == "data.mix.a_b"
