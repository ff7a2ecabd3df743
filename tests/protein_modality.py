"""The worked example of docs/adding_a_modality.md: protein sequences as a registered modality.

Twenty amino-acid letters are the codebook (`<protein_A>` ... `<protein_Y>`), a sequence is
framed `<protein> ... </protein>`, a prepare source of kind `protein` reads FASTA files and
`mmfm generate --modality protein` writes FASTA. Everything is plain Python at module level,
so that a spawned prepare or loader worker imports the same functions when it unpickles the
spec. A user's package calls `register_modality(PROTEIN)` at import (or names PROTEIN as an
entry point of the group mmfm.modalities); the tests register it only while they run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmfm.core.modalities import ModalitySpec

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_CODE = {letter: i for i, letter in enumerate(AMINO_ACIDS)}


def encode(sequence: str) -> list[int]:
    """One code per residue; anything but the 20 standard letters is refused."""
    try:
        return [_CODE[letter] for letter in sequence.upper()]
    except KeyError as e:
        raise ValueError(f"not an amino-acid letter: {e.args[0]!r}") from None


def decode(codes: list[int]) -> str:
    return "".join(AMINO_ACIDS[c] for c in codes)


def read_fasta(path: Path) -> Iterator[tuple[str, str, str | None]]:
    """(id, sequence, description) of every record of a FASTA file."""
    header, lines = None, []
    for line in [*path.read_text().splitlines(), ">"]:
        if line.startswith(">"):
            if header is not None:
                key, _, description = header.partition(" ")
                yield key, "".join(lines), description or None
            header, lines = line[1:].strip(), []
        elif line.strip():
            lines.append(line.strip())


def write_fasta(sequence: str, stem: Path) -> Path:
    path = stem.with_suffix(".fasta")
    path.write_text(f">{stem.name} {len(sequence)} aa\n{sequence}\n")
    return path


PROTEIN = ModalitySpec(
    name="protein",
    delimiters=("<protein>", "</protein>"),
    codebook=tuple(AMINO_ACIDS),
    encode=encode,
    decode=decode,
    read=read_fasta,
    write=write_fasta,
)
