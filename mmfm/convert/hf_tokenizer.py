"""A Hugging Face fast tokenizer that encodes exactly like mmfm's unified vocabulary.

The text part is the sentencepiece BPE model rebuilt as a `tokenizers` BPE model (same
pieces and ids, merges from the piece table, byte fallback, spaces as `▁`, no dummy prefix);
sentencepiece's user symbols (newline, tab) stay unsplit. Every special, delimiter and
codebook code of the vocabulary follows as an added token with its readable name
(`<img>`, `<img_0042>`, `<dna_ACG>`, ...) at its mmfm id. One difference remains by design:
Hugging Face treats the name of an added token written in plain text as that token, where
mmfm keeps text as text.
"""

from __future__ import annotations

from pathlib import Path

from mmfm.tokenization.vocab import Vocab, VocabError


def build_hf_tokenizer(vocab: Vocab):
    """A `transformers.PreTrainedTokenizerFast` for `vocab` (needs its sentencepiece model)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    if vocab.text_model is None:
        raise VocabError(
            "the vocabulary carries no sentencepiece model (it was not built by mmfm tokenizer "
            "train); the Hugging Face tokenizer cannot be written"
        )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(vocab.text_model)
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise VocabError("only BPE text models convert to a Hugging Face tokenizer exactly")
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=pieces,
            merges=generate_merges(pieces),
            unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    control = [p.piece for p in proto.pieces if p.type == p.CONTROL or p.type == p.UNKNOWN]
    user = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    extra = [vocab.piece(i) for i in range(vocab.text_size, vocab.size)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    for token_id, name in ((vocab.text_size, extra[0]), (vocab.size - 1, extra[-1])):
        if tokenizer.token_to_id(name) != token_id:
            raise VocabError(
                f"added token {name!r} got id {tokenizer.token_to_id(name)}, not {token_id}"
            )

    def piece(i: int) -> str:
        return proto.pieces[i].piece

    t = proto.trainer_spec
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=piece(t.bos_id) if t.bos_id >= 0 else None,
        eos_token=piece(t.eos_id) if t.eos_id >= 0 else None,
        unk_token=piece(t.unk_id),
        pad_token=piece(t.pad_id) if t.pad_id >= 0 else None,
        add_bos_token=False,
        add_eos_token=False,
    )


def save_hf_tokenizer(vocab: Vocab, out_dir: str | Path) -> None:
    build_hf_tokenizer(vocab).save_pretrained(str(out_dir))
