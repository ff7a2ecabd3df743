"""Real pictures for the visual tokenizers: photos, masks derived from them, video frames.

Images are read with Pillow; video with Pillow for GIF / APNG and with PyAV (`pip install
'mmfm[video]'`) for mp4 and the rest. A picture or frame of more than `max_pixels`
pixels (default 64M, e.g. 8192 x 8192: 192 MiB as RGB) is refused from its header, before
it is decoded, and so is a decompression bomb (Pillow's own limit, about 179M pixels). A
clip is decoded frame by frame and only up to its last kept frame, holding only the frames
kept. Masks come from real pictures: silhouettes (black on white, e.g. skimage's horse) and
Otsu thresholds of photos. Training draws random crops (random scale, random position)
resized to the tokenizer's size; evaluation uses fixed crops of held-out pictures. Pictures
of documents are made square first by `fit_square` (a source's `fit`: centre crop, or
letterbox bars that lose no pixel), then resized by the tokenizers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from mmfm.core.errors import TokenizerError
from mmfm.core.extras import require_extra

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
PILLOW_VIDEO = {".gif", ".apng", ".png", ".webp"}
VIDEO_SUFFIXES = {".gif", ".apng", ".mp4", ".webm", ".mkv", ".mov", ".avi"}
PYAV_SUFFIXES = VIDEO_SUFFIXES - PILLOW_VIDEO
"""The clips decoded with PyAV (the `video` extra); Pillow reads the others."""
MAX_PIXELS = 1 << 26
"""Default limit on the pixels of one picture or video frame (64M)."""


class PictureError(TokenizerError):
    """A file that is no picture of the wanted kind, or too large; `reason` names it for the
    reject counts (not_image, not_video, no_image, no_mask, bad_mask, too_large,
    segmentation_label)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _check_pixels(width: int, height: int, max_pixels: int, path) -> None:
    if width * height > max_pixels:
        raise PictureError(
            "too_large",
            f"{path}: {width} x {height} = {width * height} pixels is over max_pixels="
            f"{max_pixels}; refused undecoded (raise max_pixels to read it)",
        )


def open_picture(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The Pillow image of `path`, opened lazily (its header only) and checked for size."""
    try:
        with warnings.catch_warnings():  # max_pixels decides below, not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise PictureError("too_large", f"{path}: refused as a decompression bomb ({e})") from None
    try:
        _check_pixels(*im.size, max_pixels, path)
    except PictureError:
        im.close()
        raise
    return im


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`[H, W, 3]` uint8 RGB."""
    with open_picture(path, max_pixels) as im:
        return np.asarray(im.convert("RGB"))


def read_video(
    path: str | os.PathLike,
    fps: float | None = None,
    max_frames: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """`[N, H, W, 3]` uint8 frames, resampled to `fps` (None: every frame), at most `max_frames`."""
    path = Path(path)
    if path.suffix.lower() in PILLOW_VIDEO:
        with open_picture(path, max_pixels) as im:
            frames = pick_frames(_pillow_frames(im), fps, max_frames)
    else:
        av = require_extra("av", "video", f"{path}: decoding {path.suffix}")
        with av.open(str(path)) as container:
            frames = pick_frames(_av_frames(container, max_pixels, path), fps, max_frames)
    if not frames:
        raise RuntimeError(f"{path}: no frames")
    return np.stack(frames)


def _pillow_frames(im: Image.Image) -> Iterator[tuple[float, np.ndarray]]:
    t = 0.0
    for frame in ImageSequence.Iterator(im):
        yield t, np.asarray(frame.convert("RGB"))
        t += frame.info.get("duration", 100) / 1000


def _av_frames(container, max_pixels: int, path) -> Iterator[tuple[float, np.ndarray]]:
    stream = container.streams.video[0]
    _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels, path)
    for frame in container.decode(stream):
        _check_pixels(frame.width, frame.height, max_pixels, path)  # streams may change size
        yield float(frame.time or 0.0), frame.to_ndarray(format="rgb24")


def pick_frames(
    frames: Iterable[tuple[float, np.ndarray]], fps: float | None, max_frames: int | None
) -> list[np.ndarray]:
    """The frames nearest to every 1/fps seconds from the first (all frames without `fps`),
    at most `max_frames`, read from `(time, frame)` pairs in time order. The input is
    consumed only up to the last frame kept, and at most one unkept frame is held."""
    limit = max_frames or float("inf")
    kept: list[np.ndarray] = []
    if not fps:
        for _, frame in frames:
            if len(kept) >= limit:
                break
            kept.append(frame)
        return kept
    step, k, first = 1 / fps, 0, None
    previous = None  # (time, frame, index) of the frame before the current one
    last_kept = -1
    for index, (time, frame) in enumerate(frames):
        first = time if first is None else first
        # every wanted time up to this frame is nearest to it or to the previous frame
        while (wanted := first + k * step) <= time and len(kept) < limit:
            near_previous = previous is not None and wanted - previous[0] <= time - wanted
            choice = previous if near_previous else (time, frame, index)
            if choice[2] != last_kept:
                kept.append(choice[1])
                last_kept = choice[2]
            k += 1
        if len(kept) >= limit:
            return kept
        previous = (time, frame, index)
    if previous is not None and first + k * step < previous[0] + 1e-9 and previous[2] != last_kept:
        kept.append(previous[1])  # a wanted time just past the last frame
    return kept[: max_frames or None]


def square(image: np.ndarray, size: int, box: tuple[int, int, int] | None = None) -> np.ndarray:
    """A square crop (`box` = top, left, side; default the centre) resized to `size`."""
    h, w = image.shape[:2]
    top, left, side = box or ((h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w))
    crop = Image.fromarray(image[top : top + side, left : left + side])
    if image.ndim == 2:  # masks and label maps: no value between two classes
        return np.array(crop.resize((size, size), Image.NEAREST))  # writable, unlike asarray
    # a box reduction to within 3x of the size first: several times faster on large crops
    # (training samples thousands of them), indistinguishable from a direct bicubic
    return np.array(crop.resize((size, size), Image.BICUBIC, reducing_gap=3.0))


FITS = ("crop", "letterbox")
LETTERBOX_FILL = 128
"""Grey of the bars that letterbox a picture (0 in [-1, 1], the tokenizers' input range)."""


def fit_square(picture: np.ndarray, fit: str, fill: int | None = None) -> np.ndarray:
    """The picture made square at its own resolution, so that every tokenizer (image, mask,
    video) sees the same square: `crop` keeps the centre square (what falls outside is lost),
    `letterbox` pads the short side on both ends with `fill` (default LETTERBOX_FILL for
    colour pictures, 0 for masks and label maps: the bars are no object), losing nothing."""
    h, w = picture.shape[:2]
    if h == w:
        return picture
    if fit == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return picture[top : top + side, left : left + side]
    if fit != "letterbox":
        raise ValueError(f"fit={fit!r} is not one of {', '.join(FITS)}")
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    value = fill if fill is not None else (LETTERBOX_FILL if picture.ndim == 3 else 0)
    out = np.full((side, side, *picture.shape[2:]), value, picture.dtype)
    out[top : top + h, left : left + w] = picture
    return out


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 `[H, W, 3]` pictures -> `[N, 3, H, W]` in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def otsu_mask(image: np.ndarray) -> np.ndarray:
    """Foreground of a picture by Otsu's threshold on its grey levels (the smaller class): a
    guess, used for tokenizer training pictures and for `mask: otsu` sources only, never in
    place of a missing mask."""
    grey = image.mean(-1) if image.ndim == 3 else image.astype(np.float64)
    hist = np.bincount(grey.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    mask = grey > int(np.argmax(between))
    return (mask if mask.mean() <= 0.5 else ~mask).astype(np.uint8)


def silhouette(image: np.ndarray) -> np.ndarray:
    """A black-on-white silhouette as a {0, 1} mask."""
    return (image.mean(-1) < 128).astype(np.uint8)


class CropSampler:
    """Random square crops of a set of pictures (images `[H, W, 3]` or masks `[H, W]`)."""

    def __init__(
        self, pictures: Sequence[np.ndarray], size: int, min_scale: float = 0.25, seed: int = 0
    ):
        if not pictures:
            raise ValueError("no pictures to train on")
        self.pictures, self.size, self.min_scale = list(pictures), size, min_scale
        self.rng = np.random.default_rng(seed)

    def box(self, picture: np.ndarray) -> tuple[int, int, int]:
        h, w = picture.shape[:2]
        side = int(min(h, w) * self.rng.uniform(self.min_scale, 1.0))
        side = max(side, min(self.size, h, w))
        return (
            int(self.rng.integers(0, h - side + 1)),
            int(self.rng.integers(0, w - side + 1)),
            side,
        )

    def sample(self, n: int, accept=lambda crop: True, tries: int = 20) -> list[np.ndarray]:
        out = []
        while len(out) < n:
            picture = self.pictures[int(self.rng.integers(len(self.pictures)))]
            for _ in range(tries):
                crop = square(picture, self.size, self.box(picture))
                if accept(crop):
                    break
            out.append(crop)
        return out


def informative(mask: np.ndarray) -> bool:
    """A mask crop worth learning from: neither almost empty nor almost full."""
    return 0.05 <= mask.mean() <= 0.95
