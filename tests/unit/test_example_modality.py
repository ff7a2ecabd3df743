"""The example modality of docs/adding_a_modality.md (tests/protein_modality.py), end to end:
registered by one call, laid out in a vocabulary, tokenized and decoded, prepared from a FASTA
file by a spawned worker, trained a few steps by a tiny model with a loader worker, generated
into a FASTA file; and data naming it refused, by name, once it is not registered."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from protein_modality import AMINO_ACIDS, PROTEIN

from mmfm.config.schema import LossConfig
from mmfm.core import modalities
from mmfm.core.errors import ConfigError
from mmfm.core.modalities import (
    ENTRY_POINTS,
    ModalitySpec,
    modality_spec,
    register_modality,
    unregister_modality,
)
from mmfm.core.types import MODALITY_NAMES, Modality, ModalityRecord
from mmfm.data.shards import ShardError, read_shard
from mmfm.decoding.sampling import Sampling
from mmfm.generate.command import GenerateArgs, run
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.prepare.recipe import source_kinds
from mmfm.testing import tiny_shape, train_metrics
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers, build_vocab
from mmfm.tokenization.vocab import FIXED_SPECIALS, Vocab, VocabError

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_example_modality")


@pytest.fixture(scope="module")
def protein():
    """Registered while this module runs: other tests see the six built-in modalities."""
    register_modality(PROTEIN)
    yield PROTEIN
    unregister_modality("protein")


@pytest.fixture(scope="module")
def tokenizer_recipe(protein, tmp_path_factory):
    root = tmp_path_factory.mktemp("protein")
    path = root / "tokenizer.yaml"
    path.write_text(
        f"name: protein\noutput_dir: {root / 'tok'}\nmodalities: [protein]\n"
        "text: {vocab_size: 400, max_corpus_mb: 0.3}\ndna: {scheme: char}\n"
    )
    Tokenizers.train(load_recipe(path))
    return path


@pytest.fixture(scope="module")
def tokenizers(tokenizer_recipe) -> Tokenizers:
    return Tokenizers.load(load_recipe(tokenizer_recipe))


@pytest.fixture(scope="module")
def prepared(tokenizer_recipe):
    """60 random proteins (a description each) and one with a letter that is no amino acid,
    prepared into shards of 40 records."""
    root = tokenizer_recipe.parent
    rng = np.random.default_rng(0)
    residues = ["".join(rng.choice(list(AMINO_ACIDS), 40)) for _ in range(60)]
    fasta = [f">p{i} kinase {i % 3}\n{seq}" for i, seq in enumerate(residues)]
    (root / "proteins.fasta").write_text("\n".join([*fasta, ">bad\nMKXB"]) + "\n")
    (root / "prepare.yaml").write_text(
        f"name: p\noutput: {root / 'shards'}\ntokenizer: {tokenizer_recipe}\nshard_size: 40\n"
        f"sources:\n  - {{kind: protein, paths: [{root / 'proteins.fasta'}]}}\n"
    )
    return root / "shards", prepare(load_prepare_recipe(root / "prepare.yaml"), progress=False)


def test_an_installed_entry_point_is_registered_at_first_use(monkeypatch):
    had = modality_spec("protein") is not None
    point = EntryPoint("protein", "protein_modality:PROTEIN", ENTRY_POINTS)
    monkeypatch.setattr(modalities, "entry_points", lambda group: [point] * (group == ENTRY_POINTS))
    monkeypatch.setattr(modalities, "_LOADED", [False])  # as in a fresh process
    try:
        assert modality_spec("protein") == PROTEIN and "protein" in MODALITY_NAMES
    finally:
        if not had:
            unregister_modality("protein")


def test_one_registration_names_it_in_every_layer(protein):
    assert MODALITY_NAMES[: len(Modality)] == ("text", "image", "mask", "dna", "svg", "video")
    assert MODALITY_NAMES.index("protein") == len(Modality) == register_modality(PROTEIN)
    assert "protein" in source_kinds()
    weights = LossConfig("modality_mean", modality_weights={"protein": 2.0}).modality_weights
    assert weights == {"protein": 2.0}
    with pytest.raises(ConfigError, match="unknown modality 'rna'"):
        LossConfig("modality_mean", modality_weights={"rna": 2.0})
    for name in ("dna", "Protein"):
        with pytest.raises(ValueError, match="lower-case identifier"):
            ModalitySpec(name, ("<a>", "</a>"), 4, list, list)
    with pytest.raises(ValueError, match="registered already"):
        register_modality(ModalitySpec("protein", ("<p>", "</p>"), 4, list, list))


def test_its_codebook_follows_the_built_in_ones_and_its_documents_round_trip(tokenizers):
    vocab = tokenizers.vocab
    assert vocab.modalities == ("protein",)
    assert vocab.specials[-2:] == ("<protein>", "</protein>")
    assert vocab.specials[: len(FIXED_SPECIALS)] == FIXED_SPECIALS
    book = vocab.codebook("protein")
    assert [b.name for b in vocab.codebooks] == ["image", "mask", "video", "dna", "protein"]
    assert (book.offset + book.size, vocab.piece(book.offset + 3)) == (vocab.size, "<protein_E>")
    plain = build_vocab(replace(tokenizers.recipe, modalities=[]), tokenizers.text, tokenizers.dna)
    assert plain.specials == vocab.specials[:-2]  # without it: the vocabulary of before
    assert [(b.name, b.offset + 2, b.size) for b in plain.codebooks] == [
        (b.name, b.offset, b.size) for b in vocab.codebooks[:-1]
    ]
    doc = tokenizers.encode(ModalityRecord("k", "protein", "MKTAY", text="a kinase"))
    start, end = vocab.delimiters(MODALITY_NAMES.index("protein"))
    codes = [book.offset + AMINO_ACIDS.index(c) for c in "MKTAY"]
    assert doc.tokens.tolist()[-8:] == [start, *codes, end, tokenizers.text.eos_id]
    assert [s[0] for s in doc.segments()] == ["text", "protein", "text"]
    assert tokenizers.decode(doc.tokens) == [("text", "a kinase"), ("protein", "MKTAY")]
    with pytest.raises(ValueError, match="not an amino-acid letter"):
        tokenizers.encode(ModalityRecord("k", "protein", "MKX"))


def test_prepared_from_fasta_trained_and_generated_back_to_fasta(prepared, tmp_path):
    shards, manifest = prepared
    assert manifest["samples"] == 60 and manifest["rejected"] == {"tokenizer_error": 1}
    assert manifest["tokens_by_modality"]["protein"] == 60 * 42  # 40 codes + 2 delimiters
    doc = next(read_shard(str(shards / "p-000000.tar")))
    assert [s[0] for s in doc.segments()] == ["text", "protein", "text"]
    vocab = Vocab.load(shards / "vocab.json")
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_shape(n_layers=2, seq_len=64),
        f"model.vocab_size={-(-vocab.size // 64) * 64}",
        f"data.paths=[{shards}]",
        f"data.vocab={shards / 'vocab.json'}",
        "data.num_workers=1",  # a spawned worker that gets the registration from the trainer
        *("train.global_batch_size=4", "train.micro_batch_size=4", "train.steps=4"),
        *("optim.lr=3e-3", "optim.warmup_steps=1", f"train.run_dir={run_dir}"),
        *("logging.progress=false", "logging.tensorboard=false", "logging.print_every=1"),
    ]
    metrics = train_metrics(overrides)
    assert len(metrics) == 4 and all(np.isfinite(m["loss/protein"]) for m in metrics)
    out = tmp_path / "gen"
    sampling = Sampling(max_new_tokens=12)  # greedy; no trained span closes at once
    ckpt = str(run_dir / "checkpoints/step_4")
    run(GenerateArgs(ckpt, ["kinase 1"], str(out), modality="protein", sampling=sampling))
    span = json.loads((out / "generations.jsonl").read_text())["spans"][0]
    assert span["modality"] == "protein" and span["path"].endswith(".fasta")
    header, sequence = Path(span["path"]).read_text().splitlines()
    assert header.startswith(">0000-0-protein") and set(sequence) <= set(AMINO_ACIDS)
    assert len(sequence) == span["length"] > 0  # under the span grammar: codes only


def test_data_naming_an_unregistered_modality_is_refused_by_name(prepared, protein):
    shards, _ = prepared
    unregister_modality("protein")
    try:
        with pytest.raises(VocabError, match="modality 'protein', which is not registered"):
            Vocab.load(shards / "vocab.json")
        with pytest.raises(ShardError, match="'protein', which is not registered"):
            next(read_shard(str(shards / "p-000000.tar")))
    finally:
        register_modality(protein)
