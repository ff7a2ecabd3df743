"""`mmfm prepare` on raw WebDataset shards written with webdataset's ShardWriter from real files
(photos with captions, SVG icons, DNA, verses), against the same files prepared from folders;
and a rerun that notices a changed recipe or changed inputs."""

import functools
import gzip
import hashlib
import http.server
import io
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmfm.cli import main
from mmfm.config.schema import RawFields
from mmfm.core.errors import ConfigError
from mmfm.data.deal import Unit
from mmfm.data.raw import RawDecoder, count_samples
from mmfm.data.shards import read_shard
from mmfm.data.skips import Skips
from mmfm.data.units import read_raw_unit
from mmfm.prepare import load_prepare_recipe, prepare
from mmfm.testing import source_spec, stream_settings
from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_prepare_raw")

REPO = Path(__file__).resolve().parents[2]
TINY_IMAGE = {
    "image_size": 32, "patch": 8, "dim": 32, "heads": 2, "encoder_layers": 1,
    "qformer_layers": 1, "decoder_layers": 1, "tokens": 8, "codebook_size": 64,
}  # fmt: skip
PHOTOS = {"astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee"}
DNA = ("KK037166.fna.gz", "NC_005816.gb")


def _jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_data) -> dict:
    """The same real files as folders (folder/<kind>/) and as raw shards (raw/*.tar), an
    untrained tiny image tokenizer next to the base one, and an http server for raw/."""
    root = tmp_path_factory.mktemp("raw-corpus")
    save_visual(build(VisualRecipe(kind="seed_image", model=TINY_IMAGE)), root / "seed")
    (root / "tok.yaml").write_text(
        f"output_dir: {REPO / 'tokenizers/base'}\nimage_tokenizer: {root / 'seed'}\n"
    )
    folder = {k: root / "folder" / k for k in ("photos", "svg", "dna", "text")}
    for d in [*folder.values(), root / "raw"]:
        d.mkdir(parents=True)
    photos = {stem: _jpeg(real_data("photos") / f"{stem}.png") for stem in PHOTOS}
    with wds.TarWriter(str(root / "raw/photos.tar")) as sink:
        for stem, caption in PHOTOS.items():
            (folder["photos"] / f"{stem}.jpg").write_bytes(photos[stem])
            (folder["photos"] / f"{stem}.txt").write_text(caption + "\n")
            sample = {"__key__": stem, "jpg": photos[stem]}
            if stem == "coffee":  # img2dataset's json caption instead of a txt member
                sample["json"] = json.dumps({"caption": caption, "width": 600}).encode()
            else:
                sample["txt"] = (caption + "\n").encode()
            sink.write(sample)
    with wds.TarWriter(str(root / "raw/bad.tar")) as sink:
        sink.write({"__key__": "cut", "jpg": photos["chelsea"][:300], "txt": b"a cut picture"})
        sink.write({"__key__": "nocaption", "jpg": photos["chelsea"], "json": b'{"url": "x"}'})
        sink.write({"__key__": "latin1", "jpg": photos["chelsea"], "txt": b"caf\xe9"})
    svgs = sorted(real_data("svg").glob("*.svg"))[:6]
    with wds.TarWriter(str(root / "raw/svg.tar")) as sink:
        for path in svgs:
            (folder["svg"] / path.name).write_bytes(path.read_bytes())
            sink.write({"__key__": path.stem, "svg": path.read_bytes()})
    with wds.TarWriter(str(root / "raw/dna.tar")) as sink:
        for name in DNA:
            data = (real_data("fasta" if name.endswith("gz") else "genbank") / name).read_bytes()
            (folder["dna"] / name).write_bytes(data)
            member = gzip.decompress(data) if name.endswith(".gz") else data  # gzipped by wds
            sink.write({"__key__": name.split(".")[0], name.split(".", 1)[1]: member})
    with open(real_data("kjv") / "kjv.jsonl") as f:
        verses = [json.loads(next(f))["text"] for _ in range(20)]
    with wds.ShardWriter(str(root / "raw/text-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i, verse in enumerate(verses):
            (folder["text"] / f"v{i:03d}.txt").write_text(verse)
            sink.write({"__key__": f"v{i:03d}", "txt": verse.encode()})
    handler = functools.partial(_QuietHandler, directory=str(root / "raw"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"root": root, "folder": folder, "url": f"http://127.0.0.1:{server.server_port}"}
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def recipe(corpus, out: str, sources: str, shard_size: int = 4) -> Path:
    path = corpus["root"] / f"{out}.yaml"
    path.write_text(
        f"name: t\noutput: {corpus['root'] / out}\ntokenizer: {corpus['root'] / 'tok.yaml'}\n"
        f"shard_size: {shard_size}\nsources:\n{sources}"
    )
    return path


def folder_sources(corpus) -> str:
    f = corpus["folder"]
    return (
        f"  - {{kind: image-text, name: photos, paths: [{f['photos']}]}}\n"
        f"  - {{kind: svg, name: icons, paths: [{f['svg']}]}}\n"
        f"  - {{kind: dna, name: genome, paths: [{f['dna']}], max_length: 2000}}\n"
        f"  - {{kind: text, name: verses, paths: [{f['text']}]}}\n"
    )


def raw_sources(corpus) -> str:
    """Every URL form: http(s), a local file, pipe:, a brace pattern."""
    raw = corpus["root"] / "raw"
    return (
        f"  - {{kind: webdataset, name: photos, paths: ['{corpus['url']}/photos.tar', "
        f"{raw / 'bad.tar'}]}}\n"
        f"  - {{kind: webdataset, name: icons, paths: ['pipe:cat {raw / 'svg.tar'}'], "
        "fields: {record: svg}}\n"
        f"  - {{kind: webdataset, name: genome, paths: [{raw / 'dna.tar'}], max_length: 2000, "
        "fields: {record: dna}}\n"
        f"  - {{kind: webdataset, name: verses, paths: ['{raw}/text-{{000000..000001}}.tar'], "
        "fields: {record: text, text: txt}}\n"
    )


def documents(out: Path) -> list[tuple]:
    return [
        (d.source, d.tokens.tolist(), d.modality.tolist())
        for p in sorted(out.glob("t-*.tar"))
        for d in read_shard(str(p))
    ]


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("t-*.tar")}


@pytest.fixture(scope="module")
def from_raw(corpus) -> tuple[Path, dict, str]:
    """(recipe, manifest, log) of the raw shards prepared with two workers."""
    path = recipe(corpus, "from-raw", raw_sources(corpus))
    logger, records = logging.getLogger("mmfm"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        manifest = prepare(load_prepare_recipe(path), workers=2, progress=False)
    finally:
        logger.removeHandler(handler)
    return path, manifest, "\n".join(records)


def test_raw_shards_give_the_documents_of_the_same_files(corpus, from_raw):
    root = corpus["root"]
    from_folders = load_prepare_recipe(recipe(corpus, "from-folders", folder_sources(corpus)))
    expected = prepare(from_folders, progress=False)
    raw_recipe, manifest, log = from_raw

    docs = documents(root / "from-raw")
    assert docs == documents(root / "from-folders")
    assert {s for s, _, _ in docs} == {"photos", "icons", "genome", "verses"}
    assert manifest["tokens_by_modality"] == expected["tokens_by_modality"]
    assert all(manifest["tokens_by_modality"][m] for m in ("text", "image", "dna", "svg"))
    # Bad members are counted per reason, per source, and logged with their shard and key.
    bad = {"undecodable": 1, "missing_text": 1, "invalid_utf8": 1}
    assert manifest["rejected"] == bad
    sources = manifest["sources"]
    assert list(sources) == ["photos", "icons", "genome", "verses"]
    assert sources["photos"] == {
        "documents": 3,
        "tokens": sum(len(t) for s, t, _ in docs if s == "photos"),
        "rejected": bad,
    }
    assert sources["verses"]["documents"] == 20 and sources["verses"]["rejected"] == {}
    assert sum(s["tokens"] for s in sources.values()) == manifest["tokens"]
    for key in ("cut", "nocaption", "latin1"):
        assert f"bad.tar:{key}" in log

    # The same recipe again: every shard is already done, nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in (root / "from-raw").glob("t-*.tar")}
    assert prepare(load_prepare_recipe(raw_recipe), progress=False) == manifest
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_raw_shards_streamed_give_the_documents_prepare_made(corpus, from_raw):
    """Tokenized in the training stream: the http-served photos (img2dataset's jpg + txt or
    json caption, the tiny SEED-style image tokenizer, pictures encoded in one batch) and the
    DNA windowed by max_length give the documents mmfm prepare made of the same shards."""
    root, tok = corpus["root"], str(corpus["root"] / "tok.yaml")
    prepared = documents(root / "from-raw")
    photos = source_spec(
        "photos", (f"{corpus['url']}/photos.tar",), tokenize=tok, fields=RawFields()
    )
    dna = RawFields(record="dna")
    genome = source_spec(
        "genome", (str(root / "raw/dna.tar"),), tokenize=tok, fields=dna, max_length=2000
    )
    settings = stream_settings(1, seq_len=4096)
    for spec in (photos, genome):
        read = read_raw_unit(Unit(spec.urls[0], 1, 0), 0, Skips(1.0), spec, settings)
        streamed = [(d.source, d.tokens.tolist(), d.modality.tolist()) for _, d in read]
        assert streamed == [d for d in prepared if d[0] == spec.name]
    assert len([d for d in prepared if d[0] == "genome"]) > len(DNA)  # cut into windows


def test_changed_recipe_or_inputs_is_refused_and_overwrite_rebuilds(corpus, from_raw, capsys):
    root, out = corpus["root"], corpus["root"] / "rerun"
    shutil.copytree(root / "from-raw", out)  # made with two workers
    path = recipe(corpus, "rerun", raw_sources(corpus))
    first = from_raw[1]
    shards, docs = digests(out), documents(out)

    bigger = load_prepare_recipe(path, ["shard_size=8"])
    with pytest.raises(ConfigError, match=r"the recipe changed.*--overwrite"):
        prepare(bigger, progress=False)
    assert digests(out) == shards  # refused before touching anything

    os.utime(root / "raw/dna.tar")  # an input rewritten: a new modification time
    with pytest.raises(SystemExit) as exit_code:
        main(["prepare", str(path), "--workers", "1"])
    message = capsys.readouterr().err.strip()
    assert exit_code.value.code == 2 and "\n" not in message
    assert "the inputs changed" in message and "--overwrite" in message

    main(["prepare", str(path), "--workers", "1", "--overwrite"])
    rebuilt = json.loads((out / "manifest.json").read_text())
    assert rebuilt["fingerprint"]["inputs"] != first["fingerprint"]["inputs"]
    assert rebuilt["fingerprint"]["recipe"] == first["fingerprint"]["recipe"]
    # Rebuilt with one worker instead of two: byte for byte the same shards.
    assert digests(out) == shards
    markers = [json.loads(p.read_text()) for p in (out / ".stats").glob("*.json")]
    assert len(markers) == len(shards)
    assert {m["fingerprint"]["all"] for m in markers} == {rebuilt["fingerprint"]["all"]}

    # Fewer, larger shards with --overwrite: no shard of the old layout is left behind.
    prepare(bigger, progress=False, overwrite=True)
    assert 0 < len(digests(out)) < len(shards)
    assert documents(out) == docs


def test_field_mapping_alternatives_and_rejects(corpus, real_data):
    """RawFields alternatives in order (png after jpg, json:caption after txt), image-mask
    records, and each reason a sample is refused for."""
    png = (real_data("photos") / "horse.png").read_bytes()  # black on white: its own mask
    fields = RawFields(record="image-mask", image=["jpg", "png"], text=["txt", "json:title"])
    rejects = []
    decode = RawDecoder(fields, "masks")
    samples = {
        "ok": {"png": png, "mask.png": png, "json": b'{"title": "a horse"}'},
        "nomask": {"png": png, "txt": b"a horse"},
        "badjson": {"png": png, "mask.png": png, "json": b"[1, 2]"},
        "nocaption": {"png": png, "mask.png": png, "json": b'{"url": "x"}'},
    }
    records = {
        key: decode("s.tar", {"__key__": key, **sample}, lambda *r: rejects.append(r))
        for key, sample in samples.items()
    }
    (ok,) = records.pop("ok")
    assert ok.text == "a horse" and ok.image.shape[:2] == ok.mask.shape
    assert set(np.unique(ok.mask)) == {0, 1}
    assert not any(records.values())
    assert sorted((reason, where) for reason, where, _ in rejects) == [
        ("bad_json", "s.tar:badjson"),
        ("missing_mask", "s.tar:nomask"),
        ("missing_text", "s.tar:nocaption"),
    ]
    # Local shards are counted from their headers, for the progress bar's total.
    raw = corpus["root"] / "raw"
    assert count_samples(str(raw / "photos.tar")) == 3 and count_samples(str(raw / "bad.tar")) == 3
    assert count_samples(f"{corpus['url']}/photos.tar") is None
