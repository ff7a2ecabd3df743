"""Raw WebDataset shards tokenized in the training stream (`tokenize:` on a source), against
the same shards prepared offline by `mmfm prepare`: the same documents, the same batches from
the same seed, exact resume mid-epoch with and without loader workers, counted skips."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mmfm.config import load_config
from mmfm.config.schema import RawFields
from mmfm.core.errors import DataError
from mmfm.data.deal import Unit
from mmfm.data.loader import StreamingLoader, source_specs
from mmfm.data.raw_stream import POSITIONS
from mmfm.data.settings import SourceSpec, StreamSettings
from mmfm.data.skips import Skips
from mmfm.data.units import read_raw_unit, read_unit
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.testing import source_spec, stream_settings
from mmfm.tokenization.vocab import VocabError
from mmfm.train.command import _check_vocab

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_stream_raw")

REPO = Path(__file__).resolve().parents[2]
PER_SHARD = 40
TEXT = RawFields(record="text", text=["txt"])
SVG = RawFields(record="svg")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_data) -> dict:
    """Raw shards of KJV verses (one sample with invalid UTF-8, one without its txt) and of
    SVG icons, and the same shards prepared (one prepared shard per raw shard)."""
    root = tmp_path_factory.mktemp("raw-stream")
    (root / "tok.yaml").write_text(f"output_dir: {REPO / 'tokenizers/base'}\n")
    (root / "raw").mkdir()
    with open(real_data("kjv") / "kjv.jsonl") as f:
        verses = [json.loads(next(f))["text"] for _ in range(4 * PER_SHARD - 2)]
    with wds.ShardWriter(str(root / "raw/text-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i, verse in enumerate(verses):
            sink.write({"__key__": f"v{i:04d}", "txt": verse.encode()})
            if i == 50:
                sink.write({"__key__": "latin1", "txt": b"caf\xe9"})
            if i == 100:
                sink.write({"__key__": "notext", "json": b'{"url": "x"}'})
    with wds.ShardWriter(str(root / "raw/svg-%06d.tar"), maxcount=8, verbose=0) as sink:
        for path in sorted(real_data("svg").glob("*.svg"))[:16]:
            sink.write({"__key__": path.stem, "svg": path.read_bytes()})
    raw = {k: sorted(str(p) for p in (root / "raw").glob(f"{k}-*.tar")) for k in ("text", "svg")}
    prepared = {}
    jobs = (("text", "{record: text, text: txt}", PER_SHARD), ("svg", "{record: svg}", 8))
    for kind, fields, size in jobs:
        recipe = root / f"{kind}.yaml"
        recipe.write_text(
            f"name: {kind}\noutput: {root / kind}\ntokenizer: {root / 'tok.yaml'}\n"
            f"shard_size: {size}\nsources:\n  - {{kind: webdataset, name: {kind}, "
            f"paths: {json.dumps(raw[kind])}, fields: {fields}}}\n"
        )
        prepare(load_prepare_recipe(recipe), workers=1, progress=False)
        prepared[kind] = sorted(str(p) for p in (root / kind).glob(f"{kind}-*.tar"))
        assert len(prepared[kind]) == len(raw[kind])
    return {"root": root, "raw": raw, "prepared": prepared, "tok": str(root / "tok.yaml")}


def settings(n_streams: int, **kw) -> StreamSettings:
    kw = {"shuffle_buffer": 8, "pack_buffer": 4, **kw}
    return stream_settings(n_streams, seed=3, seq_len=64, **kw)


def raw_specs(shards, max_epochs=0) -> list[SourceSpec]:
    tok = shards["tok"]
    return [
        source_spec(
            "text",
            tuple(shards["raw"]["text"]),
            3.0,
            max_epochs=max_epochs,
            tokenize=tok,
            fields=TEXT,
        ),
        source_spec(
            "svg", tuple(shards["raw"]["svg"]), max_epochs=max_epochs, tokenize=tok, fields=SVG
        ),
    ]


def prepared_specs(shards) -> list[SourceSpec]:
    return [
        source_spec("text", tuple(shards["prepared"]["text"]), 3.0),
        source_spec("svg", tuple(shards["prepared"]["svg"])),
    ]


def batches(ld: StreamingLoader, steps: int) -> list[list[dict]]:
    """Every field of every micro-batch of `steps` steps, as numpy arrays."""
    out = []
    for _ in range(steps):
        out.append([{k: v.numpy() for k, v in vars(b).items()} for b in ld.next_step()])
    return out


def same(a, b) -> bool:
    return all(
        len(x) == len(y) and all(xb.keys() == yb.keys() for xb, yb in zip(x, y, strict=True))
        and all(np.array_equal(xb[k], yb[k]) for xb, yb in zip(x, y, strict=True) for k in xb)
        for x, y in zip(a, b, strict=True)
    )  # fmt: skip


def test_raw_shards_give_the_documents_of_their_prepared_shards(shards):
    for kind in ("text", "svg"):
        spec = raw_specs(shards)[kind == "svg"]
        for raw, prepared in zip(shards["raw"][kind], shards["prepared"][kind], strict=True):
            got = list(read_raw_unit(Unit(raw, 1, 0), 0, Skips(1.0), spec, settings(1)))
            want = list(read_unit(Unit(prepared, 1, 0), 0, Skips(1.0), settings(1)))
            assert [(d.key, d.tokens.tolist(), d.modality.tolist()) for _, d in got] == [
                (d.key, d.tokens.tolist(), d.modality.tolist()) for _, d in want
            ]
            assert all(p % POSITIONS == 0 for p, _ in got)  # one document per sample


def test_raw_and_prepared_shards_give_the_same_batches(shards):
    """One stream: the deal is the shards' shuffled order whatever their sizes (raw shards
    are dealt by bytes, prepared ones by tokens; with more streams the deals differ)."""
    raw = StreamingLoader(raw_specs(shards), settings(1), 1)
    prepared = StreamingLoader(prepared_specs(shards), settings(1), 1)
    got, want = batches(raw, 12), batches(prepared, 12)
    assert same(got, want)
    assert len({tuple(b[0]["tokens"][0]) for b in got}) == 12  # rows differ: not trivially equal


def test_raw_resume_mid_epoch_is_exact_with_and_without_workers(shards):
    straight = StreamingLoader(raw_specs(shards), settings(4), 2)
    batches(straight, 3)
    state = straight.state_dict()
    want = batches(straight, 10)  # long enough for documents read after the restore
    for workers in (0, 2):
        with StreamingLoader(raw_specs(shards), settings(4), 2, num_workers=workers) as resumed:
            resumed.load_state_dict(state)
            got = batches(resumed, 10)
        assert same(got, want), workers


def test_bad_raw_samples_are_counted(shards):
    ld = StreamingLoader(raw_specs(shards, max_epochs=1), settings(1, max_error_rate=0.5), 1)
    totals = Counter()
    with pytest.raises(DataError, match="every source reached its max_epochs"):
        while True:  # one pass: each bad sample once
            ld.next_step()
            totals.update(dict(zip(ld.count_keys(), ld.step_counts(), strict=True)))
    skipped = {k.split("/")[1]: v for k, v in totals.items() if k.startswith("skipped/") and v}
    assert skipped == {"bad_sample": 1, "missing_field": 1}  # invalid UTF-8; no txt member


def test_a_raw_source_is_configured_and_its_vocabulary_checked(shards, tmp_path):
    source = (
        f"{{name: verses, paths: {json.dumps(shards['raw']['text'])}, tokenize: {shards['tok']}, "
        "fields: {record: text, text: txt}}"
    )
    cfg = load_config(None, [f"data.sources=[{source}]", "model.vocab_size=45056"])
    (spec,) = source_specs(cfg)
    assert spec.tokenize == shards["tok"] and spec.fields.record == "text"
    assert _check_vocab(cfg)[1] == []  # the recipe's vocabulary is known: no "not checked"
    other = json.loads((REPO / "tokenizers/base/vocab.json").read_text())
    other["specials"][-1] = "<other>"  # same size, another layout: another fingerprint
    (tmp_path / "vocab.json").write_text(json.dumps(other))
    vocab = [f"data.vocab={tmp_path / 'vocab.json'}", "model.vocab_size=45056"]
    cfg = load_config(None, [f"data.sources=[{source}]", *vocab])
    with pytest.raises(VocabError, match="data source 'verses'"):
        _check_vocab(cfg)
