"""Vocabulary fingerprints: shards or a checkpoint made with another vocabulary are refused
at training start-up with one line naming both files and the fix."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmfm.cli import main
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.testing import tiny_shape
from mmfm.tokenization.vocab import RESERVED_CODEBOOKS, Vocab, VocabError

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_sec_vocab")

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "tokenizers/base.yaml")
BASE_VOCAB = REPO / "tokenizers/base/vocab.json"


def small(text_size=300, specials=("<class_0>",), dna=("dna", 5, "ACGTN"), model=b"model"):
    return Vocab.build(text_size, specials, [*RESERVED_CODEBOOKS, dna], text_model=model)


def test_the_fingerprint_is_the_layout_and_nothing_else(tmp_path):
    v = small()
    # Pinned: the same layout hashes the same on every machine and Python.
    assert v.fingerprint == small().fingerprint == "c492639554e0fc2b"
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json").fingerprint == v.fingerprint
    others = [
        small(text_size=301),
        small(specials=("<class_1>",)),
        small(dna=("dna", 19530)),
        small(model=b"another model of the same size"),
        Vocab.build(300, ("<class_0>",), [*RESERVED_CODEBOOKS, ("dna", 5, "ACGTN")]),
    ]
    assert len({v.fingerprint, *(o.fingerprint for o in others)}) == 1 + len(others)
    code = "from mmfm.tokenization.vocab import Vocab; import sys; "
    code += "print(Vocab.load(sys.argv[1]).fingerprint)"
    out = subprocess.run(
        [sys.executable, "-c", code, str(BASE_VOCAB)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == Vocab.load(BASE_VOCAB).fingerprint


def test_an_edited_vocab_file_is_refused(tmp_path):
    small().save(tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    data["codebooks"][-1]["size"] = 4  # one DNA code fewer, sizes made consistent
    data["codebooks"][-1]["pieces"] = list("ACGT")
    data["size"] -= 1
    (tmp_path / "v.json").write_text(json.dumps(data))
    with pytest.raises(VocabError, match=r"v\.json: vocabulary declares fingerprint .* edited"):
        Vocab.load(tmp_path / "v.json")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Shards prepared with the base vocabulary (tokenizers/base)."""
    root = tmp_path_factory.mktemp("prepared")
    lines = (json.dumps({"text": f"line {i}: in the beginning"}) for i in range(40))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"name: t\noutput: {root / 'out'}\ntokenizer: {TOKENIZER}\nshard_size: 20\n"
        f"sources:\n  - {{kind: text, paths: [{root / 'a.jsonl'}]}}\n"
    )
    prepare(load_prepare_recipe(recipe), progress=False)
    return root / "out"


def train_args(tmp_path, *overrides) -> list[str]:
    return [
        "train",
        "launch/demo.yaml",
        "model.vocab_size=45056",
        *tiny_shape(n_layers=1, seq_len=64),
        "data.num_workers=0",
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        "train.steps=1",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"train.run_dir={tmp_path / 'run'}",
        *overrides,
    ]


def refused(capsys, args) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmfm: tokenizer error: "), err
    return err


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def test_the_manifest_records_the_fingerprint(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["vocab_fingerprint"] == Vocab.load(BASE_VOCAB).fingerprint
    assert Vocab.load(prepared / "vocab.json").fingerprint == manifest["vocab_fingerprint"]


def test_shards_of_another_vocabulary_are_refused(prepared, tmp_path, capsys):
    other = small()  # a layout of 300 text ids, as convert from-hf grows a small LLM
    other.save(tmp_path / "extended.json")
    args = train_args(tmp_path, f"data.paths=[{prepared}]")
    err = refused(capsys, [*args, f"data.vocab={tmp_path / 'extended.json'}"])
    assert str(prepared / "manifest.json") in err and str(tmp_path / "extended.json") in err
    assert "Prepare" in err and "again" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    main([*args, f"data.vocab={BASE_VOCAB}"])  # the vocabulary they were made with: trains
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "vocab.json").is_file()


def test_a_checkpoint_of_another_vocabulary_is_refused(prepared, tmp_path, capsys):
    """`convert from-hf --extend-vocab` writes a checkpoint whose vocab.json is the extended
    vocabulary: base-vocabulary shards and data.vocab must not start from it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    small().save(ckpt / "vocab.json")  # as convert from-hf grows a small LLM
    args = train_args(tmp_path, f"data.paths=[{prepared}]")
    err = refused(capsys, [*args, f"train.init_from={ckpt}"])  # no data.vocab
    assert str(prepared / "manifest.json") in err and str(ckpt / "vocab.json") in err
    err = refused(capsys, [*args, f"train.init_from={ckpt}", f"data.vocab={BASE_VOCAB}"])
    assert str(BASE_VOCAB) in err and str(ckpt / "vocab.json") in err
    assert f"set data.vocab to {ckpt / 'vocab.json'}" in err
    err = refused(capsys, [*args, f"train.resume={ckpt}", f"data.vocab={BASE_VOCAB}"])
    assert "checkpoint this run starts from" in err


def test_sources_of_two_vocabularies_are_refused(prepared, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    (other / "manifest.json").unlink()  # as while a prepare is still writing: vocab.json only
    small().save(other / "vocab.json")
    sources = f"data.sources=[{{name: a, paths: [{prepared}]}}, {{name: b, paths: [{other}]}}]"
    err = refused(capsys, train_args(tmp_path, "data.paths=[]", sources))
    assert "'b'" in err and str(other / "vocab.json") in err
    assert str(prepared / "manifest.json") in err


def test_shards_without_a_manifest_are_accepted_with_a_note(tiny_config):
    from mmfm.train.command import build_trainer

    trainer = build_trainer(tiny_config())  # the built-in demo corpus
    trainer.loader.close()
    trainer.env.close()
    log = (Path(trainer.cfg.train.run_dir) / "train.log").read_text()
    assert "data source 'data' (built-in or remote shards)" in log
    assert "its vocabulary is not checked" in log
