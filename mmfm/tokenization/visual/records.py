"""Pictures in documents: image, mask and video spans in the unified vocabulary.

image  ->  <img> c1 ... c32 </img>                      (codes from the image range)
           <img> H*W <grid> row_1 <eol> ... row_H <eol> <eof> </img>   (framing: emu3)
mask   ->  <mask> c1 ... c32 </mask>                    (coarse to fine, mask range)
video  ->  <vision> f1 <eof> f2 <eof> ... fn <eov> </vision>, fi = 256 codes of frame i
           (Emu3VQVAE: fi = the code grid of frames 4i-3 .. 4i, its temporal compression)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from mmfm.core.types import ImageMaskRecord, ImageRecord, Modality, Record, VideoRecord
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.data import VIDEO_SUFFIXES, PictureError
from mmfm.tokenization.visual.framing import RowFraming
from mmfm.tokenization.visual.published import PublishedTokenizer, load_published, parse_spec
from mmfm.tokenization.visual.train import load_visual
from mmfm.tokenization.vocab import VocabError

KIND_OF = {"image": "seed_image", "mask": "himtok_mask", "video": "video"}

Spans = list[tuple[list[int], Modality]]
"""A record's picture spans (ids with their delimiters), in document order."""


class VisualTokenizers:
    """The recipe's trained image, mask and video tokenizers, each loaded when first used
    (a text-only run never loads them)."""

    def __init__(self, recipe, vocab):
        self.vocab = vocab
        self._paths = {
            "image": recipe.image_tokenizer,
            "mask": recipe.mask_tokenizer,
            "video": recipe.video_tokenizer,
        }
        self._models: dict[str, torch.nn.Module] = {}
        self._framings: dict[str, RowFraming | None] = {}

    def model(self, name: str) -> torch.nn.Module:
        """The trained `name` (image, mask, video) tokenizer."""
        if name not in self._models:
            if not self._paths[name]:
                raise VocabError(f"a {name} record needs {name}_tokenizer in the tokenizer recipe")
            spec = None if name == "mask" else parse_spec(self._paths[name], f"{name}_tokenizer")
            model = load_published(spec) if spec else load_visual(self._paths[name])
            if spec is None and model.kind != KIND_OF[name]:
                raise VocabError(
                    f"{name}_tokenizer {self._paths[name]} is a {model.kind} tokenizer; "
                    f"train one with tokenizers/{KIND_OF[name]}.yaml"
                )
            what = f"{spec.class_name} {spec.path}" if spec else self._paths[name]
            book = self.vocab.codebook(name)
            if model.num_codes > book.size:
                raise VocabError(
                    f"{what}: its codebook of {model.num_codes} codes does not fit the "
                    f"vocabulary, which reserves {book.size} for {name}: run mmfm tokenizer "
                    "train with this recipe (it reserves the tokenizer's own codebook)"
                )
            if (model.source if spec else "") != book.source:
                raise VocabError(
                    f"{what} is not the {name} tokenizer the vocabulary was made with "
                    f"({book.source or 'one of mmfm own'}): run mmfm tokenizer train with this "
                    "recipe again, and prepare the data again with it"
                )
            self._models[name] = model
        return self._models[name]

    def framing(self, name: str) -> RowFraming | None:
        """Emu3's framing of `name`'s spans where its published tokenizer asks for it."""
        if name not in self._framings:
            model = self.model(name)
            framing = None
            if isinstance(model, PublishedTokenizer) and model.spec.framing == "emu3":
                framing = RowFraming.of(self.vocab, model.grid, model.grid)
            self._framings[name] = framing
        return self._framings[name]

    def span_length(self, name: str) -> int:
        """Ids between the delimiters of a `name` span (of a frame, for video)."""
        framing = self.framing(name)
        return framing.length if framing else self.model(name).tokens_per_item

    @torch.no_grad()
    def encode_many(self, records: Sequence[Record], device: str = "cpu") -> list[Spans]:
        """Each record's picture spans, every picture of a kind (images, masks, video frames)
        of all `records` encoded in one batched call on `device`: a tokenizer's forward costs
        far less per picture in a batch (the training stream batches a window of samples).
        Clips through a tokenizer that compresses time (Emu3's) take a call each."""
        images = [r.image for r in records if isinstance(r, ImageRecord | ImageMaskRecord)]
        masks = [r.mask for r in records if isinstance(r, ImageMaskRecord)]
        clips = [r.frames for r in records if isinstance(r, VideoRecord)]
        image_codes = iter(self._encode("image", images, device))
        mask_codes = iter(self._encode("mask", masks, device))
        clip_codes = iter(self._encode_clips(clips, device))
        spans = []
        for r in records:
            if isinstance(r, VideoRecord):
                spans.append([(self._video_ids(next(clip_codes)), Modality.VIDEO)])
                continue
            record_spans = [(self._framed("image", next(image_codes)), Modality.IMAGE)]
            if isinstance(r, ImageMaskRecord):
                record_spans.append((self._framed("mask", next(mask_codes)), Modality.MASK))
            spans.append(record_spans)
        return spans

    def _encode_clips(self, clips: list[np.ndarray], device: str) -> list[np.ndarray]:
        """Each clip's code grids `[grids, tokens]`: every frame of all clips in one call, or,
        for a tokenizer that compresses time (Emu3's), one call per clip."""
        if not clips:
            return []
        model = self.model("video")
        if getattr(model, "frames_per_grid", 1) > 1:
            model.to(device)
            pixels = [self._pixels(model, list(clip), device) for clip in clips]
            return [model.encode_clip(x).cpu().numpy() for x in pixels]
        frame_codes = self._encode("video", [f for clip in clips for f in clip], device)
        ends = np.cumsum([len(clip) for clip in clips]).tolist()
        return np.split(frame_codes, ends[:-1])

    @staticmethod
    def _pixels(model: PublishedTokenizer, pictures: list[np.ndarray], device: str):
        squares = [
            vdata.square(vdata.fit_square(p, model.spec.fit), model.resolution) for p in pictures
        ]
        return vdata.to_tensor(squares).to(device)

    def _encode(self, name: str, pictures: list[np.ndarray], device: str) -> np.ndarray:
        """Codes `[N, tokens]` of N pictures of the `name` tokenizer, in one call (the model
        moves to `device` and stays there: the stream's tokenizers only encode)."""
        if not pictures:
            return np.zeros((0, 0), dtype=np.int64)
        model = self.model(name).to(device)
        if isinstance(model, PublishedTokenizer):
            return model.encode(self._pixels(model, pictures, device)).cpu().numpy()
        if name == "mask":
            squares = [vdata.square(m.astype(np.uint8), model.cfg.mask_size) for m in pictures]
            x = torch.from_numpy(np.stack(squares))
        else:
            size = model.cfg.image_size if name == "image" else model.cfg.frame_size
            x = vdata.to_tensor([vdata.square(p, size) for p in pictures])
        return model.encode(x.to(device)).cpu().numpy()

    def _framed(self, book: str, codes: np.ndarray) -> list[int]:
        start, end = self.vocab.delimiters(Modality.IMAGE if book == "image" else Modality.MASK)
        framing = self.framing(book) if book == "image" else None
        ids = self._ids(book, codes)
        return [start, *(framing.frame(ids) if framing else ids), end]

    def _ids(self, book: str, codes: np.ndarray) -> list[int]:
        return (codes + self.vocab.codebook(book).offset).tolist()

    def _video_ids(self, codes: np.ndarray) -> list[int]:
        v = self.vocab
        ids = [v.special("<vision>")]
        for i, frame in enumerate(codes):
            ids += self._ids("video", frame)
            ids.append(v.special("<eov>" if i == len(codes) - 1 else "<eof>"))
        return [*ids, v.special("</vision>")]

    def _codes(self, book: str, ids: list[int]) -> torch.Tensor:
        b = self.vocab.codebook(book)
        size = min(b.size, self.model(book).num_codes)
        codes = torch.tensor(ids, dtype=torch.long) - b.offset
        if len(codes) and (codes.min() < 0 or codes.max() >= size):
            raise VocabError(f"a {book} span holds ids outside the {size} codes of its tokenizer")
        return codes

    @torch.no_grad()
    def decode(self, modality: Modality, body: list[int]) -> np.ndarray:
        """The picture of a span's body (ids between its delimiters): image `[H, W, 3]`,
        mask `[H, W]` of {0, 1} (any prefix of the codes decodes), video `[N, H, W, 3]`."""
        if modality == Modality.IMAGE:
            model = self.model("image")
            if (framing := self.framing("image")) is not None:
                body = framing.strip(body)
            if len(body) != model.tokens_per_item:
                raise VocabError(
                    f"an image span of {len(body)} codes; the image tokenizer makes "
                    f"{model.tokens_per_item}"
                )
            return vdata.to_uint8(model.decode(self._codes("image", body)[None]))[0]
        if modality == Modality.MASK:
            model = self.model("mask")
            if not 1 <= len(body) <= model.tokens_per_item:
                raise VocabError(
                    f"a mask span of {len(body)} codes; the mask tokenizer takes 1 to "
                    f"{model.tokens_per_item}"
                )
            return model.decode(self._codes("mask", body)[None])[0].numpy().astype(np.uint8)
        model = self.model("video")
        ends = {self.vocab.special("<eof>"), self.vocab.special("<eov>")}
        frames, frame = [], []
        for i in body:
            if i in ends:
                frames.append(self._codes("video", frame))
                frame = []
            else:
                frame.append(i)
        if frame or not frames or any(len(f) != model.tokens_per_item for f in frames):
            raise VocabError(
                f"a video span must be frames of {model.tokens_per_item} codes, each closed by "
                "<eof> (the last by <eov>)"
            )
        if getattr(model, "frames_per_grid", 1) > 1:  # Emu3: each grid decodes to a few frames
            return vdata.to_uint8(model.decode_clip(torch.stack(frames)))
        return vdata.to_uint8(model.decode(torch.stack(frames)))

    def span(self, name: str, picture: np.ndarray) -> tuple[list[int], Modality]:
        """One picture's span, encoded alone (`name`: image, mask, or video for a clip's
        frames): the parts of a prompt / response record."""
        if name == "video":
            return self._video_ids(self._encode_clips([picture], "cpu")[0]), Modality.VIDEO
        modality = Modality.IMAGE if name == "image" else Modality.MASK
        return self._framed(name, self._encode(name, [picture], "cpu")[0]), modality

    def add(self, doc, record, spans: Spans | None = None) -> None:
        """The record's picture spans into `doc`: `spans` of `encode_many` where the caller
        batched its records, else the record encoded alone."""
        for ids, modality in spans if spans is not None else self.encode_many([record])[0]:
            doc.add(ids, modality)


def caption_of(path: Path, from_name: bool = True) -> str | None:
    """The sidecar `<stem>.txt` next to a picture, else (from_name) its name as words."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    return path.stem.replace("_", " ").replace("-", " ") if from_name else None


MASKS = ("sidecar", "otsu")
LABEL_FOLDERS = ("SegmentationClass", "SegmentationObject")
"""Folders of VOC / labelme label maps (SegmentationClass, SegmentationClassPNG, ...)."""


def visual_records(
    path: Path,
    kind: str,
    source: str = "",
    fps: float = 2.0,
    max_frames: int = 8,
    caption_from_name: bool = True,
    max_pixels: int = vdata.MAX_PIXELS,
    mask: str = "sidecar",
    fit: str = "crop",
) -> Iterator:
    """The record of one picture or clip file (`kind`: image-text, image-mask or video), its
    pictures made square by `fit` (crop or letterbox, `vdata.fit_square`).

    image-mask: the mask is the sidecar `<stem>.mask.png` (nonzero = 1); without one the
    picture is rejected (no_mask), unless `mask` is `otsu`: then the mask is Otsu's threshold
    of the image, and a sidecar is not looked for. Raises PictureError for a file of the wrong
    type, a VOC / labelme label map (a PNG in a SegmentationClass* folder: read its dataset
    with kind voc), a picture (or frame, or mask) over `max_pixels` or a decompression bomb, a
    missing or wrong-sized mask, and whatever Pillow / PyAV raise for a file that does not
    decode (OSError, ValueError, RuntimeError).
    """

    suffix = path.suffix.lower()
    caption = caption_of(path, caption_from_name)
    if kind == "video":
        if suffix not in VIDEO_SUFFIXES:
            raise PictureError("not_video", f"not a video ({sorted(VIDEO_SUFFIXES)})")
        frames = vdata.read_video(path, fps, max_frames, max_pixels)
        frames = np.stack([vdata.fit_square(f, fit) for f in frames])
        yield VideoRecord(path.stem, frames, caption, source)
        return
    if suffix not in vdata.IMAGE_SUFFIXES:
        raise PictureError("not_image", f"not an image ({sorted(vdata.IMAGE_SUFFIXES)})")
    if path.parent.name.startswith(LABEL_FOLDERS):
        raise PictureError(
            "segmentation_label",
            f"a label map in {path.parent.name}/, not a photo: read the dataset's root "
            "(JPEGImages/ + SegmentationClass*/) with kind: voc",
        )
    image = vdata.read_image(path, max_pixels)
    if kind == "image-text":
        yield ImageRecord(path.stem, vdata.fit_square(image, fit), caption, source)
        return
    picture_mask = _mask_of(path, image, mask, max_pixels)
    image, picture_mask = vdata.fit_square(image, fit), vdata.fit_square(picture_mask, fit)
    yield ImageMaskRecord(path.stem, image, picture_mask, caption, source)


def _mask_of(path: Path, image: np.ndarray, how: str, max_pixels: int) -> np.ndarray:
    if how == "otsu":
        return vdata.otsu_mask(image)
    sidecar = path.with_name(f"{path.stem}.mask.png")
    if not sidecar.is_file():
        raise PictureError(
            "no_mask", f"no sidecar {sidecar.name} (set mask: otsu to threshold the picture)"
        )
    with vdata.open_picture(sidecar, max_pixels) as im:
        mask = (np.asarray(im.convert("L")) > 0).astype(np.uint8)
    if mask.shape != image.shape[:2]:
        raise PictureError(
            "bad_mask", f"{sidecar.name} is {mask.shape}, the image {image.shape[:2]}"
        )
    return mask
