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


def engine_from_args(args: argparse.Namespace) -> tuple[object, str]:
    """``(LoadedEngine, model name)`` for ``--model``/``--config`` (``ditto_jax.sampling.load_engine``: one
    device; the cache length is ``--max-len`` within the model's position limit)."""
    from ditto_jax.checkpoints import ModelSource
    from ditto_jax.sampling import EngineConfig, load_engine

    source = ModelSource(path=args.model, config=args.config, seed=args.init_seed, tokenizer=args.tokenizer,
                         dtype=args.dtype)
    loaded = load_engine(source, EngineConfig(batch_size=args.batch_size, chunk=args.chunk, mesh=None),
                         require_tokenizer=True,
                         max_len=lambda model_cfg, _: min(args.max_len, model_cfg.max_position_embeddings))
    name = (args.model or args.config).rstrip("/").split("/")[-1]
    return loaded, name


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

    loaded, name = engine_from_args(args)
    loop = EngineLoop(loaded.engine)
    loop.start()
    app = create_app(loop, loaded.tokenizer, args.name or name, loaded.config.max_len, args.max_new_tokens)
    print(f"serving {args.name or name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        loop.stop()
    return 0
