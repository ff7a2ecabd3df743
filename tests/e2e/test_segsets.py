"""Segmentation sets as they come: a VOC / labelme folder and a COCO json the tests write
around a real photo, read as referring-segmentation documents (one per image and class),
void excluded, pictures letterboxed, Otsu only when asked."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfm.core.errors import ConfigError, InputNotFound
from mmfm.data.shards import read_shard
from mmfm.prepare import PrepareRecipe, PrepareSource, Rejects, iter_records, prepare
from mmfm.testing import voc_palette
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.text import BOS, EOS
from mmfm.tokenization.tokenizers import Tokenizers
from mmfm.tokenization.visual import data as vdata

from helpers import tiny_visual_recipe

REPO = Path(__file__).resolve().parents[2]
VOID = 255


def labelled(shape: tuple[int, int]) -> np.ndarray:
    """Label map of a wide frame: a cat (1) in the middle, a dog (2) at the right edge (out
    of the centre square), each ringed by a 2-pixel void border (255), as VOC draws them."""
    h, w = shape
    label = np.zeros(shape, np.uint8)
    label[h // 4 - 2 : 3 * h // 4 + 2, w // 2 - 42 : w // 2 + 42] = VOID
    label[h // 4 : 3 * h // 4, w // 2 - 40 : w // 2 + 40] = 1
    label[h // 3 - 2 : 2 * h // 3 + 2, w - 42 :] = VOID
    label[h // 3 : 2 * h // 3, w - 40 :] = 2
    return label


@pytest.fixture
def voc(tmp_path, real_data) -> tuple[Path, np.ndarray]:
    """A labelme2voc-style export of one real photo (chelsea, 451 x 300: wide)."""
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassPNG").mkdir()
    photo = Image.open(real_data("photos") / "chelsea.png").convert("RGB")
    photo.save(root / "JPEGImages" / "cat_0001.jpg")
    label = labelled(photo.size[::-1])
    png = Image.fromarray(label, mode="P")
    png.putpalette(voc_palette())
    png.save(root / "SegmentationClassPNG" / "cat_0001.png")
    (root / "class_names.txt").write_text("_background_\ncat\nsmall_dog\n")
    (root / "JPEGImages" / "unlabelled.jpg").write_bytes(
        (root / "JPEGImages" / "cat_0001.jpg").read_bytes()
    )
    return root, label


def records(*sources: PrepareSource) -> tuple[list, dict]:
    rejects = Rejects()
    recipe = PrepareRecipe(output="unused", sources=list(sources))
    return [r for _, r in iter_records(recipe, rejects)], dict(rejects.counts)


def test_voc_one_record_per_class_void_excluded_nothing_lost(voc):
    root, label = voc
    got, rejected = records(PrepareSource(kind="voc", paths=[str(root)]))
    assert rejected == {}
    assert [(r.key, r.text) for r in got] == [
        ("cat_0001:cat", "segment the cat"),
        ("cat_0001:small_dog", "segment the small dog"),
    ]
    square = vdata.fit_square(label, "letterbox")  # the default fit of voc
    for index, record in enumerate(got, start=1):
        assert record.image.shape == (451, 451, 3) and record.mask.shape == (451, 451)
        assert np.array_equal(record.mask, (square == index).astype(np.uint8))
        assert record.mask.sum() == (label == index).sum()  # no labelled pixel lost
        assert not record.mask[square == VOID].any()  # void is in no class
        assert record.void == (label == VOID).sum() > 0
    assert (got[0].image[:75] == vdata.LETTERBOX_FILL).all()  # bars above the photo


def test_voc_crop_drops_what_falls_outside_the_square_and_counts_it(voc):
    root, label = voc
    got, rejected = records(PrepareSource(kind="voc", paths=[str(root)], fit="crop"))
    assert [r.key for r in got] == ["cat_0001:cat"]  # the dog is right of the centre square
    assert got[0].mask.shape == (300, 300) and got[0].mask.sum() == (label == 1).sum()
    assert rejected == {"cropped_away": 1}  # the dog's document, counted


def test_voc_classes_phrase_split_and_bad_labels(voc):
    root, _ = voc
    split = root / "ImageSets" / "Segmentation"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("other\n")
    source = dict(kind="voc", paths=[str(root)], phrase="the {name}, please")
    got, _ = records(PrepareSource(**source, classes=["bg", "kitten", "puppy"]))
    assert [r.text for r in got] == ["the kitten, please", "the puppy, please"]
    assert records(PrepareSource(**source, split="val")) == ([], {})
    _, rejected = records(PrepareSource(**source, classes=["bg", "kitten"]))  # no name for 2
    assert rejected == {"bad_mask": 1}
    Image.new("RGB", (451, 300)).save(root / "SegmentationClassPNG" / "cat_0001.png")
    assert records(PrepareSource(**source)) == ([], {"bad_mask": 1})  # colour, not index
    with pytest.raises(ConfigError, match="phrase"):
        PrepareSource(**{**source, "phrase": "segment the {class}"})


def test_voc_without_the_layout_is_a_one_line_error(voc):
    root, _ = voc
    with pytest.raises(InputNotFound, match=r"no JPEGImages/ folder") as err:
        PrepareSource(kind="voc", paths=[str(root / "SegmentationClassPNG")])
    assert "\n" not in str(err.value)
    (root / "SegmentationClassPNG").rename(root / "labels")
    with pytest.raises(InputNotFound, match=r"no SegmentationClassPNG/ or SegmentationClass/"):
        PrepareSource(kind="voc", paths=[str(root)])
    (root / "labels").rename(root / "SegmentationClass")  # VOC's own name
    assert PrepareSource(kind="voc", paths=[str(root)]).fit == "letterbox"
    with pytest.raises(InputNotFound, match=r"ImageSets/Segmentation/train\.txt"):
        PrepareSource(kind="voc", paths=[str(root)], split="train")


def test_picture_sources_never_ingest_label_maps_or_guess_masks(voc, tmp_path):
    root, _ = voc
    for kind in ("image-text", "image-mask"):
        with pytest.raises(ConfigError, match="kind: voc"):
            PrepareSource(kind=kind, paths=[str(root)])
    labels = str(root / "SegmentationClassPNG" / "*.png")
    assert records(PrepareSource(kind="image-text", paths=[labels])) == (
        [],
        {"segmentation_label": 1},
    )
    photos = str(root / "JPEGImages")
    assert records(PrepareSource(kind="image-mask", paths=[photos])) == ([], {"no_mask": 2})
    got, _ = records(PrepareSource(kind="image-mask", paths=[photos], mask="otsu"))
    image = vdata.read_image(root / "JPEGImages" / "cat_0001.jpg")
    assert np.array_equal(got[0].mask, vdata.fit_square(vdata.otsu_mask(image), "crop"))


def test_letterbox_keeps_every_pixel_of_image_text(voc):
    root, _ = voc
    source = dict(kind="image-text", paths=[str(root / "JPEGImages" / "cat_0001.jpg")])
    (cropped,), _ = records(PrepareSource(**source))
    (boxed,), _ = records(PrepareSource(**source, fit="letterbox"))
    image = vdata.read_image(root / "JPEGImages" / "cat_0001.jpg")
    assert cropped.image.shape == (300, 300, 3)
    assert np.array_equal(boxed.image[75:375], image)
    assert (boxed.image[:75] == vdata.LETTERBOX_FILL).all()
    assert (boxed.image[375:] == vdata.LETTERBOX_FILL).all()


def coco_json(tmp_path: Path, real_data) -> tuple[Path, dict[int, np.ndarray]]:
    """An instances json on the photo: a polygon cat, a crowd (uncompressed RLE) and a
    compressed-RLE dog; returns it and the pixels each category must cover."""
    import pycocotools.mask as coco_mask

    Image.open(real_data("photos") / "chelsea.png").convert("RGB").save(tmp_path / "c.jpg")
    h, w = 300, 451
    crowd = np.zeros((h, w), np.uint8)
    crowd[10:20, 30:60] = 1
    counts, run, value = [], 0, 0
    for pixel in crowd.flatten(order="F"):  # COCO RLE runs go down the columns
        if pixel != value:
            counts.append(run)
            run, value = 0, pixel
        run += 1
    counts.append(run)
    dog = np.zeros((h, w), np.uint8)
    dog[200:260, 300:400] = 1
    rle = coco_mask.encode(np.asfortranarray(dog))
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0,
         "segmentation": [[100.0, 100.0, 200.0, 100.0, 200.0, 150.0, 100.0, 150.0]]},
        {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": counts}},
        {"id": 3, "image_id": 7, "category_id": 5, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}},
    ]  # fmt: skip
    coco = {
        "images": [
            {"id": 7, "file_name": "c.jpg", "height": h, "width": w},
            {"id": 8, "file_name": "missing.jpg", "height": h, "width": w},
        ],
        "annotations": [*annotations, {**annotations[0], "id": 4, "image_id": 8}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path, {3: crowd, 5: dog}


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # numpy 2
def test_coco_one_record_per_category_polygons_and_rle(tmp_path, real_data):
    path, expected = coco_json(tmp_path, real_data)
    got, rejected = records(PrepareSource(kind="coco", paths=[str(path)]))
    assert rejected == {"no_image": 1}
    assert [(r.key, r.text) for r in got] == [
        ("c:cat", "segment the cat"),
        ("c:dog", "segment the dog"),
    ]
    top = (451 - 300) // 2  # letterbox bars above and below the photo
    cat, dog = (r.mask[top : top + 300] for r in got)
    assert not got[0].mask[:top].any() and not got[0].mask[top + 300 :].any()
    assert np.array_equal(dog, expected[5])
    assert (cat[10:20, 30:60] == 1).all()  # the crowd region
    polygon = cat.copy()
    polygon[10:20, 30:60] = 0
    rows, cols = np.nonzero(polygon)
    assert 100 <= rows.min() <= rows.max() <= 150 and 100 <= cols.min() <= cols.max() <= 200
    assert abs(int(polygon.sum()) - 100 * 50) < 2 * (100 + 50)  # edges, as rasterised


def test_prepare_voc_documents_read_segment_the_class(voc, tmp_path, real_data):
    root, _ = voc
    tok = tiny_visual_recipe(tmp_path)
    recipe = PrepareRecipe(
        name="t", output=str(tmp_path / "out"), tokenizer=str(tok), shard_size=10,
        sources=[PrepareSource(kind="voc", name="voc", paths=[str(root)])],
    )  # fmt: skip
    manifest = prepare(recipe, progress=False)
    docs = [d for p in sorted((tmp_path / "out").glob("t-*.tar")) for d in read_shard(str(p))]
    assert manifest["samples"] == len(docs) == 2 and manifest["rejected"] == {}
    t = Tokenizers.load(load_recipe(str(tok)))
    for doc, name in zip(docs, ("cat", "small dog"), strict=True):
        spans = t.decode(doc.tokens)
        assert [s[0] for s in spans] == ["text", "image", "mask"]
        assert spans[0][1] == f"segment the {name}"
        assert (doc.tokens[0], doc.tokens[-1]) == (BOS, EOS)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # numpy 2
def test_coco_crop_counts_a_category_outside_the_square(tmp_path, real_data):
    path, _ = coco_json(tmp_path, real_data)
    coco = json.loads(path.read_text())
    coco["categories"].append({"id": 9, "name": "bird"})
    coco["annotations"].append(
        {"id": 5, "image_id": 7, "category_id": 9, "iscrowd": 0,
         "segmentation": [[420.0, 50.0, 450.0, 50.0, 450.0, 80.0, 420.0, 80.0]]}
    )  # fmt: skip
    path.write_text(json.dumps(coco))
    got, rejected = records(PrepareSource(kind="coco", paths=[str(path)], fit="crop"))
    assert [r.key for r in got] == ["c:cat", "c:dog"]  # the bird is right of the centre square
    assert rejected == {"no_image": 1, "cropped_away": 1}
    got, rejected = records(PrepareSource(kind="coco", paths=[str(path)]))  # letterbox
    assert [r.key for r in got] == ["c:cat", "c:dog", "c:bird"] and rejected == {"no_image": 1}
