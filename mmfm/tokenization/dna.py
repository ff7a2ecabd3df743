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
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from mmfm.tokenization.recipe import DnaRecipe

ALPHABET = "ACGTN"
AMBIGUOUS = "RYSWKMBDHV"
_ALPHABET_SET, _AMBIGUOUS_SET = set(ALPHABET), set(AMBIGUOUS)
_COMPLEMENT = str.maketrans("ACGTNacgtn", "TGCANtgcan")
_RUNS = re.compile(r"[a-z]+|[A-Z]+")


class DnaError(ValueError):
    """A sequence the DNA tokenizer cannot accept; the message names the record and place."""


@dataclass(frozen=True)
class DnaRecord:
    key: str
    sequence: str
    output: str | None = None
    """A task's output text (Omni-DNA framing), or None for plain DNA."""
    source: str = ""


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


def _open(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def read_dna(path: str | os.PathLike) -> Iterator[DnaRecord]:
    """Records of a FASTA, FASTQ or GenBank file (gzipped or not), with Biopython."""
    from Bio import SeqIO

    path = Path(path)
    fmt = dna_format(path)
    if fmt is None:
        raise DnaError(f"{path}: not a FASTA, FASTQ or GenBank file name")
    with _open(path) as handle:
        for record in SeqIO.parse(handle, fmt):
            yield DnaRecord(record.id, str(record.seq), source=str(path))


def read_function_pairs(path: str | os.PathLike) -> Iterator[DnaRecord]:
    """GenBank CDS features with a /product: (coding sequence -> function text) task pairs."""
    from Bio import SeqIO

    path = Path(path)
    with _open(path) as handle:
        for record in SeqIO.parse(handle, "genbank"):
            for i, feature in enumerate(record.features):
                product = feature.qualifiers.get("product", [None])[0]
                if feature.type == "CDS" and product:
                    seq = str(feature.extract(record.seq))
                    yield DnaRecord(f"{record.id}/cds{i}", seq, product, str(path))
