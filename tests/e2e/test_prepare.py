"""`mmfm prepare` on real files: round trip through the loader, resumability, rejects."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmfm.core.errors import DataError
from mmfm.data.decompose import length_digits
from mmfm.data.loader import StreamingLoader
from mmfm.data.shards import read_shard
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.testing import source_spec, stream_settings

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "tokenizers/base.yaml")


def recipe_file(tmp_path, sources: str, shard_size=100) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: t\noutput: {tmp_path / 'out'}\ntokenizer: {TOKENIZER}\n"
        f"shard_size: {shard_size}\nsources:\n{sources}"
    )
    return path


REAL = """  - {kind: text, name: kjv, paths: [real:kjv], limit: 300}
  - {kind: dna, name: genome, paths: [real:genbank], max_length: 1500, limit: 40}
  - {kind: dna-pairs, name: cds, paths: [real:genbank], limit: 60}
  - {kind: svg, name: icons, paths: [real:svg]}
"""


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch, real_data):
    monkeypatch.chdir(REPO)  # the tokenizer recipe names tokenizers/base relative to the repo
    for name in ("kjv", "genbank", "svg"):
        real_data(name)


def shard_docs(out: Path) -> list:
    return [d for p in sorted(out.glob("t-*.tar")) for d in read_shard(str(p))]


def docs_from_rows(rows) -> list[tuple]:
    """Whole documents back from packed rows of one stream (pieces joined, padding dropped)."""
    docs, current = [], []
    for row in rows:
        for d in np.unique(row["doc_ids"]):
            sel = row["doc_ids"] == d
            if row["tokens"][sel][0] == 0:  # padding: documents start with <s> (1), never 0
                continue
            current += row["tokens"][sel].tolist()
            if row["labels"][sel][-1] == -100:  # its last token predicts nothing: doc ends
                docs.append(tuple(current))
                current = []
    return docs


def test_prepare_stream_pack_recovers_every_document(tmp_path):
    manifest = prepare(load_prepare_recipe(recipe_file(tmp_path, REAL)), workers=2, progress=False)
    out = tmp_path / "out"
    docs = shard_docs(out)
    assert manifest["samples"] == len(docs) == 300 + 40 + 60 + 19
    assert manifest["tokens"] == sum(len(d.tokens) for d in docs)
    assert {m for m, n in manifest["tokens_by_modality"].items() if n} == {"text", "dna", "svg"}
    for shard in manifest["shards"]:  # the natural curriculum's odds without reading shards
        lengths = [len(d.tokens) for d in read_shard(str(out / shard["file"]))]
        assert shard["length_digits"] == length_digits(lengths)
    assert (out / "vocab.json").is_file()
    assert {d.source for d in docs} == {"kjv", "genome", "cds", "icons"}

    urls = tuple(str(p) for p in sorted(out.glob("t-*.tar")))
    settings = stream_settings(1, seq_len=512, shuffle_buffer=16, pack_buffer=8)
    loader = StreamingLoader([source_spec("t", urls, max_epochs=1)], settings, 1)
    rows = []
    with pytest.raises(DataError, match="max_epochs"):
        while True:
            batch = loader.next_step()[0]
            rows.append({k: getattr(batch, k)[0].numpy() for k in ("tokens", "labels", "doc_ids")})
    assert Counter(docs_from_rows(rows)) == Counter(tuple(d.tokens.tolist()) for d in docs)


def test_interrupted_prepare_reruns_to_identical_shards(tmp_path):
    recipe = load_prepare_recipe(recipe_file(tmp_path, REAL, shard_size=50))
    prepare(recipe, workers=2, progress=False)
    out = tmp_path / "out"

    def digests():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("t-*.tar")}

    first = digests()
    manifest = json.loads((out / "manifest.json").read_text())
    # What an interruption leaves: some shards missing, a half-written temporary file.
    for name in sorted(first)[3:6]:
        (out / name).unlink()
    (out / "manifest.json").unlink()
    (out / ".t-000004.tar.999.tmp").write_bytes(b"half a shard")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("t-*.tar")}
    prepare(recipe, workers=1, progress=False)
    assert digests() == first
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # Finished shards were skipped, not rewritten; the leftover temporary file is gone.
    assert all((out / name).stat().st_mtime_ns == t for name, t in kept.items())
    assert not list(out.glob(".*.tmp"))


def test_bad_records_are_rejected_and_counted(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_bytes(
        b'{"text": "fine"}\n{"text": "caf\xe9"}\nnot json\n{"other": 1}\n{"text": "also fine"}\n'
    )
    (raw / "seqs.fa").write_text(">ok\nACGTACGT\n>bad\nACGT*ACGT\n")
    (raw / "ok.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><rect width="1"/></svg>')
    (raw / "evil.svg").write_text(
        '<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        '<svg xmlns="http://www.w3.org/2000/svg"><text>&x;</text></svg>'
    )
    sources = f"""  - {{kind: text, paths: [{raw / "a.jsonl"}]}}
  - {{kind: dna, paths: [{raw / "seqs.fa"}]}}
  - {{kind: svg, paths: ["{raw}/*.svg"]}}
"""
    manifest = prepare(load_prepare_recipe(recipe_file(tmp_path, sources)), progress=False)
    assert manifest["samples"] == 2 + 1 + 1
    assert manifest["rejected"] == {
        "invalid_utf8": 1,
        "bad_json": 1,
        "missing_field": 1,
        "dna_error": 1,
        "svg_error": 1,
    }


def test_prepare_command(tmp_path):
    recipe = recipe_file(tmp_path, "  - {kind: text, paths: [real:kjv], limit: 50}\n")
    out = subprocess.run(
        [sys.executable, "-m", "mmfm", "prepare", str(recipe), "shard_size=20", "--workers", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "3 shards (0 already done), 50 documents" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "mmfm", "prepare", str(recipe), "shard_sise=20"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "did you mean 'shard_size'" in bad.stderr


def test_array_parts_split_the_shards_and_the_last_writes_the_manifest(tmp_path):
    recipe = load_prepare_recipe(recipe_file(tmp_path, REAL, shard_size=60))
    assert prepare(recipe, progress=False, part=(1, 2)) is None  # shards 1, 3, ... only
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("t-*.tar")) == [
        "t-000001.tar",
        "t-000003.tar",
        "t-000005.tar",
    ]
    assert not (out / "manifest.json").exists()
    manifest = prepare(recipe, progress=False, part=(0, 2))
    assert manifest["samples"] == 419 and len(manifest["shards"]) == 7
