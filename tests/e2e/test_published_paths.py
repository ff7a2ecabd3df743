"""A published image tokenizer on every other path a user takes with pictures: `mmfm prepare`
of a VOC segmentation export and of raw WebDataset shards, on-the-fly tokenization of raw
shards in the training stream, pictures in `mmfm generate` prompts, `mmfm eval`; and
transformers' ChameleonVQVAE, which has no decoder, refused for picture answers before
anything is loaded. Tiny random JanusVQVAE / ChameleonVQVAE saved with save_pretrained; the
codes are checked against the library's own encode; the model is an untrained checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfm.cli import main
from mmfm.config.schema import RawFields
from mmfm.convert.hf import export_hf
from mmfm.core.errors import ConfigError
from mmfm.core.types import Modality
from mmfm.data.deal import Unit
from mmfm.data.shards import read_shard
from mmfm.data.skips import Skips
from mmfm.data.units import read_raw_unit
from mmfm.decoding.prompts import Prompt
from mmfm.decoding.sampling import Sampling
from mmfm.generate import command as generate_command
from mmfm.testing import source_spec, stream_settings, tiny_shape, voc_export
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.text import text_of_vocab
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.published import load_published, parse_spec
from mmfm.tokenization.visual.records import VisualTokenizers
from mmfm.tokenization.visual.train import VisualRecipe, build, save_visual
from mmfm.tokenization.vocab import Vocab, VocabError

from helpers import PUBLISHED_SIZE as SIZE
from helpers import TINY_VISUAL, random_checkpoint, tiny_published_models

pytest.importorskip("diffusers")
pytest.importorskip("webdataset")
AutoConfig = pytest.importorskip("transformers").AutoConfig

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = [
    pytest.mark.xdist_group("test_published_paths"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # numpy 2
]

REPO = Path(__file__).resolve().parents[2]
BASE_TEXT = REPO / "tokenizers" / "base" / "text.model"


@pytest.fixture(scope="module")
def pub(tmp_path_factory, real_data) -> dict:
    """Three tokenizer sets (the base text model imported, not trained): `janus` (a JanusVQVAE
    image tokenizer and a tiny mask tokenizer of mmfm's own), `chameleon` and `emu3` (an
    Emu3VQVAE with Emu3's framing, and for video), each with
    `mmfm tokenizer train`'s vocabulary and an untrained tiny model checkpoint of it; and
    a raw WebDataset shard of six real photos as JPEGs with captions."""
    root = tmp_path_factory.mktemp("published-paths")
    models = tiny_published_models()
    save_visual(
        build(VisualRecipe(kind="himtok_mask", model=TINY_VISUAL["himtok_mask"])), root / "mask"
    )
    out = {"models": models, "root": root}
    emu3_video = (
        "video_tokenizer: {library: transformers, class: Emu3VQVAE, "
        f"path: {root / 'Emu3VQVAE'}, resolution: {SIZE}}}\n"
    )
    for name, cls, options, extra in (
        ("janus", "JanusVQVAE", "", f"mask_tokenizer: {root / 'mask'}\n"),
        ("chameleon", "ChameleonVQVAE", "", ""),
        ("emu3", "Emu3VQVAE", f", resolution: {SIZE}, framing: emu3", emu3_video),
    ):
        models[cls].save_pretrained(root / cls)
        recipe = root / f"{name}.yaml"
        recipe.write_text(
            f"name: {name}\noutput_dir: {root / name}\ntext: {{pretrained: {BASE_TEXT}}}\n"
            f"image_tokenizer: {{library: transformers, class: {cls}, path: {root / cls}"
            f"{options}}}\n" + extra
        )
        main(["tokenizer", "train", str(recipe)])
        vocab = root / name / "vocab.json"
        size = -(-Vocab.load(vocab).size // 64) * 64
        checkpoint = random_checkpoint(
            root / f"ckpt-{name}", [*tiny_shape(2, 512), f"model.vocab_size={size}"], vocab
        )
        out[name] = {"recipe": str(recipe), "vocab": Vocab.load(vocab), "ckpt": str(checkpoint)}
    import webdataset as wds

    photos = sorted(real_data("photos").glob("*.png"))[:6]
    with wds.TarWriter(str(root / "photos.tar")) as sink:
        for path in photos:
            picture = Image.open(path).convert("RGB")
            picture.thumbnail((64, 64))
            jpg = io.BytesIO()
            picture.save(jpg, "JPEG", quality=90)
            sink.write({"__key__": path.stem, "jpg": jpg.getvalue(), "txt": path.stem.encode()})
    out["raw"] = str(root / "photos.tar")
    out["photos"] = real_data("photos")
    return out


def library_codes(model, pictures: list[np.ndarray]) -> list[list[int]]:
    """The library's own codes of pictures made square as mmfm makes them (crop, resize)."""
    x = vdata.to_tensor([vdata.square(vdata.fit_square(p, "crop"), SIZE) for p in pictures])
    with torch.no_grad():
        return model.eval().encode(x).image_tokens.view(len(x), -1).tolist()


def image_codes(doc, vocab: Vocab) -> list[list[int]]:
    """The codebook indices of every image span of a document."""
    ids, (start, end) = doc.tokens.tolist(), vocab.delimiters(Modality.IMAGE)
    offset, spans = vocab.codebook("image").offset, []
    for i, t in enumerate(ids):
        if t == start:
            spans.append([c - offset for c in ids[i + 1 : ids.index(end, i)]])
    return spans


@pytest.fixture(scope="module")
def prepared(pub, tmp_path_factory) -> dict:
    """A VOC export (five photos, one labelled class each), a COCO instances json (one photo,
    one polygon) and the raw shard of `pub`, prepared in one `mmfm prepare` run with the
    Janus set: (shard folder, documents by source)."""
    root = tmp_path_factory.mktemp("prepared")
    voc = voc_export(root / "voc", pub["photos"])
    Image.open(pub["photos"] / "coffee.png").convert("RGB").save(root / "cup.jpg")
    square = [40.0, 40.0, 200.0, 40.0, 200.0, 200.0, 40.0, 200.0]
    coco = {
        "images": [{"id": 1, "file_name": "cup.jpg", "height": 400, "width": 600}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": [square]}
        ],
        "categories": [{"id": 2, "name": "cup"}],
    }
    (root / "instances.json").write_text(json.dumps(coco))
    (root / "prep.yaml").write_text(
        f"name: p\noutput: {root / 'shards'}\ntokenizer: {pub['janus']['recipe']}\n"
        f"shard_size: 100\nsources:\n  - {{kind: voc, name: seg, paths: [{voc}], fit: crop}}\n"
        f"  - {{kind: webdataset, name: photos, paths: [{pub['raw']}]}}\n"
        f"  - {{kind: coco, name: coco, paths: [{root / 'instances.json'}], fit: crop}}\n"
    )
    main(["prepare", str(root / "prep.yaml"), "--workers", "1"])
    docs: dict[str, list] = {"seg": [], "photos": [], "coco": []}
    for path in sorted((root / "shards").glob("*.tar")):
        for doc in read_shard(str(path)):
            docs[doc.source].append(doc)
    return {"shards": root / "shards", "voc": voc, "cup": root / "cup.jpg", "docs": docs}


def test_chameleon_picture_answers_are_refused_before_loading_text_answers_work(
    pub, tmp_path, monkeypatch
):
    loads = []
    load = generate_command.load_model
    monkeypatch.setattr(generate_command, "load_model", lambda *a: loads.append(a) or load(*a))
    cham = pub["chameleon"]
    image = pub["photos"] / "coffee.png"
    args = generate_command.GenerateArgs(
        cham["ckpt"], ["a cup"], str(tmp_path / "out"), "image", Sampling(max_new_tokens=4),
        tokenizers=cham["recipe"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="ChameleonVQVAE has no decoder") as refused:
        generate_command.run(args)
    assert "--prompt 1: a image answer cannot be decoded" in str(refused.value)
    assert not loads and not (tmp_path / "out").exists()
    # the same tokenizer encodes a picture in the prompt, for a text answer
    prompt = Prompt("{image} what is this?", {"image": str(image)}, "text")
    (record,) = generate_command.run(
        generate_command.GenerateArgs(
            cham["ckpt"], [prompt], str(tmp_path / "out"), "image", Sampling(max_new_tokens=4),
            tokenizers=cham["recipe"],
        )
    )  # fmt: skip
    assert len(loads) == 1 and len(record["new_ids"]) == 4
    vocab, ids = cham["vocab"], record["prompt_ids"]
    start, end = vocab.delimiters(Modality.IMAGE)
    codes = [i - vocab.codebook("image").offset for i in ids[ids.index(start) + 1 : ids.index(end)]]
    (theirs,) = library_codes(pub["models"]["ChameleonVQVAE"], [vdata.read_image(image)])
    assert codes == theirs and len(codes) == 16 * 16


@pytest.mark.slow  # the prepared fixture: 20-40 s on 2 loaded cores (a spawned worker)
def test_prepare_voc_and_coco_sets_with_a_published_image_tokenizer(pub, prepared):
    docs, voc = prepared["docs"]["seg"], prepared["voc"]
    assert len(docs) == 5  # one labelled class per picture
    vocab = pub["janus"]["vocab"]
    mask_open = vocab.delimiters(Modality.MASK)[0]
    pictures = [vdata.read_image(voc / "JPEGImages" / f"{d.key.split(':')[0]}.jpg") for d in docs]
    want = library_codes(pub["models"]["JanusVQVAE"], pictures)
    assert [image_codes(d, vocab) for d in docs] == [[w] for w in want]
    assert all(mask_open in d.tokens.tolist() for d in docs)  # mmfm's own mask tokenizer
    (cup,) = prepared["docs"]["coco"]
    cup_jpg = vdata.read_image(prepared["cup"])
    want = library_codes(pub["models"]["JanusVQVAE"], [cup_jpg])
    assert image_codes(cup, vocab) == want and mask_open in cup.tokens.tolist()


@pytest.mark.slow  # the prepared fixture: 20-40 s on 2 loaded cores (a spawned worker)
def test_prepare_raw_shards_and_tokenize_them_in_the_stream_alike(pub, prepared, monkeypatch):
    docs = prepared["docs"]["photos"]
    vocab = pub["janus"]["vocab"]
    import webdataset as wds

    samples = list(wds.WebDataset(pub["raw"], shardshuffle=False).decode("rgb8"))
    pictures = {s["__key__"]: s["jpg"] for s in samples}
    want = library_codes(pub["models"]["JanusVQVAE"], list(pictures.values()))
    by_key = dict(zip(pictures, want, strict=True))
    assert len(docs) == 6
    assert all(image_codes(d, vocab) == [by_key[d.key]] for d in docs)

    calls = []
    encode = VisualTokenizers._encode

    def counted(self, name, pictures, device):
        calls.append(len(pictures))
        return encode(self, name, pictures, device)

    monkeypatch.setattr(VisualTokenizers, "_encode", counted)
    spec = source_spec(
        "photos", [pub["raw"]], tokenize=pub["janus"]["recipe"], fields=RawFields(),
        tokenize_batch=4, tokenize_device="cpu",
    )  # fmt: skip
    read = read_raw_unit(Unit(pub["raw"], 1, 0), 0, Skips(1.0), spec, stream_settings(1))
    streamed = {d.key: d for _, d in read}
    assert [n for n in calls if n] == [4, 2]  # a window of 4 pictures in one call, then 2
    assert {k: image_codes(d, vocab) for k, d in streamed.items()} == {
        k: [c] for k, c in by_key.items()
    }


@pytest.mark.slow  # the prepared fixture: 20-40 s on 2 loaded cores (a spawned worker)
def test_eval_of_shards_made_with_a_published_tokenizer(pub, prepared, tmp_path):
    out = tmp_path / "eval.json"
    main(["eval", pub["janus"]["ckpt"], str(prepared["shards"]), "--json", str(out)])
    got = json.loads(out.read_text())["modalities"]
    # <img>, 64 codes, </img> of 12 pictures (5 VOC, 6 raw, 1 COCO); <mask>, 32 codes,
    # </mask> of 6
    assert got["image"]["targets"] == 12 * (8 * 8 + 2)
    assert got["mask"]["targets"] == 6 * (32 + 2)
    assert np.isfinite(got["image"]["loss"])


def test_an_hf_export_names_its_published_tokenizer_in_config_json(pub, tmp_path):
    out = export_hf(pub["janus"]["ckpt"], tmp_path / "hf", dtype="fp32")
    recorded = AutoConfig.from_pretrained(out).mmfm_visual_tokenizers
    book = pub["janus"]["vocab"].codebook("image")
    assert set(recorded) == {"image"}  # the mask tokenizer is mmfm's own: not named
    assert recorded["image"] == {
        "library": "transformers", "class": "JanusVQVAE",
        "path": str(pub["root"] / "JanusVQVAE"), "fit": "crop",
        "source": book.source, "first_id": book.offset, "codes": 64,
    }  # fmt: skip
    # what it names loads the tokenizer that made the codes
    keys = ("library", "class", "path", "prefix", "subfolder", "resolution", "fit")
    spec = parse_spec({k: v for k, v in recorded["image"].items() if k in keys}, "export")
    assert load_published(spec).source == book.source


def test_emu3_framing_frames_decodes_and_constrains_generation(pub, tmp_path):
    """Emu3's layout (transformers' Emu3Processor: `H*W`, the image token, rows each closed by
    an end-of-line, end of frame) with mmfm's tokens; the span grammar makes an untrained
    model write exactly it, and decoding strips it."""
    emu3, library = pub["emu3"], pub["models"]["Emu3VQVAE"].eval()
    vocab = emu3["vocab"]
    assert vocab.codebook("image").source.endswith(" framing emu3")
    visual = VisualTokenizers(load_recipe(emu3["recipe"]), vocab)
    photo = vdata.read_image(pub["photos"] / "coffee.png")
    ids, modality = visual.span("image", photo)
    x = vdata.to_tensor([vdata.square(vdata.fit_square(photo, "crop"), SIZE)])
    with torch.no_grad():
        (grid,) = library.encode(x, image_sizes=torch.tensor([[SIZE, SIZE]])).image_tokens
    assert grid.shape == (16, 16)  # Emu3VQVAE of two levels: 2x down
    offset, (start, end) = vocab.codebook("image").offset, vocab.delimiters(Modality.IMAGE)
    eol, eof = vocab.special("<eol>"), vocab.special("<eof>")
    header = [*text_of_vocab(vocab).encode("16*16"), vocab.special("<grid>")]
    rows = [i for row in grid.tolist() for i in ([c + offset for c in row] + [eol])]
    assert modality == Modality.IMAGE and ids == [start, *header, *rows, eof, end]
    with torch.no_grad():
        want = vdata.to_uint8(library.decode(grid[None]).clamp(-1, 1))[0]
    assert np.array_equal(visual.decode(Modality.IMAGE, ids[1:-1]), want)
    broken = ids[1:-1]
    broken[len(header) + 16] = offset  # a code where the first row's <eol> goes
    with pytest.raises(VocabError, match=f"holds id {offset} at {len(header) + 16}"):
        visual.decode(Modality.IMAGE, broken)

    length = len(ids) - 2
    args = generate_command.GenerateArgs(
        emu3["ckpt"], ["a cup"], str(tmp_path / "out"), "image",
        Sampling(max_new_tokens=length + 1), tokenizers=emu3["recipe"],
    )  # fmt: skip
    (record,) = generate_command.run(args)
    new = record["new_ids"]
    assert new[length] == end  # the untrained model wrote a whole span, by the grammar alone
    body = new[:length]
    assert [i for i, w in zip(body, ids[1:-1], strict=True) if not offset <= w < offset + 64] == [
        w for w in ids[1:-1] if not offset <= w < offset + 64
    ]  # header, row ends and <eof> where Emu3 has them; codes everywhere else
    span = json.loads((tmp_path / "out" / "generations.jsonl").read_text())["spans"][0]
    with Image.open(span["path"]) as im:
        assert im.size == (SIZE, SIZE)


def test_emu3_video_answers_decode_four_frames_per_grid(pub, tmp_path):
    """A video answer of one code grid (the grammar: a grid's codes, then <eov>) becomes four
    frames through Emu3VQVAE's video decode."""
    emu3 = pub["emu3"]
    frame = 16 * 16  # a grid of the tiny Emu3VQVAE at 32 px
    args = generate_command.GenerateArgs(
        emu3["ckpt"], ["a clip"], str(tmp_path / "out"), "video",
        Sampling(max_new_tokens=frame + 2), tokenizers=emu3["recipe"],
    )  # fmt: skip
    (record,) = generate_command.run(args)
    vocab = emu3["vocab"]
    ends = [i for i in record["new_ids"] if i in (vocab.special("<eof>"), vocab.special("<eov>"))]
    assert ends == [vocab.special("<eov>")] and record["new_ids"][-1] == vocab.special("</vision>")
    span = json.loads((tmp_path / "out" / "generations.jsonl").read_text())["spans"][0]
    with Image.open(span["path"]) as gif:
        assert gif.size == (SIZE, SIZE) and gif.n_frames == 4  # one grid: four frames
