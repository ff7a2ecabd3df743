"""Samples during training (`eval.samples`): the files of every answer at the right steps,
the media in TensorBoard, a W&B offline run and an MLflow file store (read back with their
own readers), and a resumed run with samples on as exact as a straight run without. Task
scores during training (`eval.tasks_every`): task/* in the metrics of the scored steps, in
every reporter, and a run that samples and scores has the losses of one that does neither."""

import glob
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmfm.config import load_config
from mmfm.testing import read_metrics, tiny_demo_model, tiny_shape
from mmfm.tokenization.vocab import Vocab
from mmfm.train.callbacks import TRACKERS_FILE
from mmfm.train.checkpoint import load_checkpoint_model
from mmfm.train.command import build_trainer, train

from helpers import SignalAt, tiny_visual_recipe, wandb_records

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
# The module fixture trains with W&B and MLflow on (25-35 s on 2 loaded cores): slow.
pytestmark = [pytest.mark.xdist_group("test_samples"), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BASE_VOCAB = REPO / "tokenizers/base/vocab.json"
RUN = [
    "data.num_workers=0",
    "train.global_batch_size=2",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "logging.progress=false",
]

# An answer in every modality of the unified vocabulary; the mask answers a picture prompt.
SAMPLES = [
    {"prompt": "a cat", "modality": "image", "max_new_tokens": 12, "temperature": 1.0, "seed": 1},
    {"prompt": "{image} segment the cat", "image": "cat.png", "modality": "mask",
     "max_new_tokens": 40},
    {"prompt": "a red circle", "modality": "svg", "max_new_tokens": 16},
    {"prompt": "a clip", "modality": "video", "max_new_tokens": 140},
    {"prompt": "hello", "max_new_tokens": 8},
    {"prompt": "a gene", "modality": "dna", "max_new_tokens": 8},
]  # fmt: skip


def samples_override(samples: list[dict], root: Path) -> str:
    """`eval.samples=[...]` of `samples`, their files under `root`."""
    fixed = [{k: str(root / v) if k == "image" else v for k, v in s.items()} for s in samples]
    return "eval.samples=" + json.dumps(fixed)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tasks_override(root: Path, recipe: Path) -> str:
    """`eval.tasks=[...]`: a text task and a DNA-label task (sampled, seeded) in jsonl."""
    text = _jsonl(
        root / "text.jsonl", [{"prompt": f"{i} + {i}", "response": str(2 * i)} for i in range(3)]
    )
    labels = ["promoter", "other", "promoter"]
    dna = _jsonl(
        root / "dna.jsonl",
        [{"prompt": {"dna": "TATAAAAGGC" * (1 + i)}, "response": s} for i, s in enumerate(labels)],
    )
    tasks = [
        {"name": "text", "paths": [str(text)], "tokenizers": str(recipe)},
        {
            "name": "dna-classify",
            "paths": [str(dna)],
            "tokenizers": str(recipe),
            "temperature": 1.0,
        },
    ]
    return "eval.tasks=" + json.dumps(tasks)


def unified(root: Path) -> list[str]:
    """Three steps of a tiny model on the unified vocabulary (the demo corpus's ids are ids
    of it)."""
    size = -(-Vocab.load(BASE_VOCAB).size // 64) * 64
    return [
        "data.paths=[builtin:demo]",
        *tiny_shape(n_layers=2, seq_len=64, max_seq_len=256),
        f"model.vocab_size={size}",
        f"data.vocab={BASE_VOCAB}",
        *RUN,
        "train.steps=3",
        "logging.every=1",
    ]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """`unified`, sampled and scored on two tasks every 2 steps and after the last, into
    TensorBoard, W&B (offline) and MLflow."""
    root = tmp_path_factory.mktemp("samples")
    recipe = tiny_visual_recipe(root / "tok")
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(root / "cat.png")
    overrides = [
        *unified(root),
        f"train.run_dir={root / 'run'}",
        "logging.wandb.enabled=true",
        "logging.wandb.mode=offline",
        "logging.mlflow.enabled=true",
        "eval.samples_every=2",
        f"eval.samples_tokenizers={recipe}",
        samples_override(SAMPLES, root),
        "eval.tasks_every=2",
        tasks_override(root, recipe),
    ]
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(root / name.lower()))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing answers there
        env.delenv("WANDB_API_KEY", raising=False)
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        train(load_config(None, overrides))
    return root / "run"


STEMS = ["0-image", "1-mask", "2-svg", "3-video", "4-text", "5-dna"]


def test_every_answer_is_a_file_at_the_sampled_steps(tracked):
    samples = tracked / "samples"
    assert sorted(p.name for p in samples.glob("step_*")) == ["step_2", "step_3"]
    lines = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"]) for r in lines] == [(s, k) for s in (2, 3) for k in range(6)]
    first = {f.stem.split(".")[0]: f for f in (samples / "step_2").iterdir()}
    for stem in STEMS:
        assert stem in first, (stem, sorted(first))
    assert Image.open(first["0-image"]).size == (32, 32)  # the tiny image tokenizer's pictures
    assert Image.open(first["1-mask"]).size == (32, 32)
    mask = lines[1]
    assert mask["files"] == {"image": str(tracked.parent / "cat.png")}
    span = mask["spans"][0]
    assert (span["modality"], span["path"]) == ("mask", "step_2/1-mask.png")
    image = lines[0]["spans"][0]
    assert (image["modality"], image["length"], image["closed"]) == ("image", 8, True)


def test_tensorboard_holds_the_pictures_and_texts_of_each_sampled_step(tracked):
    events = EventAccumulator(str(tracked / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert {"samples/0-image", "samples/1-mask", "samples/3-video"} <= set(images)
    shown = events.Images("samples/1-mask")
    assert [e.step for e in shown] == [2, 3]
    assert (shown[0].width, shown[0].height) == (32, 32)
    texts = {t.split("/text_summary")[0] for t in events.Tags()["tensors"]}
    assert {f"samples/{stem}" for stem in STEMS} <= texts
    prompt = events.Tensors("samples/4-text/text_summary")[0].tensor_proto.string_val[0]
    assert b"**prompt:** hello" in prompt


def test_wandb_offline_run_holds_images_html_and_video(tracked):
    files = glob.glob(str(tracked / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged = {}
    for file in files:
        for record in wandb_records(Path(file)):
            if record.WhichOneof("record_type") != "history":
                continue
            media = {}  # a media value is logged as fields nested under its key
            for item in record.history.item:
                if len(item.nested_key) == 2 and item.nested_key[0].startswith("samples/"):
                    key, name = item.nested_key
                    media.setdefault(key, {})[name] = json.loads(item.value_json)
            for key, value in media.items():
                logged.setdefault(key, []).append(value)
    kinds = {key: {v["_type"] for v in values} for key, values in logged.items()}
    assert kinds["samples/0-image"] == {"image-file"}
    assert kinds["samples/1-mask"] == {"image-file"}
    assert kinds["samples/3-video"] == {"video-file"}
    assert kinds["samples/4-text"] == kinds["samples/2-svg"] == {"html-file"}
    assert len(logged["samples/0-image"]) == 2  # steps 2 and 3
    run_files = Path(files[0]).parent / "files"
    for value in logged["samples/0-image"] + logged["samples/3-video"]:
        assert (run_files / value["path"]).is_file(), value["path"]


def test_mlflow_file_store_holds_the_images_and_artifacts(tracked):
    run_id = json.loads((tracked / TRACKERS_FILE).read_text())["mlflow"]
    client = MlflowClient((tracked / "mlruns").resolve().as_uri())
    step_2 = {Path(a.path).name for a in client.list_artifacts(run_id, "samples/step_2")}
    assert {"0-image.png", "1-mask.png", "3-video.gif", "4-text.txt", "5-dna.fasta"} <= step_2
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("samples.0-image" in p for p in images), images


def test_resumed_run_with_samples_matches_a_straight_run_without(tmp_path):
    """Sampling draws nothing from the training RNG or data: a run that samples every step,
    stopped at step 2 and resumed, has the losses of a straight run that never samples, and
    the same samples as a second run (the seeds, not the training state, drive them)."""
    base = [*tiny_demo_model(n_layers=2, seq_len=64), *RUN, "train.steps=4", "logging.every=1"]
    base += ["model.max_seq_len=128"]
    demo = [
        {"prompt": "a red square", "modality": "image", "max_new_tokens": 66, "temperature": 1.0},
        {"prompt": "hello", "max_new_tokens": 6, "temperature": 0.8, "top_k": 20, "seed": 3},
    ]
    sampled = [*base, "eval.samples_every=1", samples_override(demo, tmp_path)]

    train(load_config(None, [*base, f"train.run_dir={tmp_path / 'straight'}"]))
    interrupted = build_trainer(load_config(None, [*sampled, f"train.run_dir={tmp_path / 'r'}"]))
    with interrupted:
        interrupted.callbacks.append(SignalAt(2, signal.SIGUSR1))
        assert interrupted.fit().step == 2
    resumed = load_config(None, [*sampled, f"train.run_dir={tmp_path / 'r'}", "train.resume=auto"])
    assert train(resumed).step == 4
    again = load_config(None, [*sampled, f"train.run_dir={tmp_path / 'again'}"])
    train(again)

    straight, resumed_rows = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "r")
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed_rows, strict=True):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])
    lines = [
        [json.loads(line) for line in (tmp_path / run / "samples/samples.jsonl").open()]
        for run in ("r", "again")
    ]
    every = [(step, k) for step in range(1, 5) for k in (0, 1)]
    assert [(r["step"], r["index"]) for r in lines[0]] == every
    assert [r["new_ids"] for r in lines[0]] == [r["new_ids"] for r in lines[1]]


def test_a_checkpoint_loads_after_the_samples_files_are_gone(tracked):
    """A checkpoint's config.yaml holds the run's samples; reading it to rebuild the model
    (mmfm generate, eval, convert) ignores them, so a moved prompt file refuses nothing."""
    picture = tracked.parent / "cat.png"
    picture.rename(picture.with_suffix(".moved"))
    try:
        model, cfg = load_checkpoint_model(tracked / "checkpoints" / "step_3")
    finally:
        picture.with_suffix(".moved").rename(picture)
    assert cfg.eval.samples == [] and model.cfg.n_layers == 2
    saved = load_config(tracked / "config.yaml", ["eval.samples_every=0"])
    assert len(saved.eval.samples) == 6  # the run's own config keeps them


TASK_METRICS = {
    "task/text/exact_match",
    "task/text/token_accuracy",
    "task/dna-classify/accuracy",
    "task/dna-classify/mcc",
}


def test_task_scores_join_the_metrics_of_the_scored_steps_in_every_reporter(tracked):
    rows = {r["step"]: r for r in read_metrics(tracked)}
    assert sorted(rows) == [1, 2, 3]
    assert not any(k.startswith("task/") for k in rows[1])
    for step in (2, 3):
        assert set(rows[step]) >= TASK_METRICS, sorted(rows[step])
        assert 0.0 <= rows[step]["task/text/exact_match"] <= 1.0
    events = EventAccumulator(str(tracked / "tb"))
    events.Reload()
    scalars = {t for t in events.Tags()["scalars"]} | {
        t.split("/text_summary")[0] for t in events.Tags()["tensors"]
    }
    assert "task/text/token_accuracy" in scalars, sorted(scalars)
    run_id = json.loads((tracked / TRACKERS_FILE).read_text())["mlflow"]
    client = MlflowClient((tracked / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "task.dna-classify.accuracy")  # mlflow_name
    assert [m.step for m in history] == [2, 3]


def test_a_run_that_samples_and_scores_has_the_losses_of_one_that_does_neither(tracked):
    """What samples and task scores draw comes from their own seeded generators under a
    restored RNG, and they read no training data: the losses are those of a plain run."""
    plain = tracked.parent / "plain"
    train(load_config(None, [*unified(tracked.parent), f"train.run_dir={plain}"]))
    scored, straight = read_metrics(tracked), read_metrics(plain)
    assert [r["loss"] for r in scored] == [r["loss"] for r in straight]
