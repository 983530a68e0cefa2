#!/usr/bin/env python
"""Train the embedded sentencepiece tokenizer from the text bundled in ``ditto_jax/data/assets/``.

Every string value of every ``*.jsonl`` asset (character profiles, the sample corpus, the tiny eval set) is a
training sentence (one per line). The model is a unigram sentencepiece with byte fallback (any text, English
or Chinese, encodes), identity normalisation (newlines and repeated spaces survive, so ChatML round-trips),
no dummy prefix, and fixed special ids::

    0 <pad>   1 <unk>   2 <|endoftext|> (eos)   3 <|im_start|>   4 <|im_end|>   5..260 <0x00>..<0xFF>

    python scripts/make_tokenizer.py [--vocab-size 2048] [--max-chars 600] [--out ditto_jax/data/assets/tokenizer.model]

Training is single-threaded, so the same text gives the same model.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "ditto_jax" / "data" / "assets"


def _strings(value: object):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def collect_sentences(patterns: list[str]) -> list[str]:
    """Every string in the matched JSONL files (and plain lines of other files), split into lines."""
    sentences: list[str] = []
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)):
            for raw in Path(name).read_text(encoding="utf-8").splitlines():
                if not raw.strip():
                    continue
                if name.endswith(".jsonl"):
                    values = list(_strings(json.loads(raw)))
                else:
                    values = [raw]
                for value in values:
                    sentences += [line for line in value.splitlines() if line.strip()]
    return sentences


def keep_common_chars(sentences: list[str], max_chars: int) -> tuple[list[str], float]:
    """Sentences with characters outside the ``max_chars`` most frequent removed, and the fraction of
    characters kept. Removed characters never become pieces, so they encode as byte-fallback tokens; this
    keeps a small vocabulary for mixed English/Chinese text (sentencepiece needs coverage >= 0.98)."""
    counts = collections.Counter(c for s in sentences for c in s)
    keep = {c for c, _ in counts.most_common(max_chars)}
    total = sum(counts.values())
    kept_fraction = sum(counts[c] for c in keep) / max(total, 1)
    filtered = ["".join(c for c in s if c in keep) for s in sentences]
    return [s for s in filtered if s.strip()], kept_fraction


def _without_temp_paths(model: bytes) -> bytes:
    """The trainer spec records the temporary input/output paths; blank them so the file is reproducible."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.append("ditto_jax/data/assets/*.jsonl")
    proto.trainer_spec.model_prefix = "tokenizer"
    return proto.SerializeToString(deterministic=True)


def main(argv: list[str] | None = None) -> int:
    """Train and write the model; prints a short summary."""
    import sentencepiece as spm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--max-chars", type=int, default=600, help="characters kept as pieces")
    parser.add_argument("--input", action="append", default=None, help="glob(s) of training text")
    parser.add_argument("--out", default=str(ASSETS / "tokenizer.model"))
    args = parser.parse_args(argv)

    patterns = args.input or [str(ASSETS / "*.jsonl")]
    sentences = collect_sentences(patterns)
    if len(sentences) < 50:
        print(f"too little text ({len(sentences)} lines) in {patterns}", file=sys.stderr)
        return 1
    train_sentences, coverage = keep_common_chars(sentences, args.max_chars)
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "text.txt"
        text_file.write_text("\n".join(train_sentences) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text_file),
            model_prefix=str(Path(tmp) / "m"),
            model_type="unigram",
            vocab_size=args.vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            max_sentence_length=1 << 16,
            pad_id=0, pad_piece="<pad>",
            unk_id=1, unk_piece="<unk>",
            bos_id=-1,
            eos_id=2, eos_piece="<|endoftext|>",
            user_defined_symbols=["<|im_start|>", "<|im_end|>"],
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
        model = _without_temp_paths((Path(tmp) / "m.model").read_bytes())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    n_tokens = sum(len(x) for x in sp.encode(sentences))
    n_chars = sum(len(s) for s in sentences)
    print(json.dumps({"out": str(out), "vocab_size": sp.get_piece_size(), "sentences": len(sentences),
                      "character_coverage": round(coverage, 4), "chars_per_token": round(n_chars / n_tokens, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
