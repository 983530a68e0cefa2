"""``ditto-jax convert from-hf|from-gguf|to-hf``: argument parsing only; the work is ``ditto_jax.checkpoints``.

from-hf:   a Hugging Face folder -> a model checkpoint (``model.yaml`` + Orbax ``params/`` + ``tokenizer/``).
from-gguf: a GGUF file -> the same model checkpoint layout (tokenizer built from the file's metadata).
to-hf:     any model source (checkpoint, HF folder, GGUF, training workdir) -> a Hugging Face folder.
"""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert from-hf``, ``convert from-gguf`` and ``convert to-hf``."""
    parser = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face, GGUF and Orbax")
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    p = sub.add_parser("from-hf", help="Hugging Face folder -> model checkpoint (model.yaml + Orbax params/)")
    p.add_argument("src", help="Hugging Face folder (config.json + safetensors)")
    p.add_argument("dst", help="model checkpoint folder to write")
    p.set_defaults(func=_to_checkpoint)
    g = sub.add_parser("from-gguf", help="GGUF file -> model checkpoint (model.yaml + Orbax params/)")
    g.add_argument("src", help="GGUF file (llama, qwen2, qwen3 or mistral; F32/F16/BF16/Q8_0/Q4_x/Q5_x/Qn_K tensors)")
    g.add_argument("dst", help="model checkpoint folder to write")
    g.set_defaults(func=_to_checkpoint)
    q = sub.add_parser("to-hf", help="model checkpoint -> Hugging Face folder (sharded safetensors)")
    q.add_argument("src", help="model checkpoint folder (or a Hugging Face folder, GGUF file, training workdir)")
    q.add_argument("dst", help="Hugging Face folder to write")
    q.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    q.set_defaults(func=_to_hf)
    for x in (p, g, q):
        x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="parameter dtype (default: keep the source's; GGUF: float32)")
        x.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _to_checkpoint(args: argparse.Namespace) -> int:
    from ditto_jax import checkpoints

    kind = {"from-hf": checkpoints.HF_FOLDER, "from-gguf": checkpoints.GGUF_FILE}[args.direction]
    start = time.perf_counter()
    cfg = checkpoints.convert_to_checkpoint(args.src, args.dst, kind=kind, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.dst}: {cfg.architecture}, {cfg.num_params():,} parameters, {cfg.param_dtype} "
          f"({time.perf_counter() - start:.1f}s)")
    return 0


def _to_hf(args: argparse.Namespace) -> int:
    from ditto_jax import checkpoints

    start = time.perf_counter()
    cfg = checkpoints.convert_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                    overwrite=args.overwrite)
    print(f"wrote {args.dst}: {cfg.architecture}, {cfg.num_params():,} parameters, {cfg.param_dtype} "
          f"({time.perf_counter() - start:.1f}s)")
    return 0
