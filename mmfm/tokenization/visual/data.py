"""Real pictures for the visual tokenizers: photos, masks derived from them, video frames.

Images are read with Pillow; video with Pillow for GIF / APNG and with PyAV (`pip install
av`, the `video` extra) for mp4 and the rest. Masks come from real pictures: silhouettes
(black on white, e.g. skimage's horse) and Otsu thresholds of photos. Training draws random
crops (random scale, random position) resized to the tokenizer's size; evaluation uses fixed
crops of held-out pictures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
PILLOW_VIDEO = {".gif", ".apng", ".png", ".webp"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """`[H, W, 3]` uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_video(
    path: str | os.PathLike, fps: float | None = None, max_frames: int | None = None
) -> np.ndarray:
    """`[N, H, W, 3]` uint8 frames, resampled to `fps` (None: every frame), at most `max_frames`."""
    path = Path(path)
    if path.suffix.lower() in PILLOW_VIDEO:
        with Image.open(path) as im:
            frames, times, t = [], [], 0.0
            for frame in ImageSequence.Iterator(im):
                frames.append(np.asarray(frame.convert("RGB")))
                times.append(t)
                t += frame.info.get("duration", 100) / 1000
    else:
        try:
            import av
        except ImportError as e:
            raise RuntimeError(f"{path}: decoding {path.suffix} needs PyAV: pip install av") from e
        with av.open(str(path)) as container:
            frames, times = [], []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time or 0.0))
    if not frames:
        raise RuntimeError(f"{path}: no frames")
    picked = range(len(frames))
    if fps:
        wanted = np.arange(times[0], times[-1] + 1e-9, 1 / fps)
        picked = sorted({int(np.argmin(np.abs(np.asarray(times) - w))) for w in wanted})
    return np.stack([frames[i] for i in picked][: max_frames or None])


def square(image: np.ndarray, size: int, box: tuple[int, int, int] | None = None) -> np.ndarray:
    """A square crop (`box` = top, left, side; default the centre) resized to `size`."""
    h, w = image.shape[:2]
    top, left, side = box or ((h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w))
    crop = Image.fromarray(image[top : top + side, left : left + side])
    resample = Image.NEAREST if image.ndim == 2 else Image.BICUBIC
    return np.array(crop.resize((size, size), resample))  # writable, unlike np.asarray


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 `[H, W, 3]` pictures -> `[N, 3, H, W]` in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def otsu_mask(image: np.ndarray) -> np.ndarray:
    """Foreground of a picture by Otsu's threshold on its grey levels (the smaller class)."""
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
