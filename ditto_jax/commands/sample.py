"""``ditto-jax sample --model DIR --prompts FILE.jsonl --out DIR``: sharded, resumable batched sampling."""

from __future__ import annotations

import argparse
import json
import sys

from ditto_jax.commands import add_process_arguments, output_dir


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The decoding flags shared by ``sample`` and ``bench sample``."""
    g = p.add_argument_group("decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (the paper: 0.8; default 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="the paper: 1.1 (default 1.0 = off)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="extra stop token id (repeatable); EOS and end-of-turn always stop unless --ignore-eos")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    g.add_argument("--seed", type=int, default=0, help="folded with each prompt id: outputs independent of batching")


def sampling_params_from_args(args: argparse.Namespace):
    """``SamplingParams`` from the decoding flags."""
    from ditto_jax.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                          stop_strings=list(args.stop), stop_token_ids=list(args.stop_token_id),
                          ignore_eos=args.ignore_eos, seed=args.seed)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sample``."""
    p = subparsers.add_parser(
        "sample", help="sharded, resumable batched sampling over a prompts file",
        description="Complete every prompt of a JSONL file ({\"id\", \"prompt\" | \"messages\" | \"input_ids\"} a "
                    "line) into OUT/part-*.jsonl ({\"id\", \"output_ids\", \"text\", \"finish_reason\"} a line) with "
                    "a manifest. Kill it at any moment and run it again: it resumes, and the output holds every "
                    "prompt exactly once. With several processes each takes its share of the prompts.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face folder or model checkpoint folder")
    src.add_argument("--config", help="random-init model preset (e.g. model/tiny), for tests and demos")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model folder's, else the embedded one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="cast the weights")
    p.add_argument("--prompts", required=True, help="input JSONL")
    p.add_argument("--out", type=output_dir,
                   required=True, help="output folder (shards + manifest); re-running resumes")
    add_sampling_arguments(p)
    e = p.add_argument_group("engine")
    e.add_argument("--batch-size", type=int, default=16, help="slots decoded together")
    e.add_argument("--max-len", type=int, default=None,
                   help="cache tokens per slot (default: longest prompt + max new tokens, within the model's limit)")
    e.add_argument("--chunk", type=int, default=16, help="decode steps per device call")
    e.add_argument("--tensor", type=int, default=1, help="tensor-parallel size over this process's devices")
    e.add_argument("--shard-size", type=int, default=512, help="results per output shard")
    e.add_argument("--logprobs", action="store_true", help="also write per-token log-probabilities")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--prefix-cache-rows", type=int, default=None,
                   help="prefix-cache rows of --max-len tokens for prompt prefixes shared by several prompts "
                        "(default: min(--batch-size, 8); 0 = off)")
    e.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS",
                   help="prefill a longer prompt remainder in chunks of this many tokens, decoding the other "
                        "slots in between (0 = whole prompts)")
    e.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent compilation cache folder (default $DITTO_JAX_COMPILATION_CACHE, else "
                        "$XDG_CACHE_HOME/ditto-jax/jax-cache; 'off' = none)")
    add_process_arguments(p)
    p.set_defaults(func=run)


class _PromptFileError(Exception):
    """A bad prompt file (printed as one line, exit status 2)."""


def run(args: argparse.Namespace) -> int:
    """Load the model, read the prompts, run (or resume) the sampling run, print a JSON summary."""
    from ditto_jax import distributed

    try:
        params = sampling_params_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import time

    start = time.perf_counter()
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    from ditto_jax.checkpoints import CheckpointError, ModelSource, source_tokenizer
    from ditto_jax.mesh import MeshConfig
    from ditto_jax.sampling import EngineConfig, Request, load_engine
    from ditto_jax.sampling.inputs import read_prompt_file

    source = ModelSource(path=args.model, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype)
    cfg = EngineConfig(batch_size=args.batch_size, chunk=args.chunk, max_top_k=max(64, args.top_k),
                       prefix_cache_rows=args.prefix_cache_rows, prefill_chunk=args.prefill_chunk or None, mesh=MeshConfig(data=-1, tensor=args.tensor),
                       compile_cache=args.compile_cache, shard_size=args.shard_size, flush_seconds=60.0)
    prompts: list[tuple[str, list[int]]] = []

    def fit(model_cfg, tokenizer) -> int:
        """Read the prompts with the loaded tokenizer; the cache length fits the longest."""
        no_tokenizer = None
        if tokenizer is None:  # a checkpoint without tokenizer files: token-id prompts only, outputs without text
            try:
                source_tokenizer(source, required=True)
            except CheckpointError as exc:
                no_tokenizer = str(exc)
        try:
            prompts.extend(read_prompt_file(args.prompts, tokenizer, no_tokenizer))
        except (OSError, ValueError) as exc:
            raise _PromptFileError(str(exc)) from exc
        longest = max((len(ids) for _, ids in prompts), default=1)
        max_len = args.max_len or min(longest + args.max_new_tokens,
                                      max(model_cfg.max_position_embeddings, longest + 1))
        if longest > max_len:
            raise _PromptFileError(f"a prompt has {longest} tokens but --max-len is {max_len}")
        return max_len

    try:
        loaded = load_engine(source, cfg, max_len=fit)
    except _PromptFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    count, index = jax.process_count(), jax.process_index()
    share = len(range(index, len(prompts), count))
    summary = loaded.run((Request(rid, ids, params) for rid, ids in prompts), args.out, partition=True,
                         with_logprobs=args.logprobs, progress=not args.no_progress, total=share,
                         desc=f"sample p{index}" if count > 1 else "sample")
    report = {"out": args.out, "model": source.describe(), "max_len": loaded.config.max_len, **summary.to_json(),
              **loaded.stats(), "total_s": round(time.perf_counter() - start, 3)}
    print(json.dumps(report))
    return 0
