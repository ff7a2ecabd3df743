"""The unified vocabulary: layout, id <-> (kind, code) bijection, JSON round trip."""

import pytest

from mmfm.core.types import Modality
from mmfm.tokenization.vocab import DELIMITERS, RESERVED_CODEBOOKS, Vocab, VocabError


def vocab(dna=("dna", 5, "ACGTN")):
    return Vocab.build(300, ["<class_0>", "<class_1>"], [*RESERVED_CODEBOOKS, dna])


def test_layout_text_then_specials_then_codebooks():
    v = vocab()
    assert v.lookup(0) == ("text", 0) and v.lookup(299) == ("text", 299)
    assert v.lookup(300) == ("special", 0) and v.specials[0] == "<img>"
    image = v.codebook("image")
    assert image.offset == 300 + len(v.specials) and image.size == 8192
    assert v.codebook("mask").offset == image.offset + 8192
    assert v.codebook("video").offset == v.codebook("mask").offset + 1024
    assert v.size == v.codebook("dna").offset + 5


def test_reserved_ranges_do_not_move_with_the_dna_scheme():
    char, kmer = vocab(), vocab(("dna", 19530))
    for name in ("image", "mask", "video"):
        assert char.codebook(name).offset == kmer.codebook(name).offset


def test_every_id_maps_to_one_kind_and_code_and_back():
    v = vocab()
    seen = set()
    for token_id in range(v.size):
        kind, code = v.lookup(token_id)
        if kind == "text":
            back = code
        elif kind == "special":
            back = v.special(v.specials[code])
        else:
            back = v.code_id(kind, code)
        assert back == token_id
        seen.add((kind, code))
    assert len(seen) == v.size
    pieces = [v.piece(i) for i in range(300, v.size)]
    assert len(set(pieces)) == len(pieces)
    assert v.piece(v.code_id("image", 42)) == "<img_0042>"
    assert v.piece(v.code_id("dna", 2)) == "<dna_G>"


def test_every_modality_span_has_delimiters():
    v = vocab()
    for modality in (Modality.IMAGE, Modality.MASK, Modality.DNA, Modality.SVG, Modality.VIDEO):
        start, end = v.delimiters(modality)
        assert (v.piece(start), v.piece(end)) == DELIMITERS[modality]


def test_json_round_trip(tmp_path):
    v = vocab()
    v.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == v


def test_errors_name_the_problem(tmp_path):
    v = vocab()
    with pytest.raises(VocabError, match="outside the vocabulary"):
        v.lookup(v.size)
    with pytest.raises(VocabError, match="code 8192 outside codebook image"):
        v.code_id("image", 8192)
    with pytest.raises(VocabError, match="duplicate special"):
        Vocab.build(10, ["<sep>"])
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(VocabError, match="not an mmfm vocabulary"):
        Vocab.load(tmp_path / "bad.json")
