"""In-Context Pretraining: the related order of `mmfm prepare`, ordered sources in the
stream, and `data.attention: row` (one causal context per row).

The order is measured on real text: verses sampled across the King James Bible (every 31st),
tokenized with the repository's base tokenizer, so neighbours are found by their words and
not planted by the test.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfm.config import ModelConfig, load_config
from mmfm.core.errors import ConfigError
from mmfm.core.types import Document
from mmfm.data.deal import deal
from mmfm.data.decompose import length_digits
from mmfm.data.loader import build_loader
from mmfm.data.packing import Exhausted, Packer, Pending, RowBuilder, modality_weight_table
from mmfm.data.shards import read_shard, write_shard
from mmfm.data.stream import VirtualStream
from mmfm.model import build_model, init_weights
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.prepare import order as icp
from mmfm.testing import source_spec, stream_settings
from mmfm.tokenization.text import TextTokenizer
from mmfm.tokenization.vocab import Vocab

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = modality_weight_table({})


@pytest.fixture(scope="module")
def verses(real_data) -> list[str]:
    lines = (real_data("kjv") / "kjv.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[::31]]  # ~1000 verses, every book


@pytest.fixture(scope="module")
def tokens(verses) -> list[np.ndarray]:
    text = TextTokenizer(Vocab.load(REPO / "tokenizers/base/vocab.json").text_model)
    return [np.asarray([1, *text.encode(v), 2], np.int32) for v in verses]  # <s> ... </s>


def doc(ids, key="") -> Document:
    ids = np.asarray(ids, np.int32)
    return Document(ids, np.zeros(len(ids), np.uint8), key)


def rows_of(order, tokens, seq_len=256) -> list[list[int]]:
    """The documents of each row when `order` is packed greedily (as the stream does for an
    ordered source with data.packing=greedy), by the real Packer: greedy places whole
    documents in arrival order, so each row holds the next `stats.docs` of them."""
    packer, queue, rows, at = Packer(seq_len, WEIGHTS, "greedy"), iter(order), [], 0

    def pull() -> Pending:
        i = next(queue, None)
        if i is None:
            raise Exhausted
        assert len(tokens[i]) <= seq_len
        return Pending(doc(tokens[i]), (0, 0, 0, i))

    while True:
        try:
            stats = packer.row(pull)[1]
        except Exhausted:
            return rows
        rows.append(list(order[at : at + stats.docs]))
        at += stats.docs


def mean_row_similarity(x, rows) -> float:
    """Mean cosine over the pairs of documents that share a row."""
    sims = []
    for row in (r for r in rows if len(r) > 1):
        gram = x[row] @ x[row].T
        sims.append((gram.sum() - np.trace(gram)) / (len(row) * (len(row) - 1)))
    return float(np.mean(sims))


def test_related_order_visits_every_document_once_and_drops_duplicates(tokens):
    copies = list(range(0, 200, 20))  # 10 verses again, at the end of the corpus
    corpus = tokens + [tokens[i] for i in copies]
    path = icp.related_order(icp.embed(corpus))
    n = len(corpus)
    assert len(path.order) + len(path.duplicates) == n
    assert sorted(path.order + path.duplicates) == list(range(n))  # each exactly once
    for j, i in enumerate(copies):  # the later copy goes, the first stays
        assert len(tokens) + j in path.duplicates and i in path.order
    assert len(path.duplicates) < len(copies) + 10  # few real verses are near-duplicates
    assert path.restarts < n // 4


def test_related_order_puts_neighbours_in_one_row(tokens):
    x = icp.embed(tokens)
    path = icp.related_order(x)
    shuffled = np.random.default_rng(0).permutation(len(tokens)).tolist()
    row_related = mean_row_similarity(x, rows_of(path.order, tokens))
    row_random = mean_row_similarity(x, rows_of(shuffled, tokens))
    next_related = icp.consecutive_similarity(x, path.order)
    next_random = icp.consecutive_similarity(x, shuffled)
    print(
        f"\nKJV, {len(tokens)} verses, rows of 256 tokens: mean cosine within a row "
        f"related {row_related:.3f} vs random {row_random:.3f}; consecutive documents "
        f"{next_related:.3f} vs {next_random:.3f}"
    )
    assert row_related > 2 * row_random
    assert next_related > 4 * next_random


def test_embedding_is_a_normalised_sketch_of_shared_ngrams():
    x = icp.embed([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [5, 6, 7, 8, 10], [40, 41, 42, 43]])
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    sims = x @ x.T
    assert sims[0, 1] == pytest.approx(1, abs=1e-6)
    assert sims[0, 3] < 0.3 < sims[0, 2] < 0.99  # shared n-grams, and none


def test_beyond_exact_search_without_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(icp, "EXACT_DOCS", 3)
    monkeypatch.setattr(icp, "faiss", None)
    with pytest.raises(ConfigError, match="needs faiss-cpu beyond 3 documents"):
        icp.neighbours(icp.embed([[5, 6], [6, 7], [7, 8], [8, 9]]))


# -- mmfm prepare ------------------------------------------------------------------------------


def related_recipe(tmp_path, verses, order="related", n=240) -> Path:
    corpus = tmp_path / "verses.jsonl"
    lines = [json.dumps({"text": v}) for v in [*verses[:n], *verses[:5]]]  # 5 duplicates
    if not corpus.exists():  # written once: the inputs' fingerprint holds their mtime
        corpus.write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: icp\noutput: {tmp_path / 'out'}\ntokenizer: {REPO / 'tokenizers/base.yaml'}\n"
        f"shard_size: 100\norder: {order}\nsources:\n  - {{kind: text, paths: [{corpus}]}}\n"
    )
    return recipe


def test_prepare_writes_related_shards_each_document_once(tmp_path, verses, monkeypatch):
    monkeypatch.chdir(REPO)  # the tokenizer recipe names its files relative to the repo
    recipe = load_prepare_recipe(related_recipe(tmp_path, verses))
    manifest = prepare(recipe, progress=False)
    out = tmp_path / "out"
    staged = [d for p in sorted((out / icp.STAGING).glob("*.tar")) for d in read_shard(str(p))]
    ordered = [d for p in sorted(out.glob("icp-*.tar")) for d in read_shard(str(p))]
    assert len(staged) == 245 and len(ordered) == manifest["samples"] == 240
    assert sorted(d.tokens.tobytes() for d in ordered) == sorted(
        {d.tokens.tobytes() for d in staged}
    )
    stats = manifest["order"]
    assert stats["duplicates"] == manifest["rejected"]["duplicate"] == 5
    assert stats["consecutive_similarity"] > 3 * stats["random_similarity"]
    assert manifest["sources"]["text"]["documents"] == 240
    assert manifest["tokens"] == sum(len(d.tokens) for d in ordered)
    assert sum(np.array(s["length_digits"]) for s in manifest["shards"]).tolist() == (
        length_digits([len(d.tokens) for d in ordered])
    )
    assert (out / "vocab.json").is_file()
    assert prepare(recipe, progress=False) == manifest  # a rerun finds it done
    as_read = load_prepare_recipe(related_recipe(tmp_path, verses, "as_read"))
    with pytest.raises(ConfigError, match="another recipe"):
        prepare(as_read, progress=False)
    (out / "manifest.json").unlink()  # ordered again (the staged shards are done) ...
    monkeypatch.setattr(icp, "MAX_TOKENS", 1000)  # ... but over the memory limit
    with pytest.raises(ConfigError, match="holds the whole corpus in memory"):
        prepare(recipe, progress=False)


# -- the stream keeps an ordered source's order ------------------------------------------------


def stream_docs(stream: VirtualStream, n_rows: int) -> list[int]:
    """The documents of the next rows of `stream`, by the id each carries (its token 1)."""
    ids = []
    for _ in range(n_rows):
        row = stream.next_row()[0]
        ids += row["tokens"][(row["positions"] == 1) & (row["labels"] != -100)].tolist()
    return ids


@pytest.mark.parametrize("ordered", [True, False])
def test_an_ordered_source_leaves_the_shuffle_buffer_in_shard_order(tmp_path, ordered):
    for shard in range(3):  # 3 shards of 30 documents; document i carries the id 100 + i
        docs = [doc([1, 100 + i, 7, 2], f"{i}") for i in range(shard * 30, shard * 30 + 30)]
        write_shard(tmp_path / f"s-{shard:06d}.tar", docs)
    urls = tuple(str(p) for p in sorted(tmp_path.glob("*.tar")))
    settings = stream_settings(1, seq_len=16, shuffle_buffer=16)
    spec = source_spec("s", urls, ordered=ordered)
    stream = VirtualStream(0, [spec], settings)
    first = stream_docs(stream, 6)
    resumed = VirtualStream(0, [spec], settings)
    resumed.restore(json.loads(json.dumps(stream.snapshot())))
    rest = stream_docs(stream, 8)
    assert stream_docs(resumed, 8) == rest  # the resume state is as before
    seen = first + rest
    shards = [int(unit.url[-10:-4]) for unit in deal(urls, 1, 0, settings.seed)[0]]
    assert shards != sorted(shards)  # the deal shuffles the shards (seed 0: 3 shards) ...
    in_order = [100 + i for s in shards for i in range(s * 30, s * 30 + 30)]
    assert (seen == in_order[: len(seen)]) == ordered  # ... each is read whole, in order


def test_the_config_reaches_the_streams(tmp_path):
    write_shard(tmp_path / "s-000000.tar", [doc([1, 5, 2])])
    source = f"{{name: s, paths: [{tmp_path}], ordered: true}}"
    cfg = load_config(None, [f"data.sources=[{source}]", "data.attention=row"])
    loader = build_loader(cfg)
    assert loader.sources[0].ordered and loader.settings.attention == "row"
    with pytest.raises(ConfigError, match=r"data\.attention"):
        load_config(None, ["data.attention=rows"])


# -- data.attention: row ---------------------------------------------------------------------

CFG = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
LENGTHS = (10, 1, 30)  # and 23 tokens of padding


def packed(attention: str, seq_len: int = 64) -> dict:
    gen = np.random.default_rng(0)
    row = RowBuilder(seq_len, WEIGHTS, attention)
    for n in LENGTHS:
        d = doc(gen.integers(3, CFG.vocab_size, n))
        row.add(d, 0, n)
    return {k: torch.from_numpy(v)[None] for k, v in row.finish().items()}


def test_row_attention_layout_keeps_the_targets_of_document_attention():
    row, docs = packed("row"), packed("document")
    used = sum(LENGTHS)
    assert row["doc_ids"][0, :used].unique().tolist() == [0]
    assert row["doc_ids"][0, used:].unique().tolist() == [1]  # the padding stays apart
    assert row["positions"][0, :used].tolist() == list(range(used))
    for name in ("tokens", "labels", "loss_weights", "modality"):
        assert torch.equal(row[name], docs[name]), name
    assert not torch.equal(row["positions"], docs["positions"])


@pytest.mark.parametrize("backend", ["docs", "sdpa_masked"])
def test_row_attention_equals_causal_attention_over_the_concatenation(backend):
    cfg = ModelConfig(**{**CFG.__dict__, "attention": backend})
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, 0)
    used = sum(LENGTHS)
    with torch.no_grad():
        rows = {mode: packed(mode) for mode in ("row", "document")}
        logits = {m: model(r["tokens"], r["positions"], r["doc_ids"]) for m, r in rows.items()}
        tokens = rows["row"]["tokens"][:, :used]  # the documents alone, one causal sequence
        plain = model(tokens, torch.arange(used)[None], torch.zeros_like(tokens))
    assert (logits["row"][:, :used] - plain).abs().max() <= 1e-5
    assert (logits["document"][:, LENGTHS[0] : used] - plain[:, LENGTHS[0] :]).abs().max() > 1e-2
