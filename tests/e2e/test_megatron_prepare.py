"""`mmfm prepare ... format: megatron`: read back by megatron-core's own `IndexedDataset` with
the same documents, and by mmfm (`kind: megatron`) with their modalities and no-loss spans.
Skipped only where megatron-core cannot be installed (outside CI)."""

import json
from pathlib import Path

import numpy as np
import pytest

from mmfm.config import load_config
from mmfm.core.types import Modality
from mmfm.data import megatron as mdata
from mmfm.data.shards import read_shard
from mmfm.data.skips import Skips
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.testing import tiny_shape, train_metrics
from mmfm.tokenization.vocab import Vocab, VocabError
from mmfm.train.command import build_trainer

from helpers import megatron_indexed_or_skip

# megatron-core's builder calls numpy.array on torch tensors, which numpy 2 deprecates. One
# worker runs the files that need megatron-core (tests/unit/test_megatron_data.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.xdist_group("megatron"),
]


@pytest.fixture(scope="module", autouse=True)
def mcore():
    """megatron-core's own indexed_dataset module: without it every test here skips (fails
    under CI)."""
    return megatron_indexed_or_skip()


REPO = Path(__file__).resolve().parents[2]


def recipe(tmp_path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps({"text": f"In the beginning {i} was the word."}) for i in range(30)]
    (raw / "verses.jsonl").write_text("\n".join(lines) + "\n")
    (raw / "genome.fasta").write_text(">a\nACGTTGCAACGTAGGCTTAA\n>b\nTTGACCGTAAACGGGT\n")
    tasks = [{"prompt": {"dna": "TATAAAAGGCCG"}, "response": "promoter"}] * 3
    (raw / "tasks.jsonl").write_text("\n".join(map(json.dumps, tasks)) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: t\noutput: {tmp_path / 'out'}\ntokenizer: {REPO / 'tokenizers/base.yaml'}\n"
        "shard_size: 10\nformat: megatron\nsources:\n"
        f"  - {{kind: text, name: verses, paths: [{raw / 'verses.jsonl'}]}}\n"
        f"  - {{kind: dna, name: genome, paths: [{raw / 'genome.fasta'}]}}\n"
        f"  - {{kind: prompt-response, name: sft, paths: [{raw / 'tasks.jsonl'}]}}\n"
    )
    return path


def test_prepared_megatron_dataset_reads_back_in_megatron_core_and_mmfm(
    tmp_path, monkeypatch, mcore
):
    monkeypatch.chdir(REPO)
    manifest = prepare(load_prepare_recipe(recipe(tmp_path)), progress=False)
    out = tmp_path / "out"
    docs = [d for p in sorted(out.glob("t-*.tar")) for d in read_shard(str(p))]
    assert len(docs) == 35 and manifest["megatron"]["documents"] == 35
    assert manifest["megatron"]["dtype"] == "uint16"  # 44,953 ids fit

    # megatron-core's reader: one sequence per document, the same ids
    theirs = mcore.IndexedDataset(str(out / "t"))
    assert len(theirs.document_indices) - 1 == len(theirs) == 35
    for i, doc in enumerate(docs):
        assert np.array_equal(theirs[i].astype(np.int64), doc.tokens)

    # mmfm's reader: the same documents with their modalities and no-loss spans
    skips = Skips(0.0)
    back = [d for u in mdata.unit_urls([str(out)]) for _, d in mdata.read_unit(u, 1, 0, 0, skips)]
    assert skips.good == 35 and not skips.counts
    for doc, again in zip(docs, back, strict=True):
        assert np.array_equal(doc.tokens, again.tokens)
        assert np.array_equal(doc.modality, again.modality)
        assert doc.no_loss == again.no_loss
    modalities = {m for d in back for m in np.unique(d.modality).tolist()}
    assert modalities == {Modality.TEXT, Modality.DNA}
    assert sum(bool(d.no_loss) for d in back) == 3

    # ... and mmfm trains on it by its prefix, the vocabulary checked from manifest.json
    source = f"{{name: t, kind: megatron, paths: [{out / 't'}]}}"
    run = tmp_path / "run"
    overrides = [*tiny_shape(seq_len=64), "model.vocab_size=45056", f"data.vocab={out}/vocab.json"]
    overrides += [f"data.sources=[{source}]", "data.num_workers=0", f"train.run_dir={run}"]
    overrides += ["train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2"]
    metrics = train_metrics([*overrides, "logging.progress=false", "logging.print_every=1"])
    assert len(metrics) == 2 and {"loss/text", "loss/dna"} <= set(metrics[-1])
    Vocab.build(300).save(tmp_path / "other.json")
    with pytest.raises(VocabError, match=r"data source 't': .*manifest\.json says"):
        build_trainer(load_config(None, [*overrides, f"data.vocab={tmp_path / 'other.json'}"]))


def test_related_order_is_written_in_that_order(tmp_path, monkeypatch, mcore):
    """`order: related` is an order of documents: the indexed dataset holds the ordered
    shards' documents in their order (the staging folder gets shards only)."""
    monkeypatch.chdir(REPO)
    path = recipe(tmp_path)
    related = path.read_text().replace("shard_size: 10\n", "shard_size: 10\norder: related\n")
    path.write_text(related)
    manifest = prepare(load_prepare_recipe(path), progress=False)
    out = tmp_path / "out"
    ordered = [d for p in sorted(out.glob("t-*.tar")) for d in read_shard(str(p))]
    assert manifest["order"]["duplicates"] == 2  # the three equal prompt-responses: one kept
    assert manifest["megatron"]["documents"] == len(ordered) == 33
    theirs = mcore.IndexedDataset(str(out / "t"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == [d.tokens.tolist() for d in ordered]
    assert not list((out / ".as_read").glob("*.idx"))
    assert prepare(load_prepare_recipe(path), progress=False) == manifest  # a rerun: done


def test_megatron_output_added_to_existing_shards_without_retokenizing(
    tmp_path, monkeypatch, mcore
):
    """A rerun with `format: megatron` on an output prepared as shards resumes from them: the
    same fingerprint (the format is no part of it), the shards untouched, the indexed dataset
    written from them."""
    monkeypatch.chdir(REPO)
    path = recipe(tmp_path)
    megatron = path.read_text()
    path.write_text(megatron.replace("format: megatron\n", ""))
    first = prepare(load_prepare_recipe(path), progress=False)
    out = tmp_path / "out"
    shards = sorted(out.glob("t-*.tar"))
    written = [p.stat().st_mtime_ns for p in shards]
    assert "megatron" not in first and not (out / "t.idx").exists()
    path.write_text(megatron)
    again = prepare(load_prepare_recipe(path), progress=False)
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("t-*.tar"))] == written
    assert again["fingerprint"] == first["fingerprint"]
    assert again["megatron"]["documents"] == again["samples"] == first["samples"] == 35
    docs = [d for p in shards for d in read_shard(str(p))]
    theirs = mcore.IndexedDataset(str(out / "t"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == [d.tokens.tolist() for d in docs]
