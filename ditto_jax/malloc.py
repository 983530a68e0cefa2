"""The C library's allocator settings the ``ditto-jax`` program runs with (glibc only).

XLA's CPU client allocates every execution's temporaries anew: one block, up to gigabytes, a call. glibc serves a
block that large by ``mmap`` and returns it by ``munmap``, so every page of it faults afresh on the next call
(~2.3 us a 4 KiB page on the 2-core EPYC VM these benchmarks ran on). The program therefore restarts itself once
at start-up with ``MALLOC_TUNABLES``, which keep freed memory for the next allocation; ``DITTO_JAX_MALLOC=system``
(or a ``GLIBC_TUNABLES`` of the user's own) keeps the environment as it is. A baseline that should run as its
user would run it (``bench simulate``'s transformers side) gets ``user_environment``.
"""

from __future__ import annotations

import os
import platform
import sys

#: One heap for every thread, no ``mmap`` for large blocks, no trimming. Kept, the real workload (``bench
#: simulate``, SmolLM2-135M, 2-core AMD EPYC) ran 21.3-24.4 s instead of 24.3-26.6 s (prefill 2.5-2.7 s instead
#: of 4.2-4.9), the same outputs; the price: the process keeps its peak memory until it exits (the demo's peak
#: resident memory 12.1 GB instead of 9.7).
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
MALLOC_ENV = "DITTO_JAX_MALLOC"
#: Set in the environment the program re-executes itself with: the settings came from it, not from the user.
MALLOC_MARK = "DITTO_JAX_MALLOC_SET"


def malloc_environment(environ: dict[str, str] | os._Environ, libc: str) -> dict[str, str] | None:
    """The environment to re-execute the program with so glibc starts with ``MALLOC_TUNABLES``; None to go on
    as is: not glibc, ``DITTO_JAX_MALLOC=system``, or ``GLIBC_TUNABLES`` already set (by the user: theirs is
    kept; by an earlier start: done)."""
    choice = environ.get(MALLOC_ENV, "keep").strip().lower()
    if choice not in ("keep", "system"):
        raise SystemExit(f"error: {MALLOC_ENV}={environ[MALLOC_ENV]!r}: expected 'keep' (the default) or 'system'")
    if libc != "glibc" or choice == "system" or "GLIBC_TUNABLES" in environ:
        return None
    return {**environ, "GLIBC_TUNABLES": MALLOC_TUNABLES, MALLOC_MARK: "1"}


def user_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """``environ`` without the settings this program added for itself (the environment its user started it
    with): for a baseline that should run as its user would run it."""
    env = dict(environ)
    if env.pop(MALLOC_MARK, None) is not None:
        env.pop("GLIBC_TUNABLES", None)
    return env


def restart_with_malloc_settings() -> None:
    """Re-execute this process (same interpreter, same command line) with ``malloc_environment``, if needed.
    glibc reads its tunables once, at start-up, so they cannot be changed in a running process."""
    env = malloc_environment(os.environ, platform.libc_ver()[0] if sys.platform == "linux" else "")
    if env is None:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
