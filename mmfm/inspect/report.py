"""The HTML page of `mmfm inspect`: one `index.html` and the media files of its spans.

Every row is shown as its documents (a box each; a piece of a split document says so), each
token coloured by the modality of the span it is in and greyed where it is not learned (the
loss weight with which it is predicted is 0, or it starts a document or a piece), then the
padding. Image, mask, video, SVG and DNA spans are decoded by `SpanWriter` into `media/`
and shown below their document: pictures as PNG / GIF, SVG as its PNG render (its code as
escaped text; untrusted SVG markup is never put into the page), DNA as its sequence.

The data is untrusted: every string from it goes through `html.escape`, and the page's
Content-Security-Policy runs only its own script and style (by hash), so markup that slipped
through would still not run. The script marks every picture with its `naturalWidth` once the
page has loaded and says how many did not load (the browser test reads it back).
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from mmfm.config.schema import Config
from mmfm.core.types import IGNORE_INDEX, MODALITY_NAMES
from mmfm.data.packing import PAD_ID
from mmfm.decoding.layout import Layout
from mmfm.decoding.outputs import Span, SpanWriter, split_spans

COLOURS = {
    "text": "#dbe9ff", "special": "#d9d9d9", "image": "#ffd8a8", "mask": "#ffc9e3",
    "video": "#d3f9d8", "dna": "#fff3a8", "svg": "#e5dbff", "pad": "#f1f3f5",
}  # fmt: skip
"""Background of each kind of token; a registered modality gets OTHER."""
OTHER = "#c5f6fa"

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; }
.row { border-top: 3px solid #555; margin-top: 2em; padding-top: .5em; }
.doc { border: 2px solid #777; border-radius: 4px; margin: .4em 0; padding: .3em; }
.doc.cut { border-style: dashed; }
.head { font-size: 12px; color: #555; margin-bottom: .2em; }
.tokens { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap;
  word-break: break-all; }
.t { box-shadow: inset -1px 0 0 rgba(255, 255, 255, .9); }
.nl { opacity: .45; text-decoration: line-through; }
.code { font-size: 9px; }
.pad { background: #f1f3f5; color: #999; border: 1px dashed #bbb; padding: .2em;
  margin: .4em 0; font-size: 12px; }
figure { display: inline-block; margin: .3em .6em .3em 0; vertical-align: top; }
figure img { width: 128px; image-rendering: pixelated; border: 1px solid #aaa; }
figcaption { font-size: 11px; color: #555; max-width: 30em; }
.stats { font-size: 12px; color: #555; }
pre.dna { white-space: pre-wrap; word-break: break-all; max-width: 60em; }
.legend span { padding: 0 .5em; margin-right: .3em; }
#broken { color: #c00; font-weight: bold; }
"""

SCRIPT = """
addEventListener("load", () => {
  const pictures = Array.from(document.images);
  for (const img of pictures) img.dataset.width = String(img.naturalWidth);
  const broken = pictures.filter((img) => !img.naturalWidth).length;
  document.body.dataset.pictures = String(pictures.length);
  document.body.dataset.broken = String(broken);
  if (broken) document.getElementById("broken").textContent = broken + " picture(s) did not load";
});
"""


@dataclass(frozen=True)
class Piece:
    """A piece of a document in a row: `tokens[start:end]` of the document `key`."""

    key: str
    source: str
    """Where the document came from (its shard's record of it: a prepare source's name)."""
    start: int
    end: int
    length: int
    """The whole document's tokens."""


@dataclass
class Row:
    """One packed row as the trainer's stream makes it."""

    step: int
    stream: int
    arrays: dict[str, np.ndarray]
    """tokens, labels, positions, doc_ids, loss_weights, modality: `[seq_len]` each."""
    pieces: list[Piece]
    """The document pieces laid end to end in it, in order; the rest is padding."""
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    """Tokens the stream's step took from each of data.sources."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped while making it, by reason."""


@dataclass
class RowStats:
    tokens: int
    pad: int
    docs: int
    cut: int
    """Pieces of documents split across rows."""
    targets: int
    """Tokens learned with a weight above 0."""
    kinds: Counter
    """Tokens (not padding) by kind: text, special, image, ..."""
    by_source: Counter = field(default_factory=Counter)
    """Tokens by (document source, kind)."""


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _csp(style: str) -> str:
    return (
        f"default-src 'none'; img-src 'self'; style-src {_hash(style)}; "
        f"script-src {_hash(SCRIPT)}; base-uri 'none'; form-action 'none'"
    )


class Kinds:
    """The kind of every id of a layout (the modality of its codebook or delimiter, text or
    special), refined by the spans a document's ids make (an SVG span's text is svg)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.names = ["special", "text", *layout.codes]
        self.table = np.zeros(layout.size, np.int16)
        self.table[layout.text.start : layout.text.stop] = 1
        for name, ids in layout.codes.items():
            self.table[ids.start : ids.stop] = self.index(name)
        for modality, pair in layout.delimiters.items():
            self.table[list(pair)] = self.index(MODALITY_NAMES[modality])
        for name in ("<eof>", "<eov>"):
            if name in layout.specials and "video" in self.names:
                self.table[layout.specials[name]] = self.index("video")
        self.table[[layout.bos, layout.eos]] = 0
        self.special_names = {i: n for n, i in layout.specials.items()}
        self.special_names |= {layout.bos: "<s>", layout.eos: "</s>", PAD_ID: "<pad>"}

    def index(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)

    def of(self, tokens: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
        inside = tokens < len(self.table)
        kinds = np.where(inside, self.table[np.where(inside, tokens, 0)], 0)
        for span in spans:
            if span.modality != "text":
                kinds[span.start : span.end] = self.index(span.modality)
        return kinds

    def label(self, token: int, kind: str) -> tuple[str, bool]:
        """What a token shows (its text, its code in its codebook, or its special's name),
        and whether it is a code."""
        layout = self.layout
        if kind in ("text", "svg") and token in layout.text:
            return layout.decode_text([token]), False
        for ids in layout.codes.values():
            if token in ids:
                return str(token - ids.start), True
        return self.special_names.get(token, f"[{token}]"), False


def learned(row: dict[str, np.ndarray], start: int, end: int) -> np.ndarray:
    """The loss weight with which each token of a piece is predicted (from the token before
    it); NaN for the piece's first token, which nothing in this row predicts."""
    weights = np.full(end - start, np.nan, np.float32)
    weights[1:] = np.where(
        row["labels"][start : end - 1] == IGNORE_INDEX, 0.0, row["loss_weights"][start : end - 1]
    )
    return weights


class Page:
    """Builds the page of `rows`; spans are decoded into `<out>/media` as they are met."""

    def __init__(self, out: Path, layout: Layout, visual=None):
        self.out, self.layout = out, layout
        self.writer = SpanWriter(layout, out / "media", visual)
        self.kinds = Kinds(layout)

    def row(self, index: int, row: Row) -> tuple[str, RowStats]:
        arrays = row.arrays
        used = sum(p.end - p.start for p in row.pieces)
        pad = len(arrays["tokens"]) - used
        stats = RowStats(len(arrays["tokens"]), pad, len(row.pieces), 0, 0, Counter())
        parts, at = [], 0
        for d, piece in enumerate(row.pieces):
            size = piece.end - piece.start
            part, kinds = self._piece(arrays, at, at + size, piece, f"r{index:03d}-d{d:03d}")
            parts.append(part)
            stats.kinds.update(kinds)
            stats.by_source.update((piece.source, k) for k in kinds)
            stats.cut += size < piece.length
            at += size
        learnt = (arrays["labels"] != IGNORE_INDEX) & (arrays["loss_weights"] > 0)
        stats.targets = int(learnt.sum())
        if pad:
            parts.append(f'<div class="pad">+ {pad} padding tokens (no targets)</div>')
        head = (
            f'<div class="row" id="row-{index}"><h2>row {index}: step {row.step}, stream '
            f"{row.stream}</h2>{_row_note(stats, row)}"
        )
        return head + "".join(parts) + "</div>", stats

    def _piece(self, arrays, a: int, b: int, piece: Piece, stem: str) -> tuple[str, list[str]]:
        tokens = arrays["tokens"][a:b]
        spans = split_spans(tokens.tolist(), self.layout)
        names = [self.kinds.names[k] for k in self.kinds.of(tokens, spans)]
        weights = learned(arrays, a, b)
        positions = arrays["positions"][a:b]
        body = "".join(
            self._token(int(t), name, float(w), int(p))
            for t, name, w, p in zip(tokens, names, weights, positions, strict=True)
        )
        continues = piece.end < piece.length
        media = "".join(
            self._media(s, f"{stem}-{k}-{s.modality}", continues) for k, s in enumerate(spans)
        )
        cut = piece.end - piece.start < piece.length
        what = (
            f"its tokens {piece.start}..{piece.end - 1} of {piece.length}"
            if cut
            else f"{piece.length} tokens"
        )
        head = (
            f'<div class="head">{html.escape(piece.key)} from {html.escape(piece.source)}: '
            f"{what}, at {a}..{b - 1} of the row, {int((weights > 0).sum())} learned</div>"
        )
        box = f'<div class="doc{" cut" if cut else ""}">{head}<div class="tokens">{body}</div>'
        return box + media + "</div>", names

    def _token(self, token: int, kind: str, weight: float, position: int) -> str:
        label, code = self.kinds.label(token, kind)
        shown = html.escape(label)
        w = "none (starts the piece)" if np.isnan(weight) else f"{weight:g}"
        title = html.escape(f"{kind} id {token}, position {position}, loss weight {w}")
        classes = f"t k-{html.escape(kind)}" + (" code" if code else "")
        classes += " nl" if not weight > 0 else ""
        return f'<span class="{classes}" title="{title}">{shown}</span>'

    def _media(self, span: Span, stem: str, continues: bool) -> str:
        """The decoded span (a picture, a sequence, SVG's render and code) with its caption;
        `continues`: its document goes on in the next row."""
        if span.modality == "text":
            return ""
        what = f"{span.modality}, {len(span.body)} ids"
        if not span.closed:
            why = "continues in the next row" if continues else "has no closing delimiter"
            return _figure("", f"{what}: {why} (not decoded)")
        self.writer.write(span, stem)
        if span.path is None:
            return _figure("", f"{what}: {span.note}")
        path = Path(span.path)
        src = f"media/{quote(path.name)}"
        if path.suffix in (".png", ".gif"):
            return _figure(f'<img src="{html.escape(src)}" alt="{html.escape(what)}">', what)
        if span.modality == "dna":
            lines = path.read_text(encoding="utf-8").splitlines()[1:]
            sequence = "".join(lines)
            return _figure(
                f'<pre class="dna">{html.escape(sequence)}</pre>', f"DNA, {len(sequence)} nt"
            )
        code = path.read_text(encoding="utf-8")
        picture = ""
        render = path.with_name(path.stem + ".svg.png") if path.suffix == ".svg" else None
        if render is not None and render.is_file():
            picture = f'<img src="media/{html.escape(quote(render.name))}" alt="svg render">'
        note = f"{what}" + (f": {span.note}" if span.note else "")
        details = f"<details><summary>code</summary><pre>{html.escape(code)}</pre></details>"
        return _figure(picture + details, note)


def _figure(body: str, caption: str) -> str:
    return f"<figure>{body}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _row_note(stats: RowStats, row: Row) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(stats.kinds.items()))
    sources = ", ".join(f"{k} {n}" for k, n in row.tokens_by_source.items())
    skipped = ", ".join(f"{k} {n}" for k, n in row.skipped.items())
    note = (
        f"{stats.docs} document piece(s) ({stats.cut} split), padding {stats.pad} of "
        f"{stats.tokens} ({stats.pad / stats.tokens:.1%}), {stats.targets} targets; tokens by "
        f"kind: {kinds}; by data source (the stream's step): {sources}"
        + (f"; skipped samples: {skipped}" if skipped else "")
    )
    return f'<div class="stats">{html.escape(note)}</div>'


def _summary(rows: Sequence[Row], stats: Sequence[RowStats]) -> str:
    """Tokens by kind, by data source (the mix) and by document source and kind; padding,
    documents per row, skipped samples."""
    total = sum(s.tokens for s in stats)
    kinds: Counter = Counter()
    by_doc_source: Counter = Counter()
    for s in stats:
        kinds.update(s.kinds)
        by_doc_source.update(s.by_source)
    kinds["pad"] = sum(s.pad for s in stats)
    steps = {(r.step, r.stream): r for r in rows}  # decompose: a step's rows share its counts
    mix: Counter = Counter()
    skipped: Counter = Counter()
    for row in steps.values():
        mix.update(row.tokens_by_source)
        skipped.update(row.skipped)
    docs = [s.docs for s in stats]
    names = [k for k, _ in kinds.most_common() if k != "pad"]
    doc_sources = sorted({source for source, _ in by_doc_source})
    per_source = [[by_doc_source[source, k] for k in names] for source in doc_sources]
    text = (
        f"{len(rows)} rows, {total} tokens; padding {kinds['pad'] / total:.1%}; document "
        f"pieces per row: mean {np.mean(docs):.1f}, min {min(docs)}, max {max(docs)}; "
        f"{sum(s.cut for s in stats)} split; skipped samples: "
        + (", ".join(f"{k} {n}" for k, n in skipped.items()) or "none")
    )
    return (
        f"<h2>summary</h2><p>{html.escape(text)}</p>"
        + _table(
            ["kind", "tokens", "share"],
            [[k, n, f"{n / total:.1%}"] for k, n in kinds.most_common()],
            kinds=True,
        )
        + _table(
            ["data source", "tokens", "share"],
            [[k, n, f"{n / max(sum(mix.values()), 1):.1%}"] for k, n in mix.most_common()],
        )
        + _table(
            ["document source", *names, "tokens"],
            [
                [source, *counts, sum(counts)]
                for source, counts in zip(doc_sources, per_source, strict=True)
            ],
        )
    )


def _table(head: Sequence[str], rows: Sequence[Sequence], kinds: bool = False) -> str:
    """A table whose first column names its rows (coloured as a kind with `kinds`)."""
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = ""
    for name, *cells in rows:
        shown = html.escape(str(name))
        style = f' class="k-{shown}"' if kinds else ""
        tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
        body += f"<tr><th{style}>{shown}</th>{tds}</tr>"
    return f"<table><tr>{th}</tr>{body}</table>"


def _legend(kinds: Kinds) -> str:
    names = [*kinds.names, "pad"]
    items = "".join(f'<span class="k-{html.escape(n)}">{html.escape(n)}</span>' for n in names)
    return (
        f'<p class="legend">{items} <span class="nl">not learned</span> (hover a token for its '
        "id, position and loss weight; a dashed box is a piece of a split document)</p>"
    )


def _kind_style(kinds: Kinds) -> str:
    names = [*kinds.names, "pad"]
    return "".join(f".k-{n} {{ background: {COLOURS.get(n, OTHER)}; }}\n" for n in names)


def render(title: str, cfg: Config, page: Page, rows: Sequence[Row], progress=None) -> str:
    """The whole page of `rows`."""
    parts, stats = [], []
    for index, row in enumerate(rows):
        part, row_stats = page.row(index, row)
        parts.append(part)
        stats.append(row_stats)
        if progress is not None:
            progress.update()
    style = STYLE + _kind_style(page.kinds)
    data = cfg.data
    setup = (
        f"seq_len {data.seq_len}, packing {data.packing}, attention {data.attention}, "
        f"{cfg.train.global_batch_size} streams (train.global_batch_size), seed {cfg.train.seed}, "
        f"sources: {', '.join(s.name for s in data.source_list())}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_csp(style)}">'
        f"<title>mmfm inspect: {html.escape(title)}</title><style>{style}</style>"
        f"<script>{SCRIPT}</script></head><body>"
        f"<h1>mmfm inspect</h1><p>{html.escape(title)}</p><p>{html.escape(setup)}</p>"
        f'<p id="broken"></p>{_legend(page.kinds)}{_summary(rows, stats)}{"".join(parts)}'
        "</body></html>\n"
    )


def write_report(
    out: Path, title: str, cfg: Config, layout: Layout, visual, rows: Sequence[Row], progress=True
) -> Path:
    """`<out>/index.html` of `rows`, their spans decoded into `<out>/media`."""
    from tqdm import tqdm

    page = Page(out, layout, visual)
    with tqdm(total=len(rows), unit="row", desc="report", disable=not progress) as bar:
        text = render(title, cfg, page, rows, bar)
    path = out / "index.html"
    path.write_text(text, encoding="utf-8")
    return path
