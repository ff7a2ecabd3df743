"""Attacks on the picture readers: decompression bombs, huge images, long animations.

Each must end as a counted reject of `mmfm prepare` (a `PictureError` with a reason) or as a
bounded read; the memory-bounded cases run in a child process under an RLIMIT_AS limit set
a little above what the child holds after its imports.
"""

import itertools
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from mmfm.prepare import PrepareSource, Rejects
from mmfm.prepare.readers import _visual_records
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.records import PictureError

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_sec_images")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bilevel_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of any size, written without holding its pixels."""
    rows = (b"\x00" + bytes((width + 7) // 8)) * 100
    z = zlib.compressobj(1)
    idat = b"".join(z.compress(rows) for _ in range(height // 100)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )
    return path


def animation(path: Path, frames: int, side: int) -> Path:
    """A GIF of `frames` distinct frames (10 per second)."""
    pictures = []
    for i in range(frames):
        a = np.zeros((side, side), np.uint8)
        a[i % side] = 255
        a[:, (7 * i) % side] = 128
        pictures.append(Image.fromarray(a).convert("P"))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=100, loop=0)
    return path


def run_bounded(code: str, headroom_mb: int) -> dict:
    """Run `code` (which sets `result`) in a child limited to its size after imports plus
    `headroom_mb` of address space; return `result`, or the child's error."""
    prelude = f"""
import json, resource
import numpy as np
from mmfm.tokenization.visual import data as vdata
from mmfm.tokenization.visual.records import PictureError
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom_mb} * 2**20,) * 2)
try:
"""
    ending = """
except BaseException as e:
    result = {"error": type(e).__name__, "message": str(e)[:300]}
print(json.dumps(result))
"""
    script = prelude + textwrap.indent(textwrap.dedent(code).strip(), "    ") + ending
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reject_counts(path: Path, kind: str = "image-text", **fields) -> dict:
    rejects = Rejects()
    source = PrepareSource(kind=kind, paths=[str(path)], **fields)
    assert list(_visual_records(path, source, rejects)) == []
    return dict(rejects.counts)


def test_decompression_bomb_is_a_counted_reject(tmp_path):
    bomb = bilevel_png(tmp_path / "bomb.png", 20_000, 20_000)  # 400M pixels, 250 KiB
    assert bomb.stat().st_size < 300_000
    with pytest.raises(PictureError, match="decompression bomb") as err:
        vdata.read_image(bomb)
    assert err.value.reason == "too_large"
    assert reject_counts(bomb) == {"too_large": 1}


def test_decompression_bomb_as_a_mask_sidecar_is_a_counted_reject(tmp_path, real_data):
    Image.open(real_data("photos") / "camera.png").save(tmp_path / "cam.png")
    bilevel_png(tmp_path / "cam.mask.png", 20_000, 20_000)
    assert reject_counts(tmp_path / "cam.png", "image-mask") == {"too_large": 1}


@pytest.fixture(scope="module")
def bounded_reads(tmp_path_factory) -> tuple[dict, Path]:
    """A 10000 x 10000 image and a 600-frame GIF read in one child with 96 MiB to spare:
    decoded whole, the image takes 400 MB (100 MB, then 300 MB as RGB), the GIF 118 MB."""
    tmp = tmp_path_factory.mktemp("bounded")
    big = bilevel_png(tmp / "big.png", 10_000, 10_000)  # under Pillow's 179M-pixel error
    gif = animation(tmp / "long.gif", 600, 256)
    result = run_bounded(
        f"""
        try:
            result = {{"image": list(vdata.read_image({str(big)!r}).shape)}}
        except PictureError as e:
            result = {{"image": {{"reason": e.reason, "message": str(e)}}}}
        frames = vdata.read_video({str(gif)!r}, fps=2, max_frames=8)
        rows = [int(np.argmax(f[:, 0, 0])) for f in frames]
        result["gif"] = {{"shape": list(frames.shape), "rows": rows}}
        """,
        headroom_mb=96,
    )
    return result, big


def test_huge_image_under_pillows_limit_is_refused_by_max_pixels(bounded_reads):
    result, big = bounded_reads
    assert "error" not in result, result
    assert result["image"]["reason"] == "too_large", result
    assert "100000000 pixels" in result["image"]["message"]
    assert "max_pixels" in result["image"]["message"]
    assert reject_counts(big) == {"too_large": 1}


def test_long_gif_decodes_only_the_frames_it_keeps(bounded_reads):
    result, _ = bounded_reads
    assert "error" not in result, result
    assert result["gif"]["shape"] == [8, 256, 256, 3]
    assert result["gif"]["rows"] == [0, 5, 10, 15, 20, 25, 30, 35]  # frame i lights row i


def test_max_pixels_is_configurable_per_source(tmp_path, real_data):
    photo = real_data("photos") / "camera.png"  # 512 x 512
    assert reject_counts(photo, max_pixels=512 * 512 - 1) == {"too_large": 1}
    assert vdata.read_image(photo, max_pixels=512 * 512).shape == (512, 512, 3)
    with pytest.raises(ValueError, match="max_pixels"):
        PrepareSource(kind="video", paths=["x"], max_pixels=0)


def _decode_everything(path: Path, fps, max_frames) -> np.ndarray:
    """The reader as it was: every frame decoded, then resampled and cut."""
    frames, times, t = [], [], 0.0
    if path.suffix == ".gif":
        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                frames.append(np.asarray(frame.convert("RGB")))
                times.append(t)
                t += frame.info.get("duration", 100) / 1000
    else:
        import av

        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time or 0.0))
    picked = range(len(frames))
    if fps:
        wanted = np.arange(times[0], times[-1] + 1e-9, 1 / fps)
        picked = sorted({int(np.argmin(np.abs(np.asarray(times) - w))) for w in wanted})
    return np.stack([frames[i] for i in picked][: max_frames or None])


@pytest.mark.parametrize("fps, max_frames", [(None, 5), (2.0, 3), (7.0, 100), (0.5, 8), (30, 4)])
def test_frames_kept_are_the_frames_a_whole_decode_would_pick(real_data, fps, max_frames):
    for clip in (real_data("gif") / "no_time_for_that_tiny.gif", real_data("video") / "bikes.mp4"):
        np.testing.assert_array_equal(
            vdata.read_video(clip, fps, max_frames), _decode_everything(clip, fps, max_frames)
        )


def test_frame_picking_stops_after_the_last_kept_frame():
    decoded = []

    def endless(step: float):
        for i in itertools.count():
            decoded.append(i)
            yield i * step, np.full((1, 1, 3), i % 256, np.uint8)

    frames = vdata.pick_frames(endless(0.1), fps=2, max_frames=8)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert max(decoded) <= 36
    decoded.clear()
    assert len(vdata.pick_frames(endless(0.1), fps=None, max_frames=3)) == 3
    assert max(decoded) <= 3


def test_oversized_video_frames_are_refused(real_data):
    clip = real_data("video") / "bikes.mp4"
    with pytest.raises(PictureError, match="max_pixels") as err:
        vdata.read_video(clip, 2, 3, max_pixels=1000)
    assert err.value.reason == "too_large"
    gif = real_data("gif") / "no_time_for_that_tiny.gif"
    with pytest.raises(PictureError, match="max_pixels"):
        vdata.read_video(gif, 2, 3, max_pixels=10)
