"""The bound on one prepare record (`sources[].max_record_mb`): a record over it is counted
`too_large`, naming file and record. Where the format allows, it is refused before it is
read whole (a text or SVG file from its size, a jsonl line after its first bytes over the
bound, a raw sample's text members from their sizes); records a parser must read whole (a
DNA sequence, a decompressed member) are measured once read, before they are tokenized: a
128 MiB document costed minutes of tokenizing and gigabytes of memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

from mmfm.core.types import DnaRecord, SvgRecord, TaskRecord, TextRecord

MIB = 1 << 20
_SKIP = 1 << 20  # bytes read at a time past the bound of an over-long line


def lines(f: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The lines of `f`; a line of more than `limit` bytes (its newline aside) comes as None,
    and at most `limit` + 1 bytes of it are held at once."""
    while line := f.readline(limit + 1):
        if len(line) - line.endswith(b"\n") <= limit:
            yield line
            continue
        while line and not line.endswith(b"\n"):  # the rest of the line, read and dropped
            line = f.readline(_SKIP)
        yield None


def record_size(record) -> int:
    """Bytes (UTF-8) of a record's text, DNA or SVG code, prompts and responses included;
    pictures are bounded by `max_pixels` instead, registered modalities' values not at all."""
    if isinstance(record, TextRecord):
        texts = [record.text]
    elif isinstance(record, DnaRecord):
        texts = [record.sequence, record.output or ""]
    elif isinstance(record, SvgRecord):
        texts = [record.svg, record.text or ""]
    elif isinstance(record, TaskRecord):
        texts = [p.value for p in (*record.prompt, *record.response) if isinstance(p.value, str)]
    else:
        return 0
    return sum(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in texts)


def too_large(limit: int, size: int | None = None, hint: str = "") -> str:
    """The reject's detail: how large (if known), the bound, what to change."""
    return (
        f"{'' if size is None else f'{size / MIB:.1f} MiB, '}over sources[].max_record_mb "
        f"({limit / MIB:g} MiB){hint}: raise it to keep such records"
    )


def within(limit: int, reject: Callable[[str, str, str], None]) -> Callable[[str, object], bool]:
    """`fits(where, record)`: whether the record is within `limit` bytes; if not, it is
    rejected as too_large."""

    def fits(where: str, record) -> bool:
        size = record_size(record)
        if size <= limit:
            return True
        hint = " (or cut DNA into windows with max_length)" if isinstance(record, DnaRecord) else ""
        reject("too_large", where, too_large(limit, size, hint))
        return False

    return fits
