"""Held-out evaluation: `mmfm eval` and validation during training (mmfm/train/evaluate.py)."""

import json
import math

import numpy as np
import pytest

from mmfm.cli import main
from mmfm.config import ConfigError, load_config
from mmfm.config.schema import SourceConfig
from mmfm.core.types import MODALITY_NAMES, Modality
from mmfm.data.demo import TEXT_OFFSET, demo_documents
from mmfm.data.shards import write_shard
from mmfm.parallel.env import ParallelEnv
from mmfm.parallel.parallelize import parallelize
from mmfm.testing import read_metrics
from mmfm.tokenization.text import TextTokenizer
from mmfm.tokenization.vocab import Vocab
from mmfm.train.callbacks import MetricsFile, Progress, format_metrics
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.command import build_trainer, train
from mmfm.train.evaluate import Evaluator, text_byte_table
from mmfm.train.step_runner import build_step_runner

from helpers import TINY

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_eval")

REL = 1e-5


def test_eval_of_one_batch_equals_the_training_loss_of_that_batch(tiny_config, tmp_path):
    cfg = tiny_config(
        "train.steps=1",
        "checkpoint.at_end=false",
        "data.loss_weights.dna=0.5",
        "data.num_workers=0",
    )
    trainer = build_trainer(cfg)
    try:
        initial = trainer.save()  # step_0: the weights the first training step is computed with
        trainer.fit()
    finally:
        trainer.loader.close()
        trainer.env.close()
    trained = read_metrics(tmp_path / "run")[0]
    out = tmp_path / "eval.json"
    main(["eval", str(initial), "builtin:demo", "--steps", "1", "--json", str(out)])
    got = json.loads(out.read_text())
    assert got["loss"] == pytest.approx(trained["loss"], rel=REL)  # weighted as in training
    assert "dna" in got["modalities"]  # so the weighting shows
    assert got["loss"] != pytest.approx(got["loss_unweighted"], rel=1e-4)
    for name, row in got["modalities"].items():
        assert row["loss"] == pytest.approx(trained[f"loss/{name}"], rel=REL), name
    assert got["rows"] == cfg.train.global_batch_size and got["steps"] == 1


@pytest.fixture
def held_out(tmp_path):
    """A shard of 30 demo documents and what a whole pass must see of it."""
    docs = demo_documents(3)[:30]
    path = tmp_path / "held_out.tar"
    write_shard(path, docs)
    targets = dict.fromkeys(MODALITY_NAMES, 0)
    text_bytes = 0
    for doc in docs:
        for modality in doc.modality[1:]:
            targets[MODALITY_NAMES[modality]] += 1
        ids, modality = doc.tokens[1:], doc.modality[1:]
        is_byte = (modality == Modality.TEXT) & (ids >= TEXT_OFFSET) & (ids < TEXT_OFFSET + 256)
        text_bytes += int(is_byte.sum())
    return path, targets, text_bytes


def test_a_whole_pass_sees_every_held_out_target_once_and_the_same_each_time(tiny_config, held_out):
    path, targets, text_bytes = held_out
    cfg = tiny_config("data.seq_len=64")  # documents longer than a row are split
    env = ParallelEnv.from_config(cfg.parallel, "cpu")
    model = build_step_runner(cfg, env, parallelize(cfg, env))
    table = text_byte_table(None, cfg.model.vocab_size)
    evaluator = Evaluator(cfg, env, model, [SourceConfig("v", [str(path)])], 0, table)
    first, second = evaluator.run(), evaluator.run()
    assert first == second
    assert first.targets == pytest.approx(targets)
    assert first.text_bytes == text_bytes
    assert first.weighted_targets == sum(targets.values())
    assert first.bits_per_byte == pytest.approx(first.ce["text"] / math.log(2) / text_bytes)
    capped = Evaluator(cfg, env, model, [SourceConfig("v", [str(path)])], 2, table).run()
    assert capped.steps == 2 < first.steps
    assert model.model.training  # put back in training mode


def test_text_bytes_of_a_sentencepiece_vocab_are_the_utf8_bytes():
    vocab = Vocab.load("tokenizers/base/vocab.json")
    table = text_byte_table(vocab, vocab.size)
    text = "Plain words, ümlauts, — dashes, ✓ marks,\n  spaces and the ▁ meta symbol"
    ids = TextTokenizer(vocab.text_model).encode(text)
    assert float(table[ids].sum()) == len(text.encode())
    assert table[vocab.text_size :].sum() == 0  # specials and codes are no text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_cache) -> str:
    """A checkpoint of the tiny model after one step."""
    run_dir = tmp_path_factory.mktemp("trained")
    extra = [f"data.cache_dir={demo_cache}", f"train.run_dir={run_dir}", "data.num_workers=0"]
    train(load_config(None, [*TINY, *extra, "train.steps=1"]))
    return str(run_dir / "checkpoints" / "step_1")


def test_raw_text_file(checkpoint, tmp_path, capsys):
    paragraphs = ["the small model reads the token.", "the long shard packs the cell."]
    text = tmp_path / "notes.txt"
    text.write_text("\n\n\n".join(paragraphs) + "\n")
    out = tmp_path / "eval.json"
    main(["eval", checkpoint, str(text), "--json", str(out)])
    got = json.loads(out.read_text())["modalities"]["text"]
    # <bos> text <eos> per paragraph: every byte and the <eos> are targets
    n_bytes = sum(len(p.encode()) for p in paragraphs)
    assert got["targets"] == n_bytes + len(paragraphs)
    assert got["bytes"] == n_bytes
    assert "bits/byte" in capsys.readouterr().out


def test_validation_is_exact_on_resume_and_leaves_training_alone(tiny_config, tmp_path):
    val = ["eval.paths=[builtin:demo]", "eval.every=2", "eval.steps=1", "eval.keep_best=true"]
    common = ["train.steps=4", "checkpoint.every=2", "data.num_workers=0"]
    straight = tmp_path / "straight"
    train(tiny_config(*common, *val, f"train.run_dir={straight}"))
    without = tmp_path / "without"
    train(tiny_config(*common, f"train.run_dir={without}"))
    resumed = tmp_path / "resumed"
    step2 = straight / "checkpoints/step_2"
    train(tiny_config(*common, *val, f"train.resume={step2}", f"train.run_dir={resumed}"))

    want, plain, got = read_metrics(straight), read_metrics(without), read_metrics(resumed)
    assert [r["loss"] for r in want] == [r["loss"] for r in plain]  # same training stream
    assert [r["step"] for r in want if "val/loss" in r] == [2, 4]
    assert "val/loss" not in plain[1]
    assert [r["step"] for r in got] == [3, 4]
    for g, w in zip(got, want[2:], strict=True):
        for key in ("loss", "grad_norm", "val/loss", "val/loss/text"):
            assert (key in g) == (key in w)
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=REL), (g["step"], key)

    best = json.loads((straight / "checkpoints/best/best.json").read_text())
    vals = {r["step"]: r["val/loss"] for r in want if "val/loss" in r}
    assert best == {"step": min(vals, key=vals.get), "val/loss": min(vals.values())}
    checkpoints = Checkpointer(straight / "checkpoints", keep=3)
    assert checkpoints.latest().name == "step_4"  # resume=auto never picks best/
    assert (straight / "checkpoints/best/.metadata").is_file()


def test_val_metrics_are_written_on_steps_that_are_not_logged(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl", every=10)
    metrics.on_fit_start(0, 20)
    metrics.on_step_end(3, {"loss": 1.0, "lr": 1e-3, "val/loss": 2.0})
    metrics.on_step_end(4, {"loss": 1.0, "lr": 1e-3})
    metrics.on_fit_end()
    assert [r["step"] for r in read_metrics(tmp_path)] == [3]
    line = format_metrics({"loss": 1.0, "lr": 1e-3, "tokens_per_s": 5.0, "val/loss": 2.0})
    assert "val 2.0000" in line
    progress = Progress(enabled=False, print_every=100)
    progress.on_fit_start(0, 20)
    progress.on_step_end(5, {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 5.0, "val/loss": 2.5})
    assert progress.last_val == 2.5


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["eval.every=0"], "eval.every"),
        (["eval.steps=-1"], "eval.steps"),
        (["eval.keep_best=true"], "eval.keep_best"),
        (["eval.paths=[a]", "eval.sources=[{name: b, paths: [c]}]"], "eval.paths"),
    ],
)
def test_bad_eval_config_names_the_field(tiny_config, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(*overrides)


def test_eval_of_a_directory_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path), "builtin:demo"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an mmfm checkpoint" in err


def test_eval_reports_bad_held_out_documents(checkpoint, tmp_path):
    docs = demo_documents(2)[:20]
    bad = docs[5]
    docs[5] = type(bad)(np.zeros(0, np.int32), np.zeros(0, np.uint8), bad.key)
    write_shard(tmp_path / "held.tar", docs)
    out = tmp_path / "eval.json"
    shard = tmp_path / "held.tar"
    main(["eval", checkpoint, str(shard), "--json", str(out), "data.max_error_rate=1"])
    assert json.loads(out.read_text())["skipped"] == {"empty": 1}
