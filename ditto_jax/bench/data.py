"""``ditto-jax bench data``: input-pipeline throughput (read + validate + tokenize + pack + batch, one process)
beside the SFT step's consumption (default 400 tokens/s, the 40M CPU goal; pass the measured figure).

The corpus is the embedded sample corpus (or ``--input``) repeated ``--repeat`` times with fresh ids, read for
one epoch, so tokenization is not amortised over epochs. ``tokens_per_s`` counts batch positions (B x S,
what a train step consumes); ``real_tokens_per_s`` counts non-pad positions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--input", default=None, help="corpus JSONL (default: the embedded sample corpus)")
    parser.add_argument("--repeat", type=int, default=20, help="copies of the corpus (fresh ids)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the embedded one)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--packing", choices=["first_fit", "best_fit", "none"], default="first_fit")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--consumption", type=float, default=400.0,
                        help="SFT step consumption in tokens/s to compare with (40M config on this CPU)")


def _write_corpus(source: Path, repeat: int, out: Path) -> int:
    lines = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(out, "w", encoding="utf-8") as f:
        for r in range(repeat):
            for rec in lines:
                f.write(json.dumps({**rec, "id": f"{rec['id']}#{r}"}, ensure_ascii=False) + "\n")
    return len(lines) * repeat


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the pipeline over the corpus and drain one epoch; returns throughput and packing figures."""
    import importlib.resources

    from ditto_jax.data.pipeline import DataConfig, DataIterator, build_dataset, prepare_examples
    from ditto_jax.tokenizer import default_tokenizer, load_tokenizer

    source = Path(args.input) if args.input else (
        Path(str(importlib.resources.files("ditto_jax"))) / "data" / "assets" / "sample_corpus.jsonl")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else default_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        sessions = _write_corpus(source, args.repeat, path)
        cfg = DataConfig(paths=[str(path)], seq_len=args.seq_len, global_batch_size=args.batch_size, num_epochs=1,
                         packing=args.packing, workers=args.workers)
        t0 = time.perf_counter()
        examples, summary = prepare_examples(cfg, tokenizer)
        t1 = time.perf_counter()
        dataset = build_dataset(examples, cfg, args.batch_size, tokenizer.pad_id)
        it = DataIterator(dataset)
        for _ in it:
            pass
        t2 = time.perf_counter()
    total = t2 - t0
    tokens_per_s = it.positions / total
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "real_tokens_per_s": round(it.real_tokens / total, 1),
        "sft_consumption_tokens_per_s": args.consumption,
        "ratio_to_consumption": round(tokens_per_s / args.consumption, 1),
        "goal_ratio": 20.0,
        "packing_efficiency": round(it.packing_efficiency, 4),
        "sessions": sessions,
        "batches": it.batches,
        "seconds": {"read_tokenize": round(t1 - t0, 3), "pack_batch": round(t2 - t1, 3), "total": round(total, 3)},
        "read_tokenize_tokens_per_s": round(summary.tokens / (t1 - t0), 1),
        "pack_batch_tokens_per_s": round(it.positions / (t2 - t1), 1),
        "config": {"seq_len": args.seq_len, "batch_size": args.batch_size, "packing": args.packing,
                   "workers": args.workers, "tokenizer_vocab": tokenizer.vocab_size},
        "summary": summary.to_dict(),
    }
