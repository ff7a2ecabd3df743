"""Modality-constrained decoding: the vocabulary's span grammar as a logits processor.

Every sequence is in a mode (free, or inside an image, mask, video, DNA or SVG span) with a
count of codes so far. Mode and count pick one row of a boolean table `[situations, vocab]`
of allowed ids; the disallowed logits become -inf before sampling, so every sampled span
obeys the grammar by construction (no rejection, no host synchronisation):

    <img>    exactly tokens_per_item image codes, then </img>; with Emu3's framing
             (layout.image_framing) each position of the body holds its header id, a code
             or a row's <eol> / the final <eof>, as the framing lists them
    <mask>   1 .. tokens_per_item mask codes, then </mask>
    <vision> frames of tokens_per_item video codes, each closed by <eof>, the last by <eov>,
             then </vision>
    <dna>    DNA codes until </dna>;   <svg>  text pieces until </svg>
    <open>   a registered modality's codes until its closer (a mode and row of its own each)
    free     text, </s>, the opening delimiters and the other specials (no stray codes,
             closing delimiters or frame ends)
"""

from __future__ import annotations

from enum import IntEnum

import torch

from mmfm.core.types import MODALITY_NAMES, Modality
from mmfm.decoding.layout import Layout


class Mode(IntEnum):
    FREE = 0
    IMAGE = 1
    MASK = 2
    VIDEO = 3
    VIDEO_DONE = 4
    """After <eov>: only </vision>."""
    DNA = 5
    SVG = 6


MODE_OF = {
    Modality.IMAGE: Mode.IMAGE,
    Modality.MASK: Mode.MASK,
    Modality.VIDEO: Mode.VIDEO,
    Modality.DNA: Mode.DNA,
    Modality.SVG: Mode.SVG,
}


class Row(IntEnum):
    FREE = 0
    IMAGE_CODE = 1
    IMAGE_CLOSE = 2
    MASK_FIRST = 3
    MASK_MORE = 4
    MASK_CLOSE = 5
    VIDEO_CODE = 6
    VIDEO_FRAME_END = 7
    VIDEO_CLOSE = 8
    DNA = 9
    SVG = 10


def fixed_ids(layout: Layout) -> list[int]:
    """The ids Emu3's framing puts at fixed positions of an image span: one row each, after
    the registered modalities' rows."""
    framing = layout.image_framing
    return sorted({i for i in framing.expected() if i is not None}) if framing else []


def registered_modes(layout: Layout) -> list[int]:
    """The registered modalities of `layout`: the j-th has mode len(Mode) + j and row
    len(Row) + j."""
    return sorted(m for m in layout.delimiters if m >= len(Modality))


def allowed_table(layout: Layout, vocab_size: int) -> torch.Tensor:
    """Boolean `[len(Row) + registered + fixed ids, vocab_size]`: the ids allowed in each
    situation."""
    extra, fixed = registered_modes(layout), fixed_ids(layout)
    table = torch.zeros(len(Row) + len(extra) + len(fixed), vocab_size, dtype=torch.bool)
    closes = {m: pair[1] for m, pair in layout.delimiters.items()}
    frame_ends = [layout.specials[n] for n in ("<eof>", "<eov>") if n in layout.specials]
    row_marks = [layout.specials[n] for n in ("<grid>", "<eol>") if n in layout.specials]
    structural = {*closes.values(), *frame_ends, *row_marks, layout.bos}
    codes = {name: list(r) for name, r in layout.codes.items()}

    def allow(row: Row, ids) -> None:
        table[row, list(ids)] = True

    allow(Row.FREE, layout.text)
    allow(Row.FREE, [i for i in layout.specials.values() if i not in structural])
    allow(Row.FREE, [layout.eos])
    table[Row.FREE, layout.bos] = False
    if Modality.IMAGE in closes:
        allow(Row.IMAGE_CODE, codes["image"])
        allow(Row.IMAGE_CLOSE, [closes[Modality.IMAGE]])
    if Modality.MASK in closes:
        allow(Row.MASK_FIRST, codes["mask"])
        allow(Row.MASK_MORE, [*codes["mask"], closes[Modality.MASK]])
        allow(Row.MASK_CLOSE, [closes[Modality.MASK]])
    if Modality.VIDEO in closes:
        allow(Row.VIDEO_CODE, codes["video"])
        allow(Row.VIDEO_FRAME_END, frame_ends)
        allow(Row.VIDEO_CLOSE, [closes[Modality.VIDEO]])
    if Modality.DNA in closes:
        allow(Row.DNA, [*codes["dna"], closes[Modality.DNA]])
    if Modality.SVG in closes:
        allow(Row.SVG, [*layout.text, closes[Modality.SVG]])
        table[Row.SVG, [layout.bos, layout.eos]] = False
    for j, modality in enumerate(extra):
        allow(len(Row) + j, [*codes[MODALITY_NAMES[modality]], closes[modality]])
    for k, token in enumerate(fixed):
        table[len(Row) + len(extra) + k, token] = True
    table[:, layout.size :] = False  # embedding rows past the vocabulary (padding)
    return table


class SpanConstraint:
    """The grammar's state for a batch of sequences, and the logits processor over it.

    Both directions are table lookups, a handful of tensor ops per step for any batch: the
    situation is `rows[mode, count]`, the additive mask `bias[situation]` (0 or -inf), and a
    token moves a sequence by `next_mode[mode, class]` / `restart[mode, class]`, where the
    class of an id is: other, counted code, <eof>, <eov>, opener of mode m, closer of mode m.
    """

    def __init__(self, layout: Layout, vocab_size: int, batch: int, device: torch.device):
        allowed = allowed_table(layout, vocab_size)
        self.bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).to(device)
        n = layout.tokens_per_item
        image, mask, frame = n.get("image", 0), n.get("mask", 0), n.get("video", 0)
        self.cap = max(image, mask, frame) + 1
        counts = torch.arange(self.cap)
        extra = registered_modes(layout)
        rows = torch.full((len(Mode) + len(extra), self.cap), int(Row.FREE), dtype=torch.long)
        rows[Mode.IMAGE] = torch.where(counts < image, Row.IMAGE_CODE, Row.IMAGE_CLOSE)
        if layout.image_framing is not None:  # a fixed id's own row where the framing has one
            fixed = fixed_ids(layout)
            for count, token in enumerate(layout.image_framing.expected()):
                if token is not None:
                    rows[Mode.IMAGE, count] = len(Row) + len(extra) + fixed.index(token)
        rows[Mode.MASK] = torch.where(counts < mask, Row.MASK_MORE, Row.MASK_CLOSE)
        rows[Mode.MASK, 0] = Row.MASK_FIRST
        rows[Mode.VIDEO] = torch.where(counts < frame, Row.VIDEO_CODE, Row.VIDEO_FRAME_END)
        rows[Mode.VIDEO_DONE] = Row.VIDEO_CLOSE
        rows[Mode.DNA], rows[Mode.SVG] = Row.DNA, Row.SVG
        for j in range(len(extra)):
            rows[len(Mode) + j] = len(Row) + j
        self.rows_of = rows.to(device)
        self._transitions(layout, vocab_size, device)
        self.mode = torch.zeros(batch, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)

    def _transitions(self, layout: Layout, vocab_size: int, device: torch.device) -> None:
        extra = registered_modes(layout)
        modes = len(Mode) + len(extra)
        code, eof, eov, opener, closer = 1, 2, 3, 4, 4 + modes
        classes = torch.zeros(vocab_size, dtype=torch.long)
        for name in ("image", "mask", "video"):
            if name in layout.codes:
                classes[list(layout.codes[name])] = code
        for name, cls in (("<eof>", eof), ("<eov>", eov)):
            if name in layout.specials:
                classes[layout.specials[name]] = cls
        for modality, (start, end) in layout.delimiters.items():
            mode = MODE_OF[modality] if modality in MODE_OF else len(Mode) + extra.index(modality)
            classes[start] = opener + mode
            classes[end] = closer + (Mode.VIDEO_DONE if mode == Mode.VIDEO else mode)
        n_classes = closer + modes
        next_mode = torch.arange(modes)[:, None].repeat(1, n_classes)
        for mode in range(1, modes):  # every mode but FREE
            next_mode[Mode.FREE, opener + mode] = mode
            next_mode[mode, closer + mode] = Mode.FREE
        next_mode[Mode.VIDEO, eov] = Mode.VIDEO_DONE
        restart = next_mode != torch.arange(modes)[:, None]
        restart[Mode.VIDEO, eof] = True
        increment = torch.zeros(modes, n_classes, dtype=torch.long)
        increment[:, code] = 1
        increment[Mode.IMAGE] = 1  # every id of an image body counts (framing ids too)
        increment[restart] = 0
        self.classes, self.next_mode = classes.to(device), next_mode.to(device)
        self.restart, self.increment = restart.to(device), increment.to(device)

    def rows(self) -> torch.Tensor:
        """The situation of every sequence `[batch]`."""
        return self.rows_of[self.mode, self.count.clamp(max=self.cap - 1)]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` `[batch, vocab]` with every id the grammar forbids at -inf."""
        return logits + self.bias[self.rows()]

    def update(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Advance every sequence by its token `[batch]` (where `active`, if given)."""
        cls = self.classes[tokens]
        mode = self.next_mode[self.mode, cls]
        count = torch.where(
            self.restart[self.mode, cls], 0, self.count + self.increment[self.mode, cls]
        )
        if active is not None:
            mode = torch.where(active, mode, self.mode)
            count = torch.where(active, count, self.count)
        self.mode, self.count = mode, count
