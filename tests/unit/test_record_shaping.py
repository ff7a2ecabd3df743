"""Record shaping at prepare time: condition dropout and caption order (drawn per record from
the seed), prompt / response tasks (the prompt never a target) and label replication."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfm.core.errors import ConfigError
from mmfm.core.types import (
    Batch,
    DnaRecord,
    ImageMaskRecord,
    ImageRecord,
    Modality,
    SvgRecord,
    TaskPart,
    TaskRecord,
    VideoRecord,
)
from mmfm.data.packing import RowBuilder, modality_weight_table
from mmfm.decoding.engine import unconditional_prompt
from mmfm.decoding.layout import Layout
from mmfm.prepare import PrepareRecipe, PrepareSource, Rejects
from mmfm.prepare.fingerprint import fingerprint, non_default_options
from mmfm.prepare.shaping import realised
from mmfm.prepare.tasks import task_records
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.shaping import Shaping, shape, svg_caption
from mmfm.tokenization.text import BOS, EOS
from mmfm.tokenization.tokenizers import Tokenizers

from helpers import tiny_visual_recipe

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_record_shaping")

REPO = Path(__file__).resolve().parents[2]
RULE = Shaping(uncond_ratio=0.1, order="both", reverse_ratio=0.5)
PICTURE = np.full((32, 32, 3), 200, np.uint8)


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> Tokenizers:
    """The base text model with tiny untrained visual tokenizers: the layout of documents is
    under test, not the codes."""
    return Tokenizers.load(load_recipe(str(tiny_visual_recipe(tmp_path_factory.mktemp("tok")))))


def captioned(n: int, source: str = "photos") -> list[ImageRecord]:
    return [ImageRecord(f"img{i:04d}", PICTURE, f"picture {i}", source) for i in range(n)]


def choices(records, seed: int) -> dict[str, tuple]:
    return {r.key: shape(r, RULE, seed)[1] for r in records}


def test_choices_follow_seed_source_and_key_and_match_the_ratios():
    records = captioned(400)
    first = choices(records, seed=0)
    assert choices(records[::-1], seed=0) == first  # not the reading order: the key
    assert choices(records, seed=1) != first
    assert choices(captioned(400, "other"), seed=0) != first
    shares = realised(Counter(t for tags in first.values() for t in tags))
    print("realised on 400 records:", shares)
    assert shares["uncond"]["of"] == 400 and 0.06 <= shares["uncond"]["ratio"] <= 0.14
    assert shares["image_first"]["of"] == 400 - shares["uncond"]["count"]
    assert 0.42 <= shares["image_first"]["ratio"] <= 0.58
    dropped = [r for r in records if "uncond" in first[r.key]]
    assert all(shape(r, RULE, 0)[0].text is None for r in dropped)
    uncaptioned = ImageRecord("x", PICTURE, None, "photos")
    assert shape(uncaptioned, RULE, 0) == (uncaptioned, ())
    assert shape(records[0], None, 0) == (records[0], ())
    always = Shaping(order="image_first")
    assert {shape(r, always, 0)[0].order for r in records} == {"image_first"}


def test_image_first_documents_put_the_caption_after_the_picture(toks):
    caption = toks.text.encode("a cat on a mat")
    img_open, img_close = toks.vocab.delimiters(Modality.IMAGE)
    doc = toks.encode(ImageRecord("k", PICTURE, "a cat on a mat", order="image_first"))
    close = doc.tokens.tolist().index(img_close)
    assert doc.tokens[:2].tolist() == [BOS, img_open]
    assert doc.tokens[close + 1 :].tolist() == [*caption, EOS]
    assert [s[0] for s in doc.segments()] == ["text", "image", "text"]
    text_first = toks.encode(ImageRecord("k", PICTURE, "a cat on a mat"))
    assert text_first.tokens[1 : 1 + len(caption)].tolist() == caption
    assert sorted(text_first.tokens.tolist()) == sorted(doc.tokens.tolist())  # same ids, moved
    mask = np.zeros((32, 32), np.uint8)
    masked = toks.encode(ImageMaskRecord("k", PICTURE, mask, "the cat", order="image_first"))
    assert [s[0] for s in masked.segments()] == ["text", "image", "text", "mask", "text"]
    clip = toks.encode(VideoRecord("k", np.stack([PICTURE] * 2), "a clip", order="image_first"))
    assert [s[0] for s in clip.segments()] == ["text", "video", "text"]


@pytest.mark.parametrize("modality", ["image", "video"])
def test_unconditional_documents_begin_with_the_prompt_of_generate(toks, modality):
    """The trained unconditional branch is what `mmfm generate --cfg-scale` feeds: the same
    ids before the picture's codes, and the conditional documents begin as its prompts."""
    layout = Layout.from_vocab(toks.vocab)
    caption = "a red cross on a blue background"
    if modality == "image":
        record = ImageRecord("k", PICTURE, caption, "photos")
    else:
        record = VideoRecord("k", np.stack([PICTURE] * 2), caption, "clips")
    rule = Shaping(uncond_ratio=1.0)
    dropped, tags = shape(record, rule, 0)
    assert tags == ("captioned", "uncond")
    prompt = layout.prompt(caption, modality)
    uncond = unconditional_prompt(prompt, layout)
    assert toks.encode(dropped).tokens[: len(uncond)].tolist() == uncond
    assert toks.encode(record).tokens[: len(prompt)].tolist() == prompt
    assert len(uncond) == 2  # <s> and the opening delimiter: no caption left


def weights_of(toks, doc) -> torch.Tensor:
    """The document packed alone into a row, as a Batch: its `loss_weights`."""
    row = RowBuilder(len(doc.tokens) + 4, modality_weight_table({}))
    row.add(doc, 0, len(doc.tokens))
    arrays = row.finish()
    batch = Batch(**{k: torch.from_numpy(v)[None] for k, v in arrays.items()})
    return batch.loss_weights[0, : len(doc.tokens)]


def prompt_length(doc) -> int:
    ((start, end),) = doc.no_loss
    assert start == 0
    return end


@pytest.mark.parametrize(
    "prompt, response, kinds",
    [
        ([("dna", "TATAAAAGGCCATGCA")], [("text", "promoter")], ["text", "dna", "text"]),
        ([("text", "a red circle")], [("svg", '<svg viewBox="0 0 8 8"><circle r="4"/></svg>')],
         ["text", "svg", "text"]),
        ([("image", PICTURE), ("text", "segment the cat")], [("mask", np.ones((32, 32), np.uint8))],
         ["text", "image", "text", "mask", "text"]),
    ],
)  # fmt: skip
def test_task_prompts_weigh_zero_and_responses_full(toks, prompt, response, kinds):
    record = TaskRecord(
        "t", tuple(TaskPart(*p) for p in prompt), tuple(TaskPart(*p) for p in response), "sft"
    )
    doc = toks.encode(record)
    assert [s[0] for s in doc.segments()] == kinds
    n = prompt_length(doc)
    weights = weights_of(toks, doc)  # weights[i]: of the target token i + 1
    assert weights[: n - 1].eq(0).all(), "a prompt token is a target"
    assert weights[n - 1 : len(doc.tokens) - 1].eq(1).all(), "a response token lost its weight"
    assert weights[n - 1 :].sum() == len(doc.tokens) - n  # every response token, </s> included
    sep = toks.vocab.special("<sep>")
    assert (doc.tokens[n - 1] == sep) == (response[0][0] == "text")
    response_ids = doc.tokens[n:].tolist()
    if response[0][0] == "text":
        assert response_ids == [*toks.text.encode(response[0][1]), EOS]
    else:
        open_id = toks.vocab.delimiters(Modality[response[0][0].upper()])[0]
        assert response_ids[0] == open_id  # the opening delimiter is learned: a target


def write_tasks(tmp_path: Path, lines: list) -> Path:
    Image.fromarray(PICTURE).save(tmp_path / "cat.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "cat.mask.png")
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(tmp_path / "small.mask.png")
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_task_reader_parts_label_replication_and_rejects(toks, tmp_path):
    path = write_tasks(
        tmp_path,
        [
            {"prompt": {"dna": "TATAAAAGG"}, "response": "promoter"},
            {"prompt": [{"image": "cat.png"}, "the cat"], "response": {"mask": "cat.mask.png"}},
            {"prompt": "a circle", "response": {"svg": "<svg/>"}},  # not text: no replication
            {"prompt": {"dna": "ACGT"}},
            {"prompt": {"rna": "ACGU"}, "response": "x"},
            {"prompt": {"image": "../cat.png"}, "response": "x"},
            {"prompt": {"image": "gone.png"}, "response": "x"},
            {"prompt": {"image": "cat.png"}, "response": {"mask": "small.mask.png"}},
            "{not json",
        ],
    )  # fmt: skip
    source = PrepareSource(kind="prompt-response", name="sft", paths=[str(path)], label_repeat=3)
    rejects = Rejects()
    records = list(task_records(path, source, rejects))
    assert [r.key for r in records] == ["tasks:1", "tasks:2", "tasks:3"]
    assert records[0].response == (TaskPart("text", "promoter promoter promoter"),)
    assert records[2].response == (TaskPart("svg", "<svg/>"),)
    assert toks.decode(toks.encode(records[0]).tokens)[-1] == (
        "text", "promoter promoter promoter"
    )  # fmt: skip
    assert [p.kind for p in records[1].prompt] == ["image", "text"]
    assert records[1].response[0].value.shape == (32, 32)
    assert dict(rejects.counts) == {
        "missing_field": 1, "bad_part": 1, "outside_root": 1,
        "missing_file": 1, "bad_mask": 1, "bad_json": 1,
    }  # fmt: skip


def test_recipe_fields_are_checked_and_fingerprinted(tmp_path):
    def source(**fields) -> PrepareSource:
        return PrepareSource(kind=fields.pop("kind", "image-text"), paths=["x"], **fields)

    with pytest.raises(ConfigError, match="uncond_ratio and order apply to captioned"):
        source(kind="text", uncond_ratio=0.1)
    with pytest.raises(ConfigError, match="order"):
        source(order="sideways")
    with pytest.raises(ConfigError, match="reverse_ratio must be in"):
        source(order="both", reverse_ratio=1.5)
    with pytest.raises(ConfigError, match="label_repeat applies to prompt-response"):
        source(label_repeat=10)
    with pytest.raises(ConfigError, match="differ in uncond_ratio"):
        PrepareRecipe(sources=[source(name="a"), source(name="a", uncond_ratio=0.1)])
    tok = load_recipe(str(REPO / "tokenizers/base.yaml"))
    tok.output_dir = str(REPO / "tokenizers/base")

    def digest(**fields) -> str:
        return fingerprint(PrepareRecipe(sources=[source(**fields)]), tok, [[]])["recipe"]

    plain = digest()
    for fields in ({"uncond_ratio": 0.1}, {"order": "image_first"}, {"order": "both"}):
        assert digest(**fields) != plain
    assert digest(order="both", reverse_ratio=0.3) != digest(order="both")


def test_options_at_their_defaults_leave_the_fingerprint_alone():
    """An option a later mmfm adds with a default keeps earlier outputs' fingerprints: only
    options set away from their defaults enter it."""
    tok = load_recipe(str(REPO / "tokenizers/base.yaml"))
    tok.output_dir = str(REPO / "tokenizers/base")
    explicit = PrepareSource(kind="image-text", paths=["x"], uncond_ratio=0.0, order="text_first")
    implicit = PrepareSource(kind="image-text", paths=["x"])
    assert non_default_options(implicit) == {"kind": "image-text", "paths": ["x"], "fit": "crop"}

    def digest(source: PrepareSource) -> str:
        return fingerprint(PrepareRecipe(sources=[source]), tok, [[]])["recipe"]

    assert digest(explicit) == digest(implicit)
    assert digest(PrepareSource(kind="image-text", paths=["x"], limit=3)) != digest(implicit)


def test_completion_only_keeps_the_tokens_and_makes_the_condition_a_prompt(toks):
    """completion_only: the plain document's tokens, with `<s>` and the condition a no_loss
    span (a <sep> before a text answer is the one token it adds); records without a
    condition keep every target."""
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    plain = [
        DnaRecord("cds", "ATGGCGTAA" * 4, output="ribosomal protein"),
        ImageMaskRecord("m", PICTURE, mask, text="segment the square"),
        replace(ImageMaskRecord("m", PICTURE, mask, text="segment it"), order="image_first"),
        ImageRecord("i", PICTURE, text="a grey picture"),
        VideoRecord("v", np.stack([PICTURE] * 2), text="grey frames"),
        SvgRecord(  # as an svg source's reader makes it with completion_only
            "zoom_to-rect",
            '<svg viewBox="0 0 8 8"><rect width="4" height="4"/></svg>',
            text=svg_caption("zoom_to-rect"),
        ),
    ]
    answers = ("text", "mask", "mask", "image", "video", "svg")
    rule = Shaping(completion_only=True)
    for record, answer in zip(plain, answers, strict=True):
        doc, want = toks.encode(shape(record, rule, seed=0)[0]), toks.encode(record).tokens.tolist()
        assert doc.tokens.tolist() == want, record.key
        n = prompt_length(doc)
        segment = doc.segments()[-1 if answer == "text" else -2]  # the answer (</s>: text)
        assert segment[0] == answer and segment[1] >= n - 1, record.key
        weights = weights_of(toks, doc)  # weights[i]: of the target token i + 1
        assert weights[: n - 1].eq(0).all() and weights[n - 1 : len(doc.tokens) - 1].eq(1).all()
    image_first = replace(ImageRecord("c", PICTURE, text="a caption"), order="image_first")
    doc = toks.encode(shape(image_first, rule, seed=0)[0])
    assert toks.vocab.special("<sep>") in doc.tokens.tolist()  # picture -> caption
    assert shape(DnaRecord("g", "ACGT" * 8), rule, seed=0)[0] == DnaRecord("g", "ACGT" * 8)
    repeated = shape(plain[0], Shaping(completion_only=True, label_repeat=3), seed=0)[0]
    assert repeated.response[0].value == "ribosomal protein ribosomal protein ribosomal protein"
