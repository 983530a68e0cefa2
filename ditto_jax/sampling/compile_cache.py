"""The persistent JAX compilation cache (on by default) and a process-wide compile-time meter.

A second identical run loads every executable from the cache instead of compiling it again. The cache lives
in ``$DITTO_JAX_COMPILATION_CACHE`` when set (a folder; ``off``/``0``/``none`` switches it off), else in
``$XDG_CACHE_HOME/ditto-jax/jax-cache`` (``~/.cache/ditto-jax/jax-cache``). Every executable is cached, however
fast it compiled and however small (JAX's defaults skip CPU executables that compile in under a second).

JAX decides once per process, at its first compilation, whether the cache is used: call
``enable_compilation_cache`` before loading a model (the commands do it first thing).

``compile_stats()`` reads the meter (``jax.monitoring`` events): seconds spent tracing, lowering and compiling,
and persistent-cache hits/misses, so a run can report compile time apart from generation time.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import jax

ENV = "DITTO_JAX_COMPILATION_CACHE"
_OFF = {"off", "0", "none", "false", "no", ""}

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_RETRIEVE = "/jax/compilation_cache/cache_retrieval_time_sec"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"

_lock = threading.Lock()
_stats = {"trace_s": 0.0, "lower_s": 0.0, "backend_compile_s": 0.0, "cache_load_s": 0.0,
          "compiles": 0, "cache_hits": 0, "cache_misses": 0}
_listening = False
_enabled_dir: str | None = None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ditto-jax/jax-cache`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ditto-jax" / "jax-cache"


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The cache folder to use: ``path``, else ``$DITTO_JAX_COMPILATION_CACHE``, else the default; None when off."""
    value = os.fspath(path) if path is not None else os.environ.get(ENV)
    if value is None:
        return default_cache_dir()
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``resolve_cache_dir(path)`` (created) and cache every
    executable; returns the folder, or None when switched off. Also starts the compile-time meter."""
    global _enabled_dir
    start_compile_meter()
    folder = resolve_cache_dir(path)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        _enabled_dir = None
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home: run without the cache rather than fail
        print(f"warning: compilation cache {folder} not usable ({exc}); compiling without it")
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _enabled_dir = str(folder)
    return _enabled_dir


def _on_duration(event: str, duration: float, **_: Any) -> None:
    key = {_TRACE: "trace_s", _LOWER: "lower_s", _BACKEND: "backend_compile_s", _RETRIEVE: "cache_load_s"}.get(event)
    if key is not None:
        with _lock:
            _stats[key] += float(duration)
            if key == "backend_compile_s":
                _stats["compiles"] += 1


def _on_event(event: str, **_: Any) -> None:
    key = {_HIT: "cache_hits", _MISS: "cache_misses"}.get(event)
    if key is not None:
        with _lock:
            _stats[key] += 1


def start_compile_meter() -> None:
    """Register the ``jax.monitoring`` listeners (once per process)."""
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


def compile_stats() -> dict[str, Any]:
    """Seconds and counts since the meter started: ``compile_s`` (trace + lower + backend compile, which
    includes loading from the persistent cache), its parts, ``compiles`` (backend compilations, hits included),
    ``cache_hits``/``cache_misses`` and ``cache_dir`` (None: no persistent cache)."""
    with _lock:
        s = dict(_stats)
    s["compile_s"] = s["trace_s"] + s["lower_s"] + s["backend_compile_s"]
    s["cache_dir"] = _enabled_dir
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}
