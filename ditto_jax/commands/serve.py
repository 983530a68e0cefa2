"""``ditto-jax serve --model SRC [--port P]``: an OpenAI-compatible server (``/v1/chat/completions`` with streaming,
``/v1/completions``, ``/v1/models``, ``/health``) on the sampling engine; concurrent requests share continuous
batching and the prefix cache.

    ditto-jax serve --model runs/sft-qwen7b/export/hf --port 8000
    # then any OpenAI client: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
"""

from __future__ import annotations

import argparse
import sys


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``/``--config`` and engine sizing, shared by ``serve`` and ``chat``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF folder | FILE.gguf | model checkpoint | training workdir/step | named model")
    src.add_argument("--config", help="random-init model preset (e.g. model/tiny), for tests and demos")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's own)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--batch-size", type=int, default=8, help="slots decoded together (concurrent requests)")
    p.add_argument("--max-len", type=int, default=2048, help="prompt + completion tokens per request")
    p.add_argument("--chunk", type=int, default=8, help="decode steps between streamed deltas")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default max_tokens")
    p.add_argument("--init-seed", type=int, default=0, help="random-init seed (with --config)")


def load_engine(args: argparse.Namespace) -> tuple[object, object, str, int]:
    """``(engine, tokenizer, model name, max length)`` for ``--model``/``--config``."""
    from ditto_jax.checkpoints import ModelSource, load_model_source
    from ditto_jax.config import ConfigError
    from ditto_jax.sampling import SamplingEngine

    source = ModelSource(path=args.model, config=args.config, seed=args.init_seed, tokenizer=args.tokenizer,
                         dtype=args.dtype)
    model, cfg, tokenizer = load_model_source(source, None)
    if tokenizer is None:
        raise ConfigError(f"{source.describe()}: no tokenizer files; chat needs one (--tokenizer PATH)")
    max_len = min(args.max_len, cfg.max_position_embeddings)
    engine = SamplingEngine(model, tokenizer, args.batch_size, max_len, chunk=args.chunk)
    name = (args.model or args.config).rstrip("/").split("/")[-1]
    return engine, tokenizer, name, max_len


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve``."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server on the sampling engine",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the served model's name (default: the model folder's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, start the engine loop, serve until interrupted."""
    import uvicorn

    from ditto_jax.serve.app import create_app
    from ditto_jax.serve.loop import EngineLoop

    engine, tokenizer, name, max_len = load_engine(args)
    loop = EngineLoop(engine)
    loop.start()
    app = create_app(loop, tokenizer, args.name or name, max_len, args.max_new_tokens)
    print(f"serving {args.name or name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        loop.stop()
    return 0
