"""`eval.samples` refused before training when it could only fail later: an unknown
modality, a missing file, a file prompt without the tokenizer recipe, a prompt too long for
the model, data without a vocabulary; and sampling leaves the training RNG as it was."""

import json
from pathlib import Path

import pytest
import torch

from mmfm.config import ConfigError, load_config
from mmfm.core.errors import InputNotFound
from mmfm.testing import tiny_demo_model
from mmfm.tokenization.vocab import Vocab
from mmfm.train.command import build_trainer
from mmfm.train.samples import Samples, _drop_after, build_samples

BASE_VOCAB = Path(__file__).resolve().parents[2] / "tokenizers/base/vocab.json"

DEMO = [*tiny_demo_model(n_layers=1, seq_len=64), "logging.progress=false"]
QUIET = ["logging.tensorboard=false"]  # the reporters are not started in the last test


def samples(*items: dict, every: int = 1) -> list[str]:
    return [f"eval.samples_every={every}", "eval.samples=" + json.dumps(list(items))]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (samples({"prompt": "hi", "modality": "picture"}), r"eval\.samples\[0\]\.modality='pic"),
        (samples({"prompt": "  "}), r"eval\.samples\[0\]\.prompt is empty"),
        (samples({"prompt": "{image} the cat"}), r"has \{image\} but no image file"),
        (samples({"prompt": "a cat", "image": "x.png"}), r"\.image=x\.png but its prompt has no"),
        (samples({"prompt": "{image} x", "image": "missing.png"}), r"missing\.png: no such file"),
        (samples({"prompt": "hi", "top_p": 0}), r"eval\.samples\[0\]\.top_p must be in"),
        (samples({"prompt": "hi", "temperature": -1}), r"temperature must be >= 0"),
        (samples({"prompt": "hi", "max_new_tokens": 0}), r"max_new_tokens must be positive"),
        (["eval.samples_every=5"], r"eval\.samples is empty"),
        (["eval.samples_every=-1"], r"eval\.samples_every must be >= 0"),
        (["eval.samples_tokenizers=nope.yaml"], r"nope\.yaml: no such tokenizer recipe"),
    ],
)  # fmt: skip
def test_bad_samples_are_refused_with_the_field_named(overrides, message):
    with pytest.raises((ConfigError, InputNotFound), match=message):
        load_config(None, [*DEMO, *overrides])


def test_a_file_prompt_needs_the_tokenizer_recipe(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"")
    sample = {"prompt": "{image} segment the cat", "image": str(tmp_path / "cat.png")}
    with pytest.raises(
        ConfigError,
        match=r"\.image is a file to encode: set eval\.samples_tokenizers",
    ):
        load_config(None, [*DEMO, *samples(sample)])


def test_build_refuses_a_prompt_too_long_and_data_without_a_vocabulary(tmp_path):
    long = load_config(None, [*DEMO, *samples({"prompt": "hi", "max_new_tokens": 70})])
    with pytest.raises(ConfigError, match=r"eval\.samples\[0\]\.max_new_tokens 70 after a prompt"):
        build_samples(long, None, None, None)
    other = ["data.paths=[some/shards/]", "data.num_workers=0", *samples({"prompt": "hi"})]
    with pytest.raises(ConfigError, match=r"eval\.samples needs data\.vocab"):
        build_samples(load_config(None, [*DEMO, *other]), None, None, None)


def test_build_refuses_an_answer_the_vocabulary_or_the_tokenizers_cannot_give():
    demo = load_config(None, [*DEMO, *samples({"prompt": "a cat", "modality": "mask"})])
    with pytest.raises(ConfigError, match=r"eval\.samples\[0\]: .*has no mask spans"):
        build_samples(demo, None, None, None)
    vocab = Vocab.load(BASE_VOCAB)
    unified = [f"data.vocab={BASE_VOCAB}", f"model.vocab_size={vocab.size}"]
    cfg = load_config(None, [*DEMO, *unified, *samples({"prompt": "a cat", "modality": "image"})])
    with pytest.raises(ConfigError, match=r"image_tokenizer of eval\.samples_tokenizers: set"):
        build_samples(cfg, None, None, vocab)


def test_sampling_leaves_the_training_rng_and_model_as_they_were(tmp_path):
    sampled = {"prompt": "hello", "max_new_tokens": 8, "temperature": 1.0, "seed": 4}
    cfg = load_config(None, [*DEMO, *QUIET, f"train.run_dir={tmp_path}", *samples(sampled)])
    with build_trainer(cfg) as trainer:
        callback = next(cb for cb in trainer.callbacks if isinstance(cb, Samples))
        callback.on_fit_start(0, 1)
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.model.train()
        rng = torch.get_rng_state()
        callback.on_step_end(1, {})
        assert torch.equal(torch.get_rng_state(), rng)
        assert trainer.model.training
        for name, value in trainer.model.state_dict().items():
            assert torch.equal(value, weights[name]), name
    line = json.loads((tmp_path / "samples" / "samples.jsonl").read_text())
    assert (line["step"], line["seed"], len(line["new_ids"])) == (1, 4, 8)


def test_a_resumed_run_drops_the_sample_lines_after_its_checkpoint(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [json.dumps({"step": step, "index": 0}) for step in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + '\n{"step": 5, "ind')  # the last one cut by a crash
    _drop_after(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
