"""Convert a sentencepiece model into a Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``).

Used when a sentencepiece tokenizer is exported: transformers then loads the ``tokenizer.json`` with no
sentencepiece or protobuf at run time. Unigram and BPE models are supported (the two sentencepiece trains);
the normaliser follows the model's spec (identity, or the precompiled charsmap plus whitespace collapsing),
whitespace is the ``▁`` metaspace, and byte-fallback pieces ``<0xNN>`` are kept.
"""

from __future__ import annotations

from typing import Sequence

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

_UNIGRAM, _BPE = 1, 2


def _model_proto(model_proto: bytes):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    return proto


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges recovered from a BPE vocabulary: every split of a piece into two pieces, ranked by piece id."""
    merges = []
    for piece, piece_id in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def spm_to_tokenizers(model_proto: bytes, special_tokens: Sequence[tuple[int, str]] = ()) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that encodes like the sentencepiece model (ids equal on the model's text).

    ``special_tokens`` are ``(id, text)`` pairs registered as special added tokens (split out of any text
    before the model runs): the model's control/user-defined pieces and any ids appended after its vocab.
    """
    proto = _model_proto(model_proto)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk_id = next((i for i, p in enumerate(proto.pieces) if p.type == 2), None)
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if proto.trainer_spec.model_type == _UNIGRAM:
        model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=byte_fallback)
    elif proto.trainer_spec.model_type == _BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = models.BPE(
            vocab, _bpe_merges(vocab), unk_token=pieces[unk_id][0] if unk_id is not None else None,
            fuse_unk=True, byte_fallback=byte_fallback,
        )
    else:
        raise ValueError(f"sentencepiece model type {proto.trainer_spec.model_type} is not supported (unigram or bpe)")
    tok = Tokenizer(model)

    spec = proto.normalizer_spec
    norm = []
    if spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm:
        tok.normalizer = normalizers.Sequence(norm)
    prepend = "always" if spec.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=prepend, split=bool(proto.trainer_spec.split_by_whitespace)
    )
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)

    for expected_id, text in sorted(special_tokens):  # ids past the vocab are appended in order
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        got = tok.token_to_id(text)
        if got != expected_id:
            raise ValueError(f"special token {text!r}: exported id {got} != tokenizer id {expected_id}")
    return tok
