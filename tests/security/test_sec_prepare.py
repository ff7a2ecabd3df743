"""`mmfm prepare` on damaged raw text and DNA: every bad record or file is a counted reject
naming its file and record, the records around it are kept, and the run goes on."""

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest

from mmfm.core.types import DnaRecord, TextRecord
from mmfm.data.shards import read_shard
from mmfm.prepare import command as prep
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.tokenizers import Tokenizers

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "tokenizers/base.yaml")

# The head of a Clustal alignment (Biopython's Tests/Clustalw/ files look like this).
CLUSTAL = """CLUSTAL X (1.81) multiple sequence alignment


gi|4959044|gb|AAD34209.1|AF069      MENSDSNDKGSDQSAAQRRSQMDRLDREEAFYQFVNNLSEEDYRLMRDNN 50
gi|671626|emb|CAA85685.1|           ---------MSPQTETKASVGFKAGVKEYKLTYYTPEYETKDTDILAAFR 41
                                              * *      * ** *   *  *    *     * *
"""


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the tokenizer recipe names tokenizers/base relative to the repo


@pytest.fixture
def mmfm_log(caplog):
    """The warnings of the `mmfm` logger (which may not propagate to the root logger)."""
    logger = logging.getLogger("mmfm")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def lines_of(path: Path, n: int) -> str:
    return "".join(path.read_text().splitlines(keepends=True)[:n])


def damaged_corpus(raw: Path, genbank: Path) -> str:
    """Raw files with one kind of damage each, between good records; the recipe's sources."""
    (raw / "text").mkdir(parents=True)
    (raw / "text" / "a.jsonl").write_bytes(
        b'{"text": "first"}\n'
        b'{"text": "lone \\ud800 surrogate"}\n'  # valid JSON, not encodable text
        + b"[" * 100_000
        + b"]" * 100_000
        + b"\n"  # nested past the recursion limit
        b'{"text": "last"}\n'
    )
    fasta = raw / "fasta"
    fasta.mkdir()
    (fasta / "a_utf8.fa").write_bytes(b">u1\nACGT\n>u2\nAC\xffGT\n>u3\nGGCC\n")
    (fasta / "b_preamble.fa").write_text("some notes\n>p1\nACGT\n")
    (fasta / "c_empty.fa").write_text(">e1\n>e2\nTTAA\n")
    with gzip.open(fasta / "d_cut.fa.gz", "wt") as f:
        f.write(">z1\nACGTACGT\n>z2\nACGT\n")
    (fasta / "d_cut.fa.gz").write_bytes((fasta / "d_cut.fa.gz").read_bytes()[:-12])
    (fasta / "test.clw").write_text(CLUSTAL)
    gb = raw / "gb"
    gb.mkdir()
    full = genbank / "NC_005816.gb"  # 9609 bp, 10 CDS with a /product
    (gb / "a_features_cut.gb").write_text(lines_of(full, 200))  # inside the features table
    (gb / "b_origin_cut.gb").write_text(lines_of(full, 400))  # inside ORIGIN
    (gb / "c_full.gb").write_text(full.read_text())
    return f"""  - {{kind: text, name: txt, paths: [{raw / "text"}]}}
  - {{kind: dna, name: fa, paths: [{fasta}]}}
  - {{kind: dna, name: gb, paths: [{gb}]}}
  - {{kind: dna-pairs, name: cds, paths: [{gb}]}}
"""


def test_damaged_text_and_dna_are_counted_and_the_rest_is_kept(tmp_path, real_data, mmfm_log):
    sources = damaged_corpus(tmp_path / "raw", real_data("genbank"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: t\noutput: {tmp_path / 'out'}\ntokenizer: {TOKENIZER}\nshard_size: 4\n"
        f"sources:\n{sources}"
    )
    manifest = prepare(load_prepare_recipe(recipe), workers=2, progress=False)
    docs = [d for p in sorted((tmp_path / "out").glob("t-*.tar")) for d in read_shard(str(p))]
    keys = {s: sorted(d.key for d in docs if d.source == s) for s in ("txt", "fa")}
    assert keys["txt"] == ["a:1", "a:4"]
    assert keys["fa"] == ["e2", "u1", "u3", "z1"]
    genome = [d for d in docs if d.source == "gb"]
    assert [d.key for d in genome] == ["NC_005816.1"]  # the complete file only
    tokenizers = Tokenizers.load(load_recipe(TOKENIZER))
    assert len(tokenizers.decode(genome[0].tokens)[0][1]) == 9609  # the whole sequence
    cds = [d for d in docs if d.source == "cds"]
    assert len(cds) == 10 and all(_dna_tokens(d) > 2 for d in cds)
    assert manifest["samples"] == len(docs) == 2 + 4 + 1 + 10
    assert manifest["rejected"] == {
        "invalid_utf8": 2,  # the lone surrogate, the FASTA record with byte 0xff
        "bad_json": 1,  # nested too deep
        "unreadable": 4,  # text before '>', the cut gzip, the cut features table (twice)
        "empty": 1,
        "not_dna": 1,
        "truncated": 2,  # the record cut inside ORIGIN, as dna and as dna-pairs
    }
    logged = mmfm_log.text
    for where in (
        "a.jsonl:2",
        "a.jsonl:3",
        "a_utf8.fa:u2",
        "b_preamble.fa",
        "c_empty.fa:e1",
        "d_cut.fa.gz",
        "test.clw",
        "a_features_cut.gb",
        "b_origin_cut.gb:NC_005816.1",
    ):
        assert where in logged, where
    assert "Expected sequence length 9609" in logged


def _dna_tokens(doc) -> int:
    from mmfm.core.types import Modality

    return int((doc.modality == Modality.DNA).sum())


def test_an_exception_inside_a_worker_costs_one_record(tmp_path, monkeypatch):
    """What the pool runs, in this process: a tokenizer exception (sentencepiece on a lone
    surrogate that bypassed the reader) and an empty DNA span are counted, named, skipped."""
    monkeypatch.setattr(prep, "_TOKENIZERS", Tokenizers.load(load_recipe(TOKENIZER)))
    records = [
        ("in.jsonl:1", TextRecord("in:1", "fine", "t")),
        ("in.jsonl:2", TextRecord("in:2", "bad \ud800", "t")),
        ("in.fa:empty", DnaRecord("empty", "", None, "d")),
        ("in.fa:ok", DnaRecord("ok", "ACGTAC", None, "d")),
    ]
    shard = tmp_path / "t-000000.tar"
    stats, notes = prep._tokenize_shard((str(shard), records, 0))
    assert [d.key for d in read_shard(str(shard))] == ["in:1", "ok"]
    assert stats["samples"] == 2 and stats["rejected"] == {"tokenizer_error": 1, "empty": 1}
    reasons = {(reason, where) for reason, where, _ in notes}
    assert reasons == {("tokenizer_error", "in.jsonl:2"), ("empty", "in.fa:empty")}
    assert np.all([n[2] for n in notes])  # each says what went wrong


def test_outside_prepare_damaged_dna_is_one_clear_error(tmp_path, real_data):
    """`mmfm tokenizer encode` and tokenizer training read with the default reject: a
    DnaError (one line from the CLI) instead of a partial sequence or a Biopython trace."""
    from mmfm.tokenization.dna import DnaError, read_dna, read_function_pairs

    cut = tmp_path / "cut.gb"
    cut.write_text(lines_of(real_data("genbank") / "NC_005816.gb", 400))
    with pytest.raises(DnaError, match=r"cut\.gb:NC_005816\.1: .*Expected sequence length"):
        list(read_dna(cut))
    with pytest.raises(DnaError, match=r"cut\.gb:NC_005816\.1: .*\(truncated\)"):
        list(read_function_pairs(cut))
    (tmp_path / "test.clw").write_text(CLUSTAL)
    with pytest.raises(DnaError, match=r"test\.clw: not a FASTA, FASTQ or GenBank file name"):
        list(read_dna(tmp_path / "test.clw"))


def test_a_damaged_text_corpus_line_is_skipped_in_tokenizer_training(tmp_path, capsys):
    from mmfm.tokenization.text import _file_texts

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\nnot json\n{"text": "lone \\ud800"}\n[1]\n{"text": "b"}\n')
    assert list(_file_texts(corpus, "text")) == ["a", "b"]
    err = capsys.readouterr().err
    assert all(f"c.jsonl:{i}" in err for i in (2, 3, 4))
