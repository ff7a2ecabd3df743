"""Generated ids -> spans -> files a user opens, plus `generations.jsonl`.

Images and masks become PNG, video GIF (and H.264 mp4 when PyAV is installed), SVG an `.svg`
that the hardened parser accepted (and a PNG render when cairosvg is installed), DNA FASTA,
text `.txt`. Models emit imperfect
spans: one cut at `max_new_tokens` is decoded as far as it goes and its note says so; a span
whose length does not fit its tokenizer (`tokens_per_item`) is not decoded and its note
says why. Nothing is silently dropped: every span gets a line in generations.jsonl. Nothing
is overwritten: a run into a folder that holds an earlier run's files numbers its prompts
after them (`next_index`) and appends to its generations.jsonl.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmfm.core.errors import LaunchError
from mmfm.core.modalities import modality_spec
from mmfm.core.types import MODALITY_NAMES, Modality
from mmfm.data.demo import COLORS
from mmfm.decoding.layout import Layout, visual_sizes
from mmfm.tokenization.recipe import load_recipe
from mmfm.tokenization.svg import SvgError, parse_svg, render_svg
from mmfm.tokenization.visual.records import VisualTokenizers
from mmfm.tokenization.vocab import Vocab


@dataclass
class Span:
    modality: str
    start: int
    """Index of its first id (an opening delimiter) in the ids it was split from."""
    end: int
    """Index after its last id (the closing delimiter, when there is one)."""
    body: list[int]
    """The ids between the delimiters."""
    closed: bool
    path: str | None = None
    note: str | None = None


def split_spans(ids: Sequence[int], layout: Layout) -> list[Span]:
    """Text runs and framed spans of `ids`, in order. A span without its closing delimiter
    runs to the end (closed=False); specials such as <sep> end a text run."""
    opens = {pair[0]: m for m, pair in layout.delimiters.items()}
    spans: list[Span] = []
    text: list[int] = []
    text_start = 0

    def flush(at: int) -> None:
        if text:
            spans.append(Span("text", text_start, at, list(text), True))
            text.clear()

    i = 0
    while i < len(ids):
        token = ids[i]
        if token in opens:
            flush(i)
            modality = opens[token]
            close = layout.delimiters[modality][1]
            end = next((j for j in range(i + 1, len(ids)) if ids[j] == close), None)
            stop = len(ids) if end is None else end
            spans.append(
                Span(
                    MODALITY_NAMES[modality],
                    i,
                    stop + (end is not None),
                    list(ids[i + 1 : stop]),
                    end is not None,
                )
            )
            i = stop + 1
            continue
        if token in layout.text and token not in (layout.bos, layout.eos):
            if not text:
                text_start = i
            text.append(token)
        else:
            flush(i)
        i += 1
    flush(len(ids))
    return spans


def answer_spans(prompt: Sequence[int], new: Sequence[int], layout: Layout) -> list[Span]:
    """The spans of a generated answer; a span the prompt opened (its answer modality)
    starts at its opening delimiter. Offsets index the prompt and new ids laid end to end."""
    opens = {pair[0] for pair in layout.delimiters.values()}
    offset = len(prompt) - 1 if prompt[-1] in opens else len(prompt)
    spans = split_spans([*prompt[offset:], *new], layout)
    for span in spans:
        span.start += offset
        span.end += offset
    return spans


def visual_decoders(recipe_path: str | None, vocab: Vocab | None):
    """(VisualTokenizers or None, then `visual_sizes`: span lengths, num_codes and the image
    framing of the trained visual tokenizers) of the tokenizer recipe at `recipe_path`, for
    `vocab` (None and empty sizes without either)."""
    if recipe_path is None or vocab is None:
        return None, {}, {}, None
    recipe = load_recipe(recipe_path)
    visual = VisualTokenizers(recipe, vocab)
    return visual, *visual_sizes(recipe, visual)


class SpanWriter:
    """Decodes spans into files under `out`; `visual` (VisualTokenizers) decodes the unified
    vocabulary's image, mask and video codes (the demo's images decode without one)."""

    def __init__(self, layout: Layout, out: str | Path, visual=None):
        self.layout, self.out, self.visual = layout, Path(out), visual
        self.out.mkdir(parents=True, exist_ok=True)

    def write(self, span: Span, stem: str) -> Span:
        """Decode `span` into `<out>/<stem>.<ext>`; sets its path and note (and returns it)."""
        notes = (
            []
            if span.closed
            else ["unterminated (cut at max_new_tokens): decoded as far as it goes"]
        )
        spec = modality_spec(span.modality)
        write = getattr(self, f"_{span.modality}") if spec is None else self._registered
        try:
            path = write(span, self.out / stem, notes)
        except (ValueError, RuntimeError) as e:  # VocabError, SvgError, DnaError, decoder shapes
            path, notes = None, [*notes, f"not decoded: {e}"]
        span.path = None if path is None else str(path)
        span.note = "; ".join(notes) or None
        return span

    # -- one method per modality ----------------------------------------------------------------

    def _registered(self, span: Span, stem: Path, notes: list[str]) -> Path:
        """A registered modality's span: its codes decoded by its spec, written by its
        `write` (default: the value as text in `<stem>.txt`)."""
        spec = modality_spec(span.modality)
        book = self.layout.codes[spec.name]
        codes = [t - book.start for t in span.body if t in book]
        if len(codes) < len(span.body):
            notes.append(f"{len(span.body) - len(codes)} non-{spec.name} ids skipped")
        value = spec.decode(codes)
        if spec.write is not None:
            return spec.write(value, stem)
        path = stem.with_suffix(".txt")
        path.write_text(str(value), encoding="utf-8")
        return path

    def _text(self, span: Span, stem: Path, notes: list[str]) -> Path:
        path = stem.with_suffix(".txt")
        path.write_text(self.layout.decode_text(span.body), encoding="utf-8")
        return path

    def _dna(self, span: Span, stem: Path, notes: list[str]) -> Path:
        from Bio import SeqIO
        from Bio.Seq import Seq
        from Bio.SeqRecord import SeqRecord

        book = self.layout.codes["dna"]
        codes = [t - book.start for t in span.body if t in book]
        if len(codes) < len(span.body):
            notes.append(f"{len(span.body) - len(codes)} non-DNA ids skipped")
        sequence = "".join(self.layout.dna_pieces[c] for c in codes)
        path = stem.with_suffix(".fasta")
        record = SeqRecord(Seq(sequence), id=stem.name, description=f"{len(sequence)} nt")
        SeqIO.write([record], path, "fasta")
        return path

    def _svg(self, span: Span, stem: Path, notes: list[str]) -> Path:
        code = self.layout.decode_text(span.body)
        try:
            parse_svg(code, max_kb=1 << 20, origin="generated SVG")
        except SvgError as e:
            path = stem.with_suffix(".svg.txt")
            path.write_text(code, encoding="utf-8")
            notes.append(f"kept as text: {e}")
            return path
        path = stem.with_suffix(".svg")
        path.write_text(code, encoding="utf-8")
        # A render only when cairosvg is installed and can draw it; the .svg is the output.
        with contextlib.suppress(SvgError, LaunchError, OSError, ValueError):
            Image.fromarray(render_svg(code)).save(stem.with_suffix(".svg.png"))
        return path

    def _image(self, span: Span, stem: Path, notes: list[str]) -> Path:
        wanted = self.layout.tokens_per_item["image"]
        if len(span.body) != wanted:
            raise ValueError(f"an image span of {len(span.body)} ids; its tokenizer makes {wanted}")
        if self.layout.demo:
            picture = demo_picture(np.array(span.body) - self.layout.codes["image"].start)
        else:
            picture = self._visual().decode(Modality.IMAGE, span.body)
        path = stem.with_suffix(".png")
        Image.fromarray(picture).save(path)
        return path

    def _mask(self, span: Span, stem: Path, notes: list[str]) -> Path:
        most = self.layout.tokens_per_item["mask"]
        if not 1 <= len(span.body) <= most:
            raise ValueError(f"{len(span.body)} mask codes; the mask tokenizer takes 1..{most}")
        mask = self._visual().decode(Modality.MASK, span.body)
        path = stem.with_suffix(".png")
        Image.fromarray(mask * 255).save(path)
        return path

    def _video(self, span: Span, stem: Path, notes: list[str]) -> Path:
        body, skipped = whole_frames(span.body, self.layout)
        if skipped:
            per_frame = self.layout.tokens_per_item["video"]
            notes.append(f"{skipped} frame(s) without {per_frame} codes skipped")
        clip = self._visual().decode(Modality.VIDEO, body)
        path = stem.with_suffix(".gif")
        first, *rest = (Image.fromarray(f) for f in clip)
        first.save(path, save_all=True, append_images=rest, duration=500, loop=0)
        if write_mp4(clip, stem.with_suffix(".mp4")):
            notes.append(f"also {stem.with_suffix('.mp4').name}")
        return path

    def _visual(self):
        if self.visual is None:
            raise ValueError(
                "no visual tokenizer to decode it: pass --tokenizers RECIPE (a tokenizer recipe "
                "with image_tokenizer, mask_tokenizer, video_tokenizer)"
            )
        return self.visual


def whole_frames(body: Sequence[int], layout: Layout) -> tuple[list[int], int]:
    """A video span's body cut to its frames of `tokens_per_item` codes, each closed by
    <eof> and the last by <eov> as the video tokenizer decodes them, and the number of
    frames skipped (cut short or overlong); ValueError when none is whole."""
    per_frame = layout.tokens_per_item["video"]
    ends = {layout.specials["<eof>"], layout.specials["<eov>"]}
    frames, frame = [], []
    for token in body:
        if token in ends:
            frames.append(frame)
            frame = []
        else:
            frame.append(token)
    if frame:
        frames.append(frame)
    whole = [f for f in frames if len(f) == per_frame]
    if not whole:
        raise ValueError(f"no complete frame of {per_frame} codes")
    ids = [t for f in whole for t in [*f, layout.specials["<eof>"]]]
    ids[-1] = layout.specials["<eov>"]
    return ids, len(frames) - len(whole)


def write_mp4(frames: Sequence[np.ndarray], path: Path, fps: int = 2) -> bool:
    """H.264 (yuv420p) of RGB `frames` when PyAV is installed (`pip install mmfm[video]`);
    False without it. Odd sizes are padded by one pixel, as yuv420p needs even ones."""
    try:
        import av
    except ImportError:
        return False
    height, width = frames[0].shape[:2]
    even = (height + height % 2, width + width % 2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = even
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            padded = np.zeros((*even, 3), np.uint8)
            padded[:height, :width] = frame
            for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return True


DEMO_COLORS = {
    "black": (0, 0, 0), "white": (255, 255, 255), "red": (220, 30, 30), "green": (30, 160, 60),
    "blue": (30, 60, 220), "yellow": (240, 210, 30), "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}  # fmt: skip


def demo_picture(codes: np.ndarray, scale: int = 16) -> np.ndarray:
    """The demo corpus's 8x8 grid of (colour, shade) codes as an RGB picture (mmfm.data.demo:
    code = colour * 8 + shade; the shade is noise and drawn as a slight lightening)."""

    palette = np.array([DEMO_COLORS[c] for c in COLORS], dtype=np.float32)
    colour, shade = codes // 8, codes % 8
    rgb = palette[np.clip(colour, 0, len(COLORS) - 1)] + 12.0 * shade[:, None]
    grid = np.clip(rgb, 0, 255).astype(np.uint8).reshape(8, 8, 3)
    return grid.repeat(scale, 0).repeat(scale, 1)


GENERATIONS = "generations.jsonl"
_NUMBERED = re.compile(r"(\d+)-\d+-")


@contextlib.contextmanager
def numbering(out: str | Path) -> Iterator[int]:
    """The first free index of `out` (`next_index`), with an exclusive lock on its
    generations.jsonl held until the block has written its files and lines: two runs into
    one folder at the same time take turns instead of taking the same numbers."""
    with open(Path(out) / GENERATIONS, "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield next_index(out)


def next_index(out: str | Path) -> int:
    """The number of the next prompt written to `out`: after the highest `NNNN-k-...` file
    and after every line of its generations.jsonl, so a second run into the same folder
    continues the numbering instead of overwriting the first run's files."""
    out = Path(out)
    numbers = [int(m[1]) for f in out.iterdir() if (m := _NUMBERED.match(f.name))]
    lines = 0
    if (out / GENERATIONS).is_file():
        with open(out / GENERATIONS, "rb") as f:
            lines = sum(1 for line in f if line.strip())
    return max([lines, *(n + 1 for n in numbers)])


def write_generations(out: str | Path, records: list[dict], spans: list[list[Span]]) -> Path:
    """`<out>/generations.jsonl`: one line per prompt with its ids, new ids and spans,
    appended after the lines of earlier runs into the same folder."""
    path = Path(out) / GENERATIONS
    with open(path, "a", encoding="utf-8") as f:
        for record, its_spans in zip(records, spans, strict=True):
            rows = [
                {k: v for k, v in asdict(s).items() if k != "body"} | {"length": len(s.body)}
                for s in its_spans
            ]
            f.write(json.dumps({**record, "spans": rows}, ensure_ascii=False) + "\n")
    return path
