"""Segmentation sets as they come (VOC / labelme folders, COCO instances json) as referring
segmentation records (HiMTok): one ImageMaskRecord per (image, class present), whose text is
the class's referring phrase, so that a document reads
`<s> segment the person <img> ... </img> <mask> ... </mask> </s>`.

VOC layout (also what labelme2voc writes): `<root>/JPEGImages/<stem>.jpg` and the label map
`<root>/SegmentationClassPNG/<stem>.png` (labelme) or `<root>/SegmentationClass/<stem>.png`
(VOC), an index PNG (palette or greyscale) holding a class index per pixel: 0 is background,
`ignore_index` (255) void. Class names by index: the source's `classes`, else
`<root>/class_names.txt` (one a line, labelme), else the 20 VOC classes. Only labelled images
become records (VOC's JPEGImages/ holds more); `split` keeps those listed in
`ImageSets/Segmentation/<split>.txt`. Void pixels belong to no class: the mask tokenizer is
binary, so they are 0 (background) in every class mask, and counted (`ImageMaskRecord.void`,
a debug line per image). The picture and its label map are made square together (`fit`:
letterbox by default here, which loses no labelled pixel), before the classes present are
listed, so that a class cropped away is no document: it is counted (`cropped_away`), one per
(image, class) lost, as is a COCO category cropped away.

COCO: an instances json (train2017 style; its `images`, `annotations`, `categories`), the
pictures under `image_dir` (default: the json's folder); the mask of an (image, category) is the
union of its annotations, polygons and RLE (crowd regions included), decoded by pycocotools
(`pip install pycocotools`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmfm.core.errors import ConfigError, InputNotFound, LaunchError
from mmfm.core.types import ImageMaskRecord
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.data import PictureError

log = logging.getLogger("mmfm")

IMAGES = "JPEGImages"
LABELS = ("SegmentationClassPNG", "SegmentationClass")
"""Label folders in the order they are looked for (labelme also writes SegmentationClass/
with .npy arrays next to SegmentationClassPNG/)."""
CLASS_NAMES = "class_names.txt"
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant",
    "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip
_told: set[Path] = set()


# -- checks at recipe load ------------------------------------------------------------------------


def check_source(source) -> None:
    """Refuse, when the recipe is loaded, what would otherwise be read wrongly: a voc path
    without the layout, a coco source without pycocotools, an image-text or image-mask
    path that is a VOC root (its label maps are no photos), a bad phrase template."""
    if source.kind in ("voc", "coco"):
        try:
            source.phrase.format(name="person")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"sources[].phrase={source.phrase!r}: a template with {{name}} only ({e})"
            ) from None
    if source.kind == "voc":
        for path in source.paths:
            _check_voc_root(Path(path).expanduser(), source.split)
    elif source.kind == "coco" and importlib.util.find_spec("pycocotools") is None:
        raise LaunchError(
            "a coco source decodes its masks with pycocotools: pip install pycocotools"
        )
    elif source.kind in ("image-text", "image-mask"):
        for path in source.paths:
            if _is_voc_root(Path(path).expanduser()):
                raise ConfigError(
                    f"sources[].paths: {path} is a segmentation set (JPEGImages/ and "
                    f"{label_dir(Path(path).expanduser()).name}/): read it with kind: voc"
                )


def _is_voc_root(path: Path) -> bool:
    return (path / IMAGES).is_dir() and any((path / name).is_dir() for name in LABELS)


def _check_voc_root(root: Path, split: str) -> None:
    if not root.is_dir():
        raise InputNotFound(f"voc source {root}: no such folder (the root holding {IMAGES}/)")
    if not (root / IMAGES).is_dir():
        raise InputNotFound(f"voc source {root}: no {IMAGES}/ folder (the pictures)")
    if not any((root / name).is_dir() for name in LABELS):
        raise InputNotFound(
            f"voc source {root}: no {LABELS[0]}/ or {LABELS[1]}/ folder (the label maps)"
        )
    if split and not split_file(root, split).is_file():
        raise InputNotFound(f"voc source {root}: no {split_file(root, split)} for split={split}")


def label_dir(root: Path) -> Path:
    return next((root / n for n in LABELS if (root / n).is_dir()), root / LABELS[-1])


def split_file(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Segmentation" / f"{split}.txt"


# -- voc ----------------------------------------------------------------------------------------


def voc_records(path: Path, source, rejects) -> Iterator[ImageMaskRecord]:
    """The records of one file under a VOC root: one per class present if it is a label map
    (a .png in the root's label folder), none for any other file (pictures are read with
    their label maps)."""
    root = path.parent.parent
    if path.suffix.lower() != ".png" or path.parent != label_dir(root):
        return
    if source.split and path.stem not in _lines(split_file(root, source.split)):
        return
    names, origin = class_names(root, source.classes)
    if root not in _told:
        _told.add(root)
        log.info(
            "voc %s: label maps from %s/, %d class names from %s; label %d is void: in no "
            "class, background in every mask; fit %s",
            root, path.parent.name, len(names) - 1, origin, source.ignore_index, source.fit,
        )  # fmt: skip
    try:
        image, label = _voc_pair(root, path, source.max_pixels)
        yield from class_records(path.stem, image, label, names, source, rejects, str(path))
    except PictureError as e:
        rejects.add(e.reason, str(path), str(e))
    except (OSError, ValueError, SyntaxError) as e:  # Pillow decode errors
        rejects.add("undecodable", str(path), f"{type(e).__name__}: {e}")


def class_names(root: Path, classes: list[str]) -> tuple[tuple[str, ...], str]:
    """(names by label index, where they came from)."""
    if classes:
        return tuple(classes), "the source's classes"
    if (root / CLASS_NAMES).is_file():
        return _lines(root / CLASS_NAMES), str(root / CLASS_NAMES)
    return VOC_CLASSES, "the 20 VOC classes (no class_names.txt)"


def _lines(path: Path) -> tuple[str, ...]:
    stat = path.stat()
    return _read_lines(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _read_lines(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """The stripped lines of a small text file (class names, a split), read once while it
    is unchanged: every label map of a root asks for them."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(line.strip() for line in lines)


def _voc_pair(root: Path, label_path: Path, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    pictures = (root / IMAGES / f"{label_path.stem}{s}" for s in (".jpg", ".jpeg", ".png"))
    image_path = next((p for p in pictures if p.is_file()), None)
    if image_path is None:
        raise PictureError("no_image", f"no {IMAGES}/{label_path.stem}.jpg for this label map")
    image = vdata.read_image(image_path, max_pixels)
    with vdata.open_picture(label_path, max_pixels) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise PictureError(
                "bad_mask",
                f"a {im.mode} label map: labels are index PNGs (palette or greyscale), a class "
                "index per pixel, as VOC and labelme2voc write them",
            )
        label = np.asarray(im)
    if label.shape != image.shape[:2]:
        raise PictureError("bad_mask", f"label map {label.shape}, picture {image.shape[:2]}")
    return image, label


def class_records(
    stem: str, image: np.ndarray, label: np.ndarray, names: tuple[str, ...], source, rejects,
    where: str,
) -> list[ImageMaskRecord]:  # fmt: skip
    """One record per class index present in `label` (besides background 0 and void),
    after the picture and label are made square with `source.fit`; a class that `fit: crop`
    leaves outside the square is counted in `rejects` as `cropped_away`."""
    before = _classes(label, source.ignore_index)
    image, label = vdata.fit_square(image, source.fit), vdata.fit_square(label, source.fit)
    void = label == source.ignore_index
    present = _classes(label, source.ignore_index)
    for i in sorted(set(before) - set(present)):
        name = names[i] if i < len(names) else f"label {i}"
        _cropped_away(rejects, f"{where}:{name}", f"class {name!r}")
    unknown = [i for i in present if i >= len(names)]
    if unknown:
        raise PictureError(
            "bad_mask",
            f"label index {unknown[0]}, but {len(names)} class names (index 0 is background): "
            f"name it in the source's classes or in {CLASS_NAMES}",
        )
    n_void = int(void.sum())
    if n_void:
        log.debug("voc %s: %d void pixels (%.1f%%), in no mask", stem, n_void, 100 * void.mean())
    return [
        mask_record(stem, image, (label == i).astype(np.uint8), names[i], source, n_void)
        for i in present
    ]


def _classes(label: np.ndarray, ignore_index: int) -> list[int]:
    """The class indices in a label map, besides background 0 and void."""
    return [int(i) for i in np.unique(label) if i not in (0, ignore_index)]


def _cropped_away(rejects, where: str, what: str) -> None:
    rejects.add(
        "cropped_away",
        where,
        f"{what} lies outside the centre square that fit: crop keeps (fit: letterbox keeps it)",
    )


def mask_record(
    stem: str, image: np.ndarray, mask: np.ndarray, name: str, source, void: int = 0
) -> ImageMaskRecord:
    words = name.replace("_", " ").strip()
    return ImageMaskRecord(
        f"{stem}:{words.replace(' ', '_')}",
        image,
        mask,
        source.phrase.format(name=words),
        source.name or source.kind,
        void,
    )


# -- coco ---------------------------------------------------------------------------------------


def coco_records(path: Path, source, rejects) -> Iterator[ImageMaskRecord]:
    """The records of one instances json: one per (image, category annotated in it), images
    in the json's order, categories by id."""
    if path.suffix.lower() != ".json":
        return
    coco = json.loads(path.read_bytes())
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        rejects.add("bad_json", str(path), f"no {missing[0]!r}: not a COCO instances json")
        return
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: dict = defaultdict(lambda: defaultdict(list))
    for ann in coco["annotations"]:
        by_image[ann["image_id"]][ann["category_id"]].append(ann["segmentation"])
    folder = Path(source.image_dir).expanduser() if source.image_dir else path.parent
    for entry in coco["images"]:
        if entry["id"] not in by_image:
            continue
        where = f"{path}:{entry['file_name']}"
        try:
            yield from _coco_image(folder, entry, by_image[entry["id"]], names, source, rejects)
        except PictureError as e:
            rejects.add(e.reason, where, str(e))
        except (OSError, ValueError, SyntaxError, TypeError, KeyError) as e:
            rejects.add("undecodable", where, f"{type(e).__name__}: {e}")


def _coco_image(folder: Path, entry: dict, by_category: dict, names: dict, source, rejects) -> list:
    image_path = folder / entry["file_name"]
    if not image_path.is_file():
        raise PictureError("no_image", f"no picture {image_path} (set image_dir)")
    image = vdata.read_image(image_path, source.max_pixels)
    h, w = image.shape[:2]
    if (entry.get("height", h), entry.get("width", w)) != (h, w):
        raise PictureError("bad_mask", f"the json says {entry['height']}x{entry['width']}")
    square = vdata.fit_square(image, source.fit)
    records = []
    for category in sorted(by_category):
        if category not in names:
            raise PictureError("bad_mask", f"category_id {category} is not in categories")
        whole = decode_segmentation(by_category[category], h, w)
        mask = vdata.fit_square(whole, source.fit)
        if mask.any():
            stem = Path(entry["file_name"]).stem
            records.append(mask_record(stem, square, mask, names[category], source))
        elif whole.any():
            where = f"{folder / entry['file_name']}:{names[category]}"
            _cropped_away(rejects, where, f"category {names[category]!r}")
    return records


def decode_segmentation(segmentations: list, h: int, w: int) -> np.ndarray:
    """`[h, w]` {0, 1}: the union of COCO segmentations (polygon lists, RLE with list counts,
    compressed RLE)."""
    import pycocotools.mask as coco_mask  # optional (checked when the recipe is loaded)

    rles = []
    for segmentation in segmentations:
        if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
            rles += coco_mask.frPyObjects(segmentation, h, w)
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE (crowd)
            rles.append(coco_mask.frPyObjects(segmentation, h, w))
        else:
            counts = segmentation["counts"]
            rles.append({"size": segmentation["size"], "counts": counts.encode()})
    return coco_mask.decode(coco_mask.merge(rles)).astype(np.uint8)
