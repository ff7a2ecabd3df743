"""A Hugging Face fast tokenizer that encodes exactly like mmfm's unified vocabulary.

The text part is the sentencepiece BPE model rebuilt as a `tokenizers` BPE model (same
pieces and ids, merges from the piece table, byte fallback, spaces as `▁`, no dummy prefix);
sentencepiece's user symbols (newline, tab) stay unsplit. Every special, delimiter and
codebook code of the vocabulary follows as an added token with its readable name
(`<img>`, `<img_0042>`, `<dna_ACG>`, ...) at its mmfm id. One difference remains by design:
Hugging Face treats the name of an added token written in plain text as that token, where
mmfm keeps text as text.

A pretrained LLM's tokenizer.json as the text part (`text.pretrained`) is written back as it
came, with the same added tokens after it, so `transformers` encodes text as the LLM did and
every modality token at its mmfm id.
"""

from __future__ import annotations

from pathlib import Path

from mmfm.tokenization.vocab import Vocab, VocabError


def build_hf_tokenizer(vocab: Vocab):
    """A `transformers.PreTrainedTokenizerFast` for `vocab` (needs its text model)."""
    if vocab.text_model is None:
        raise VocabError(
            "the vocabulary carries no text model (it was not built by mmfm tokenizer train: "
            "give --extend-vocab a recipe with text.pretrained); the Hugging Face tokenizer "
            "cannot be written"
        )
    if vocab.text_kind == "hf":
        return _pretrained_hf_tokenizer(vocab)
    return _sentencepiece_hf_tokenizer(vocab)


def _add_vocab_tokens(tokenizer, vocab: Vocab) -> None:
    """Every special, delimiter and codebook code after the text ids, checked in place."""
    from tokenizers import AddedToken

    extra = [vocab.piece(i) for i in range(vocab.text_size, vocab.size)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    for token_id, name in ((vocab.text_size, extra[0]), (vocab.size - 1, extra[-1])):
        if tokenizer.token_to_id(name) != token_id:
            raise VocabError(
                f"added token {name!r} got id {tokenizer.token_to_id(name)}, not {token_id}"
            )


def _pretrained_hf_tokenizer(vocab: Vocab):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(vocab.text_model.decode("utf-8"))
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab.text_size:
        raise VocabError(
            f"the vocabulary's tokenizer.json has {tokenizer.get_vocab_size(True)} ids, its "
            f"layout {vocab.text_size}: the file was edited; run mmfm tokenizer train again"
        )
    _add_vocab_tokens(tokenizer, vocab)
    bos, eos = tokenizer.id_to_token(vocab.text_bos), tokenizer.id_to_token(vocab.text_eos)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)


def _sentencepiece_hf_tokenizer(vocab: Vocab):
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

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
    spaces = normalizers.Replace(" ", "▁")
    decoder = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:  # an LLM's .model (mmfm trains without one)
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces])
        decoder.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = spaces
    tokenizer.decoder = decoders.Sequence(decoder)
    control = [p.piece for p in proto.pieces if p.type == p.CONTROL or p.type == p.UNKNOWN]
    user = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    _add_vocab_tokens(tokenizer, vocab)

    def piece(i: int) -> str:
        return proto.pieces[i].piece

    t = proto.trainer_spec
    bos = t.bos_id if vocab.text_bos is None else vocab.text_bos
    eos = t.eos_id if vocab.text_eos is None else vocab.text_eos
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=piece(bos) if bos >= 0 else None,
        eos_token=piece(eos) if eos >= 0 else None,
        unk_token=piece(t.unk_id),
        pad_token=piece(t.pad_id) if t.pad_id >= 0 else None,
        add_bos_token=False,
        add_eos_token=False,
    )


def save_hf_tokenizer(vocab: Vocab, out_dir: str | Path, model_max_length: int) -> None:
    """The tokenizer files in `out_dir`; `model_max_length` (the model's max_seq_len) goes
    into tokenizer_config.json, where `transformers` reads how long an input may be (without
    it, 10^30: no truncation, no warning before the model's positions run out)."""
    tokenizer = build_hf_tokenizer(vocab)
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(str(out_dir))
