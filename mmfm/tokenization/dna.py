"""DNA (Omni-DNA style): char, non-overlapping k-mer, or BPE tokens in the `dna` codebook.

Policies, stated once: the alphabet is A C G T N. Case is folded to upper (or, with
`keep_softmask`, lower-case runs are kept and framed by `<dna_soft>` ... `</dna_soft>`).
IUPAC ambiguity codes (R Y S W K M B D H V) are read as N (`iupac: n`), removed
(`drop`) or make the record fail (`error`); any other character always fails. Reverse
complement augmentation swaps A/T and C/G (N stays N) with probability `rc_prob`.

Schemes: `char` has 5 codes; `kmer` has the 5^k k-mers then every shorter k-mer, used for
the remainder of a run (so every sequence round-trips exactly); `bpe` is a sentencepiece
BPE model trained on DNA. A task document is `<dna> sequence </dna> <sep> output </s>`,
where the output is text (or any other framed span).

Files are read with Biopython; a file that is not FASTA/FASTQ/GenBank, a record cut short,
bytes that are not UTF-8 or a file Biopython cannot read on go to a `reject` callback
(`mmfm prepare` counts them) and are skipped, keeping every record read before them.
"""

from __future__ import annotations

import codecs
import gzip
import io
import itertools
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from mmfm.core.errors import TokenizerError
from mmfm.core.types import DnaRecord
from mmfm.tokenization.recipe import DnaRecipe

ALPHABET = "ACGTN"
AMBIGUOUS = "RYSWKMBDHV"
_ALPHABET_SET, _AMBIGUOUS_SET = set(ALPHABET), set(AMBIGUOUS)
_COMPLEMENT = str.maketrans("ACGTNacgtn", "TGCANtgcan")
_RUNS = re.compile(r"[a-z]+|[A-Z]+")


class DnaError(TokenizerError):
    """A sequence the DNA tokenizer cannot accept; the message names the record and place."""


def reverse_complement(seq: str) -> str:
    return seq.translate(_COMPLEMENT)[::-1]


class DnaTokenizer:
    def __init__(self, recipe: DnaRecipe, bpe_model: bytes | None = None):
        self.recipe = recipe
        if recipe.scheme == "bpe":
            if bpe_model is None:
                raise DnaError("the bpe scheme needs a trained dna.model (mmfm tokenizer train)")
            self.bpe_proto = bpe_model
            self.sp = spm.SentencePieceProcessor(model_proto=bpe_model)
            self.pieces = tuple(self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size()))
        else:
            k = 1 if recipe.scheme == "char" else recipe.k
            lengths = [k, *range(1, k)] if k > 1 else [1]
            self.pieces = tuple(
                "".join(p) for n in lengths for p in itertools.product(ALPHABET, repeat=n)
            )
            self._code = {p: i for i, p in enumerate(self.pieces)}
            self.k = k

    @property
    def size(self) -> int:
        return len(self.pieces)

    # -- sequence -> codes ----------------------------------------------------------------------

    def clean(self, seq: str, key: str = "?") -> str:
        """Apply the case and IUPAC policies; raise DnaError for anything else."""
        seq = "".join(seq.split())
        if not self.recipe.keep_softmask:
            seq = seq.upper()
        if set(seq.upper()) <= _ALPHABET_SET:
            return seq
        out = []
        for i, c in enumerate(seq):
            upper = c.upper()
            if upper in _ALPHABET_SET:
                out.append(c)
            elif upper not in _AMBIGUOUS_SET:
                raise DnaError(f"record {key}: invalid character {c!r} at position {i}")
            elif self.recipe.iupac == "error":
                raise DnaError(
                    f"record {key}: ambiguity code {c!r} at position {i} "
                    "(dna.iupac=error; use n or drop to accept it)"
                )
            elif self.recipe.iupac == "n":
                out.append("N" if c.isupper() else "n")
        return "".join(out)

    def codes(self, run: str) -> list[int]:
        """Local codes of an upper-case run over ACGTN."""
        if self.recipe.scheme == "bpe":
            return self.sp.encode(run)
        k = self.k
        return [self._code[run[i : i + k]] for i in range(0, len(run), k)]

    def text(self, codes: Iterable[int]) -> str:
        if self.recipe.scheme == "bpe":
            return self.sp.decode(list(codes))
        return "".join(self.pieces[c] for c in codes)

    # -- vocabulary ids -------------------------------------------------------------------------

    def encode(self, seq: str, vocab, key: str = "?", rng: np.random.Generator | None = None):
        """Vocabulary ids of a sequence (not framed), after the policies and augmentation."""
        seq = self.clean(seq, key)
        if rng is not None and self.recipe.rc_prob and rng.random() < self.recipe.rc_prob:
            seq = reverse_complement(seq)
        offset = vocab.codebook("dna").offset
        ids: list[int] = []
        soft = (vocab.special("<dna_soft>"), vocab.special("</dna_soft>"))
        for run in _RUNS.findall(seq):
            codes = [offset + c for c in self.codes(run.upper())]
            ids += [soft[0], *codes, soft[1]] if run.islower() else codes
        return ids

    def decode(self, ids: Iterable[int], vocab) -> str:
        book = vocab.codebook("dna")
        soft = (vocab.special("<dna_soft>"), vocab.special("</dna_soft>"))
        out, run, lower = [], [], False
        for i in ids:
            if i in soft:
                out.append(self.text(run).lower() if lower else self.text(run))
                run, lower = [], i == soft[0]
            elif book.offset <= i < book.offset + book.size:
                run.append(i - book.offset)
            else:
                raise DnaError(f"token {i} is not a DNA token")
        out.append(self.text(run).lower() if lower else self.text(run))
        return "".join(out)

    @staticmethod
    def train_bpe(sequences: Iterable[str], vocab_size: int) -> bytes:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=(s[i : i + 4096] for s in sequences for i in range(0, len(s), 4096)),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            split_by_whitespace=False,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            unk_id=0,
            hard_vocab_limit=False,
            max_sentence_length=16384,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        return model.getvalue()


# -- files ------------------------------------------------------------------------------------

_FORMATS = {
    ".fa": "fasta",
    ".fasta": "fasta",
    ".fna": "fasta",
    ".ffn": "fasta",
    ".fq": "fastq",
    ".fastq": "fastq",
    ".gb": "genbank",
    ".gbk": "genbank",
    ".genbank": "genbank",
}


def dna_format(path: str | os.PathLike) -> str | None:
    """fasta, fastq or genbank from the file name (a .gz suffix is looked through)."""
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _FORMATS.get(suffixes[-1].lower()) if suffixes else None


# Bytes that are not UTF-8 are read as ASCII SUB (the substitute character, never part of
# a sequence file), found per record below, rather than failing the whole file at whichever
# buffer holds them (Biopython keeps sequences as ASCII bytes: surrogates cannot pass).
_SUB = "\x1a"
codecs.register_error("mmfm-substitute", lambda e: (_SUB * (e.end - e.start), e.end))


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", errors="mmfm-substitute")
    return open(path, errors="mmfm-substitute")


Reject = Callable[[str, str, str], None]
"""`reject(reason, where, detail)`: told of a damaged record or file, which is then skipped."""


def _raise(reason: str, where: str, detail: str) -> None:
    raise DnaError(f"{where}: {detail} ({reason})")


# Biopython warns, and keeps the partial sequence, when a GenBank record ends early.
_TRUNCATED = re.compile(r"Premature end of file|Expected sequence length")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _lazy_parse(seqio, handle, fmt: str) -> Iterator:
    """`SeqIO.parse`, started at the first next(): Biopython reads a FASTA file's head in the
    call itself, and text before the first `>` must be rejected like any other damage."""
    yield from seqio.parse(handle, fmt)


def _parse(path: Path, fmt: str, reject: Reject) -> Iterator:
    """Biopython's whole records of `path`. A record cut short (GenBank without its full
    ORIGIN) is rejected as truncated; a file Biopython cannot read on (text before the first
    `>`, a features table cut off, a truncated gzip) is rejected as unreadable after the
    records already read."""
    from Bio import BiopythonParserWarning, SeqIO

    with _open(path) as handle:
        records, n = _lazy_parse(SeqIO, handle, fmt), 0  # parse errors at next()
        while True:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", BiopythonParserWarning)
                try:
                    record = next(records, None)
                except Exception as e:  # Biopython's ValueError, gzip's EOFError, ...
                    reject("unreadable", str(path), f"after {n} records: {_first_line(e)}")
                    return
            cut = [str(w.message) for w in caught if _TRUNCATED.search(str(w.message))]
            for w in caught:
                if not _TRUNCATED.search(str(w.message)):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            if record is None:
                return
            n += 1
            if cut:
                reject("truncated", f"{path}:{record.id}", "; ".join(cut))
            else:
                yield record


def _valid_utf8(where: str, texts: Iterable[str], reject: Reject) -> bool:
    for text in texts:
        if (at := text.find(_SUB)) >= 0:
            reject("invalid_utf8", where, f"bytes that are not UTF-8 at {at} of {text[:40]!r}")
            return False
    return True


def read_dna(path: str | os.PathLike, reject: Reject = _raise) -> Iterator[DnaRecord]:
    """Records of a FASTA, FASTQ or GenBank file (gzipped or not), with Biopython.

    A file that is none of these, or a damaged record or file (see `_parse`; bytes that are
    not UTF-8), goes to `reject` and is skipped; by default it raises DnaError.
    """
    path = Path(path)
    fmt = dna_format(path)
    if fmt is None:
        reject("not_dna", str(path), "not a FASTA, FASTQ or GenBank file name")
        return
    for record in _parse(path, fmt, reject):
        seq = str(record.seq)
        if _valid_utf8(f"{path}:{record.id}", (record.id, seq), reject):
            yield DnaRecord(record.id, seq, source=str(path))


def read_function_pairs(path: str | os.PathLike, reject: Reject = _raise) -> Iterator[DnaRecord]:
    """GenBank CDS features with a /product: (coding sequence -> function text) task pairs;
    damage is handled as in `read_dna`."""
    path = Path(path)
    if dna_format(path) != "genbank":
        reject("not_dna", str(path), "function pairs are read from GenBank files (.gb .gbk)")
        return
    for record in _parse(path, "genbank", reject):
        for i, feature in enumerate(record.features):
            product = feature.qualifiers.get("product", [None])[0]
            if feature.type == "CDS" and product:
                key = f"{record.id}/cds{i}"
                try:
                    seq = str(feature.extract(record.seq))
                except ValueError as e:  # e.g. a location in another record
                    reject("bad_feature", f"{path}:{key}", _first_line(e))
                    continue
                if _valid_utf8(f"{path}:{key}", (key, seq, product), reject):
                    yield DnaRecord(key, seq, product, str(path))
