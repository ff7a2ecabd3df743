"""Raw WebDataset shards a user packs with webdataset's ShardWriter: SVG icons (real
bootstrap-icons) with their captions in `.txt` members, and captioned photos. `mmfm prepare`
and the training stream (`data.sources[].tokenize`) both put the captions into the documents,
never the sample key, shape them alike (`uncond_ratio`, `order`, `completion_only`, drawn per
record from the seed, source name and key) and give the same documents; a `fields` entry the
record type ignores is warned about (issue 30)."""

import io
import logging

import pytest
import webdataset as wds
from PIL import Image

from mmfm.config import load_config
from mmfm.config.schema import RawFields
from mmfm.core.errors import ConfigError
from mmfm.core.modalities import Modality
from mmfm.data.deal import Unit
from mmfm.data.loader import source_specs
from mmfm.data.raw import RawDecoder
from mmfm.data.shards import read_shard
from mmfm.data.skips import Skips
from mmfm.data.units import read_raw_unit
from mmfm.prepare import PrepareRecipe, PrepareSource, prepare
from mmfm.testing import stream_settings
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.shaping import Shaping, shape
from mmfm.tokenization.tokenizers import Tokenizers

from helpers import tiny_visual_recipe

SEED = 7
ICON_FIELDS = {"record": "svg", "svg": ["svg"], "text": ["txt"]}
"""The user's mapping of the report: the caption in `000000.txt`, the code in `000000.svg`."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_data) -> dict:
    """20 bootstrap icons from over the alphabet in two shards, each captioned with its
    name's words under a key that says nothing (000000, ...); 12 scikit-image photos as
    small JPEGs with captions in one shard; the base tokenizers with tiny visual ones."""
    root = tmp_path_factory.mktemp("raw-captions")
    paths = sorted(real_data("svg-bootstrap").glob("*.svg"))[::100][:20]
    captions = {}
    with wds.ShardWriter(str(root / "icons-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i, path in enumerate(paths):
            key = f"{i:06d}"
            captions[key] = path.stem.replace("-", " ")
            sink.write({"__key__": key, "svg": path.read_bytes(), "txt": captions[key].encode()})
    with wds.TarWriter(str(root / "photos.tar")) as sink:
        for path in sorted(real_data("photos").glob("*.png"))[:12]:
            picture = Image.open(path).convert("RGB")
            picture.thumbnail((48, 48))
            jpg = io.BytesIO()
            picture.save(jpg, "JPEG", quality=90)
            caption = path.stem.replace("_", " ").encode()
            sink.write({"__key__": path.stem, "jpg": jpg.getvalue(), "txt": caption})
    tok = tiny_visual_recipe(root / "tok")
    icons = sorted(str(p) for p in root.glob("icons-*.tar"))
    assert len(icons) == 2 and len(captions) == 20
    return {"root": root, "icons": icons, "photos": [str(root / "photos.tar")],
            "captions": captions, "tok": str(tok),
            "tokenizers": Tokenizers.load(load_recipe(str(tok)))}  # fmt: skip


PHOTO_FIELDS = {"record": "image-text"}
SHAPING = {"uncond_ratio": 0.3, "order": "both", "reverse_ratio": 0.5}
SOURCES = {
    "icons": {"fields": ICON_FIELDS},
    "icons-task": {"fields": ICON_FIELDS, "completion_only": True},
    "photos": {"fields": PHOTO_FIELDS},
    "photos-shaped": {"fields": PHOTO_FIELDS, **SHAPING},
    "photos-task": {"fields": PHOTO_FIELDS, **SHAPING, "completion_only": True},
}
"""The user's mapping of the report, the same with completion_only; captioned photos plain,
shaped, and shaped as tasks. Each source reads the shards of its name's first word."""
IGNORING = {"fields": {**ICON_FIELDS, "image": ["png"], "require_text": False}}
"""A mapping with entries an svg record ignores."""


def as_tuples(docs) -> list[tuple]:
    return [(d.source, d.key, d.tokens.tolist(), d.modality.tolist(), d.no_loss) for d in docs]


def _shards(corpus: dict, name: str) -> list[str]:
    return corpus[name.split("-")[0]]


@pytest.fixture(scope="module")
def prepared(corpus) -> dict:
    """The documents `mmfm prepare` makes of SOURCES (seed SEED; one run: its workers start
    in seconds only on an idle machine) by source name, and its warnings (`warnings`): of a
    source `ignoring` of one sample, read with IGNORING."""
    sources = [
        PrepareSource(kind="webdataset", name=name, paths=_shards(corpus, name),
                      fields=RawFields(**entry["fields"]),
                      **{k: v for k, v in entry.items() if k != "fields"})
        for name, entry in [*SOURCES.items(), ("icons-ignoring", IGNORING)]
    ]  # fmt: skip
    sources[-1].limit = 1
    output = corpus["root"] / "prepared"
    recipe = PrepareRecipe(
        name="t", output=str(output), tokenizer=corpus["tok"], shard_size=8, seed=SEED,
        sources=sources,
    )  # fmt: skip
    logger, warnings = logging.getLogger("mmfm"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger.addHandler(handler)
    try:
        prepare(recipe, workers=1, progress=False)
    finally:
        logger.removeHandler(handler)
    docs = as_tuples(d for p in sorted(output.glob("t-*.tar")) for d in read_shard(str(p)))
    by_name = {name: [d for d in docs if d[0] == name] for name in SOURCES}
    return {**by_name, "warnings": "\n".join(warnings)}


def streamed(corpus: dict, sources: dict[str, dict]) -> dict[str, list[tuple]]:
    """The documents the training stream makes of the same shards, each source an entry of
    data.sources as a user writes it (train.seed SEED)."""
    entries = [
        {"name": name, "paths": _shards(corpus, name), "tokenize": corpus["tok"], **entry}
        for name, entry in sources.items()
    ]
    overrides = [f"data.sources={_flow(entries)}", f"train.seed={SEED}"]
    settings = stream_settings(1, seed=SEED, seq_len=4096)
    out = {}
    for spec in source_specs(load_config(None, overrides)):
        units = [Unit(url, 1, 0) for url in spec.urls]
        read = (d for u in units for _, d in read_raw_unit(u, 0, Skips(1.0), spec, settings))
        out[spec.name] = as_tuples(read)
    return out


def _flow(value) -> str:
    """`value` as YAML flow (what a dotted override takes)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, int | float) else f"'{value}'"


def test_svg_shards_keep_their_captions_in_prepare_and_in_the_stream(corpus, prepared):
    """Caption, then the SVG: `<s> caption <svg> ... </svg> </s>`, the same documents both
    ways; with completion_only the caption is the prompt (never the key 000000)."""
    tokenizers = corpus["tokenizers"]
    svg_open = tokenizers.vocab.delimiters(Modality.SVG)[0]
    sources = {k: v for k, v in SOURCES.items() if k.startswith("icons")}
    assert streamed(corpus, sources) == {k: prepared[k] for k in sources}
    for name in sources:
        assert len(prepared[name]) == 20
        for _, key, tokens, _, no_loss in prepared[name]:
            caption = tokenizers.text.encode(corpus["captions"][key])
            assert tokens[1 : 1 + len(caption)] == caption, key
            assert tokens[1 + len(caption)] == svg_open, key
            task = name == "icons-task"
            assert no_loss == (((0, 1 + len(caption)),) if task else ()), key


def test_a_sample_without_its_caption_member_is_an_uncaptioned_svg_never_its_key(corpus, caplog):
    """As an svg file without a caption: `<s> <svg> ... </svg> </s>`, every token a target
    with completion_only too; a warning names the missing member."""
    sample = next(iter(wds.WebDataset(corpus["icons"][0], shardshuffle=False)))
    del sample["txt"]
    rejects = []
    with caplog.at_level(logging.WARNING, logger="mmfm"):
        decode = RawDecoder(RawFields(**ICON_FIELDS), "uncaptioned")
        (record,) = decode("s.tar", sample, lambda *r: rejects.append(r))
    assert rejects == [] and record.text is None
    assert "no caption (no member txt)" in caplog.text
    task, _ = shape(record, Shaping(completion_only=True), SEED)
    assert task == record  # no condition: no prompt made of the key
    doc = corpus["tokenizers"].encode(task)
    assert doc.tokens.tolist()[1] == corpus["tokenizers"].vocab.delimiters(Modality.SVG)[0]
    assert doc.no_loss == ()


def test_shaping_of_captioned_photos_is_the_same_streamed_and_prepared(corpus, prepared):
    """uncond_ratio, order: both and completion_only in data.sources[] draw what mmfm prepare
    draws for the same seed, source name and key."""
    sources = {k: v for k, v in SOURCES.items() if k.startswith("photos")}
    assert streamed(corpus, sources) == {k: prepared[k] for k in sources}
    plain = prepared["photos"]
    for name in ("photos-shaped", "photos-task"):
        changed = [d for d, p in zip(prepared[name], plain, strict=True) if d[2] != p[2]]
        assert 0 < len(changed) < len(plain), name  # some dropped or put first, not all
    assert {bool(d[4]) for d in prepared["photos-task"]} == {True, False}  # dropped: no prompt


def test_shaping_in_data_sources_is_checked_as_in_a_prepare_recipe(corpus):
    def load(**entry) -> None:
        entry = {"name": "raw", "paths": corpus["icons"], "tokenize": corpus["tok"], **entry}
        load_config(None, [f"data.sources=[{_flow(entry)}]"])

    with pytest.raises(ConfigError, match="uncond_ratio and order apply to captioned"):
        load(fields={"record": "svg"}, uncond_ratio=0.1)
    with pytest.raises(ConfigError, match="order"):
        load(order="sideways")
    with pytest.raises(ConfigError, match="reverse_ratio must be in"):
        load(order="both", reverse_ratio=1.5)
    with pytest.raises(ConfigError, match="shards of mmfm prepare are shaped already"):
        load(tokenize="", completion_only=True)


def test_fields_a_record_type_ignores_are_warned_about(corpus, prepared, caplog):
    """`image: [png]` and `require_text` on an svg record do nothing: said in prepare and at
    the training stream's start-up, naming the source."""
    entry = {"name": "icons-ignoring", "paths": corpus["icons"], "tokenize": corpus["tok"]}
    with caplog.at_level(logging.WARNING, logger="mmfm"):
        source_specs(load_config(None, [f"data.sources=[{_flow({**entry, **IGNORING})}]"]))
    for where, text in (("sources: icons-ignoring", prepared["warnings"]),
                        ("data source 'icons-ignoring'", caplog.text)):  # fmt: skip
        (line,) = [line for line in text.splitlines() if "ignores" in line]
        assert where in line
        named = line.split("ignores")[1].split("(")[0]
        assert "fields.image" in named and "fields.require_text" in named
        assert "fields.text" not in named and "fields.svg" not in named
