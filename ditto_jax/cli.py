"""Command-line entry point: parse, load config, call one function.

Each sub-command lives in ``ditto_jax/commands/<name>.py`` and exposes ``add_parser(subparsers)``, which
registers its arguments and sets ``func`` (called with the parsed namespace, returns an exit code).
Modules are imported lazily so ``ditto-jax --help`` stays fast and one broken command cannot break others.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys

from ditto_jax.malloc import restart_with_malloc_settings

COMMANDS: dict[str, str] = {
    "demo": "the whole Ditto pipeline end to end on the embedded default",
    "convert": "convert checkpoints between Hugging Face, GGUF and Orbax",
    "models": "fetch a named real model (e.g. smollm2-135m-instruct) into the local cache",
    "sample": "sharded, resumable batched sampling over a prompts file",
    "serve": "OpenAI-compatible HTTP server (chat completions, streaming) on the sampling engine",
    "chat": "role-play with a knowledge-base character in the terminal",
    "simulate": "Ditto self-simulation: queries -> responses -> sessions -> corpus",
    "train": "supervised fine-tuning on a role-play corpus",
    "eval": "WikiRoleEval-style judged evaluation and MT-Bench roleplay",
    "grid": "cross-supervision grid: seed x supervision models, plus no role-play data",
    "characters": "validate and describe character knowledge bases",
    "corpus": "build and describe role-play corpora",
    "bench": "benchmarks (model, kernels, sample, train, data)",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the sub-command named in ``argv`` is imported."""
    parser = argparse.ArgumentParser(prog="ditto-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        if wanted == name:
            module = importlib.import_module(f"ditto_jax.commands.{name}")
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # only known kinds of bad input become one line; the rest re-raise
        if not isinstance(exc, _user_errors()):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a missing or malformed model, tokenizer, config or file), not a bug."""
    from ditto_jax.checkpoints import CheckpointError
    from ditto_jax.config import ConfigError
    from ditto_jax.hf import HFCheckpointError
    from ditto_jax.tokenizer import TokenizerError

    return (CheckpointError, HFCheckpointError, TokenizerError, ConfigError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def run() -> None:
    """The ``ditto-jax`` program: ``main()``, then an exit that skips the interpreter's teardown.

    First, where the C library is glibc, the program restarts itself once with ``malloc.MALLOC_TUNABLES`` (see
    there; ``DITTO_JAX_MALLOC=system`` or a ``GLIBC_TUNABLES`` of the user's own keeps the environment as is).

    Once a command has returned, its outputs are written (renamed into place, closed) and nothing is left to do
    but free memory: tearing down jax, XLA and the loaded modules object by object took 0.6-0.7 s of a 27 s
    ``ditto-jax sample`` run (2-core CPU). The exit still joins non-daemon threads and runs every ``atexit``
    handler (jax's, ``multiprocessing``'s, logging's: registered after this one, they run before it), flushes
    the standard streams, then leaves with the command's exit code. ``DITTO_JAX_FULL_EXIT=1`` keeps the full
    teardown (for tools that act at interpreter shutdown, e.g. coverage started before this process)."""
    restart_with_malloc_settings()
    code = [1]  # the exit code, known once main() returns or raises
    if os.environ.get("DITTO_JAX_FULL_EXIT", "0") != "1":
        atexit.register(_exit_now, code)  # first registered, so it runs last among atexit handlers
    try:
        code[0] = main()
    except SystemExit as exc:  # argparse and the commands' own exits: their code (a message is printed first)
        code[0] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except KeyboardInterrupt:
        code[0] = 130
        raise
    except BaseException:  # the traceback is printed before the atexit handlers run
        code[0] = 1
        raise
    sys.exit(code[0])


def _exit_now(code: list[int]) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code[0])


if __name__ == "__main__":
    run()
