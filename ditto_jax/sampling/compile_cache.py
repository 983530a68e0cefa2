"""The persistent JAX compilation cache (on by default) and a process-wide compile-time meter.

A second identical run loads every executable from the cache instead of compiling it again. The cache lives
in ``$DITTO_JAX_COMPILATION_CACHE`` when set (a folder; ``off``/``0``/``none`` switches it off), else in
``$XDG_CACHE_HOME/ditto-jax/jax-cache`` (``~/.cache/ditto-jax/jax-cache``). Every executable is cached, however
fast it compiled and however small (JAX's defaults skip CPU executables that compile in under a second).

JAX decides once per process, at its first compilation, whether the cache is used: call
``enable_compilation_cache`` before loading a model (the commands do it first thing).

``compile_stats()`` reads the meter (``jax.monitoring`` events): seconds spent tracing, lowering and compiling,
and persistent-cache hits/misses, so a run can report compile time apart from generation time.

``SavedJit`` goes one step further for the sampler's step functions: their compiled executables are kept in the
same folder (``executables/``) under a key of everything their tracing depends on (the package's sources, the
versions and flags of JAX and XLA, the device, the function's static configuration and its arguments' shapes,
dtypes and shardings), so a later process loads them ready to run without tracing or lowering either (JAX's own
cache is keyed by the lowered program, so each hit still pays both: ~1.8 s of a SmolLM2 run's 2.1 s).
``preload_saved`` starts loading the most recently used of them on a background thread before the model loads.

The folder is bounded: ``$DITTO_JAX_COMPILATION_CACHE_MAX_SIZE`` (bytes, or with a suffix: ``500M``, ``4G``,
``4GiB``; ``-1``/``unlimited`` for no bound; default 4 GiB) is checked once a process, when the cache is first
enabled (by the first loaded engine), and the least recently used entries of both stores are deleted until it fits
(an entry's time is its last use: a saved executable's file time, touched on each use; a JAX entry's access time,
which the kernel moves on its first read after a write and then at most daily under Linux's default ``relatime``,
or the ``-atime`` record older versions had JAX stamp; on a ``noatime`` file system, its creation). What was
deleted is printed (count and bytes).

JAX is not given the bound itself: with one, JAX lists and reads every entry of the folder under a file lock on
each executable it writes (``lru_cache.LRUCache._evict_if_needed``), a cost that grows with the folder: beside
3,000 entries, 88 small executables took 12.9 s with the bound and 1.3 s without it, and the test suite, which
compiles thousands, spent most of its time there.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import pickle
import platform
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax.experimental import serialize_executable

import ditto_jax
from ditto_jax import kernels
from ditto_jax.config import ConfigError
from ditto_jax.fileio import atomic_write_bytes
from ditto_jax.kernels import cpu as cpu_kernels
from ditto_jax.malloc import MALLOC_ENV, MALLOC_MARK
from ditto_jax.model import transformer

ENV = "DITTO_JAX_COMPILATION_CACHE"
MAX_SIZE_ENV = "DITTO_JAX_COMPILATION_CACHE_MAX_SIZE"
DEFAULT_MAX_SIZE = 4 << 30
_OFF = {"off", "0", "none", "false", "no", ""}
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_RETRIEVE = "/jax/compilation_cache/cache_retrieval_time_sec"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"

_lock = threading.Lock()
_stats = {"trace_s": 0.0, "lower_s": 0.0, "backend_compile_s": 0.0, "cache_load_s": 0.0,
          "compiles": 0, "cache_hits": 0, "cache_misses": 0, "saved_load_s": 0.0, "saved_hits": 0,
          "saved_preloaded": 0, "saved_preload_s": 0.0}
_listening = False
_enabled_dir: str | None = None
_pruned: set[tuple[str, int]] = set()  # (folder, bound) pairs this process has pruned
_log = logging.getLogger(__name__)


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


def resolve_max_size(value: str | None = None) -> int:
    """The cache's bound in bytes from ``value`` (else ``$DITTO_JAX_COMPILATION_CACHE_MAX_SIZE``, else 4 GiB):
    a number of bytes, or one with a suffix (``K``/``M``/``G``/``T`` powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB``
    of 1024, ``B`` optional); ``-1`` or ``unlimited`` for none (returned as -1)."""
    text = os.environ.get(MAX_SIZE_ENV) if value is None else value
    if text is None or not text.strip():
        return DEFAULT_MAX_SIZE
    norm = text.strip().lower()
    if norm in {"-1", "unlimited", "none", "inf"}:
        return -1
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?", norm)
    if match is None:
        raise ConfigError(f"{MAX_SIZE_ENV}={text!r}: expected bytes, e.g. 4G, 500MiB, 1000000, or -1 for no bound")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _record(path: Path) -> Path | None:
    """JAX's ``-atime`` record beside its cache entry ``KEY-cache`` (None for a saved executable)."""
    return path.with_name(path.name.removesuffix("-cache") + "-atime") if path.name.endswith("-cache") else None


def _last_use(path: Path, stat: os.stat_result, records: set[str]) -> float:
    """When an entry was last used. A saved executable: its mtime (``SavedJit`` touches it on each use). A JAX
    entry: the latest of its mtime, its access time (JAX reads it on each hit) and the ``-atime`` record older
    versions had JAX stamp on each hit (``records``: the names of those present)."""
    record = _record(path)
    if record is None:
        return stat.st_mtime
    last = max(stat.st_atime, stat.st_mtime)
    if record.name in records:
        try:
            stamp = record.read_bytes()
        except OSError:
            stamp = b""
        if len(stamp) == 8:  # nanoseconds, little-endian, as JAX wrote it
            last = max(last, int.from_bytes(stamp, "little") / 1e9)
    return last


def prune_cache(folder: str | os.PathLike, max_bytes: int) -> tuple[int, int]:
    """Delete the least recently used entries of the cache at ``folder`` (JAX's ``*-cache`` files with their
    ``-atime`` records, and ``executables/*.pkl``) until the entries take at most ``max_bytes``; returns (entries
    deleted, bytes freed). Nothing with ``max_bytes < 0``. Entries another process deletes meanwhile are skipped;
    one deleted while another process wants it is a cache miss there (compiled again)."""
    if max_bytes < 0:
        return 0, 0
    root = Path(folder)
    records = {p.name for p in root.glob("*-atime")}
    entries = []
    for path in [*root.glob("*-cache"), *root.glob("executables/*.pkl")]:
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((_last_use(path, stat, records), stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = freed = 0
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("compilation cache entry %s not deleted (%s)", path, exc)
            continue
        else:
            removed, freed = removed + 1, freed + size
        if (record := _record(path)) is not None:
            record.unlink(missing_ok=True)
        total -= size
    return removed, freed


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``resolve_cache_dir(path)`` (created), cache every
    executable, and keep the folder within ``resolve_max_size()`` (once a process; least recently used entries
    deleted first, reported); returns the folder, or None when switched off. Also starts the compile-time meter."""
    global _enabled_dir
    start_compile_meter()
    folder = resolve_cache_dir(path)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        _enabled_dir = None
        _enable_saved(None)
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home: run without the cache rather than fail
        print(f"warning: compilation cache {folder} not usable ({exc}); compiling without it")
        return None
    max_bytes = resolve_max_size()
    removed, freed = (0, 0) if (str(folder), max_bytes) in _pruned else prune_cache(folder, max_bytes)
    _pruned.add((str(folder), max_bytes))  # once a process: later engines' own entries are this run's
    if removed:
        print(f"compilation cache {folder}: deleted {removed} least recently used entries ({freed / 2**20:.0f} MiB) "
              f"to stay within {max_bytes / 2**30:.2f} GiB (${MAX_SIZE_ENV})", file=sys.stderr)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # No bound for JAX (its default): with one, each write lists and reads the whole folder (see the module's
    # docstring). The folder is kept within the bound above, once a process.
    jax.config.update("jax_compilation_cache_max_size", -1)
    _enabled_dir = str(folder)
    _enable_saved(_enabled_dir)
    return _enabled_dir


def _on_duration(event: str, duration: float, **_: Any) -> None:
    key = {_TRACE: "trace_s", _LOWER: "lower_s", _BACKEND: "backend_compile_s", _RETRIEVE: "cache_load_s"}.get(event)
    if key is not None:
        with _lock:
            _stats[key] += float(duration)
            if key == "backend_compile_s":
                _stats["compiles"] += 1


_tls = threading.local()  # this thread's persistent-cache hits since SavedJit last reset them


def _on_event(event: str, **_: Any) -> None:
    key = {_HIT: "cache_hits", _MISS: "cache_misses"}.get(event)
    if key is not None:
        if key == "cache_hits":  # JAX records it in the thread that compiles
            _tls.hits = getattr(_tls, "hits", 0) + 1
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
    includes loading from the persistent cache, + loading ``SavedJit`` executables), its parts, ``compiles``
    (backend compilations, hits included), ``cache_hits``/``cache_misses``, ``saved_hits``/``saved_load_s``
    (executables ``SavedJit`` loaded ready to run, and the seconds its calls waited for them; ``saved_preloaded``
    of them loaded ahead by ``preload_saved``, taking ``saved_preload_s`` on its thread, mostly overlapping other
    work) and ``cache_dir`` (None: no persistent cache)."""
    with _lock:
        s = dict(_stats)
    s["compile_s"] = s["trace_s"] + s["lower_s"] + s["backend_compile_s"] + s["saved_load_s"]
    s["cache_dir"] = _enabled_dir
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}


# ---- executables kept ready to run ---------------------------------------------------------------------------
_SOURCE_SUFFIXES = (".py", ".cc", ".h")


def _sources_digest() -> bytes:
    """A digest of every source file of the package (and its kernels): any edit makes a new key."""
    folders = {Path(ditto_jax.__file__).resolve().parent, Path(kernels.__file__).resolve().parent}
    digest = hashlib.sha256()
    for folder in sorted(folders):
        for path in sorted(p for p in folder.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.digest()


_fingerprint: bytes | None = None


def _process_fingerprint() -> bytes:
    """What every executable of this process depends on besides its own function and arguments."""
    global _fingerprint
    if _fingerprint is None:
        device = jax.local_devices()[0]
        parts = [_sources_digest(), jax.__version__, jaxlib.__version__, os.environ.get("XLA_FLAGS", ""),
                 device.platform, device.device_kind, str(jax.local_device_count()), str(jax.process_count()),
                 getattr(device.client, "platform_version", ""), platform.machine(), cpu_kernels.cpu_signature(),
                 # kernels.cpu.matmul's custom call needs OpenBLAS at run time: its absence must miss the cache
                 repr(device.platform != "cpu" or cpu_kernels.matmul_available()),
                 # whether decoding runs the kernels (DITTO_CPU_DECODE_KERNELS can change it on one CPU)
                 repr(device.platform != "cpu" or cpu_kernels.decode_reason() is None),
                 repr(jax.config.jax_enable_x64), repr(jax.config.jax_default_matmul_precision)]
        _fingerprint = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return _fingerprint


def _switches() -> str:
    """Settings read while tracing that may change within a process: the package's, JAX's and XLA's environment
    variables (except those that change no program: the cache's folder, switch and bound, the kernels' thread
    count, the allocator settings) and the model's projection fusion switch."""
    skip = {ENV, MAX_SIZE_ENV, "DITTO_JAX_SAVED_EXECUTABLES", "DITTO_CPU_KERNEL_THREADS", MALLOC_ENV, MALLOC_MARK}
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("DITTO_", "JAX_", "XLA_")) and k not in skip)
    return repr((env, transformer.FUSE_PROJECTIONS))


def _leaf_key(x: Any) -> Any:
    """Per call, so cheap: an array's ``aval`` (shape, dtype, weak type; ~0.2 ms for a decode call's 500 leaves,
    against ~1.8 ms reading the three attributes one by one) and sharding."""
    if isinstance(x, jax.Array):
        return (x.aval, x.sharding)
    if isinstance(x, np.ndarray):
        return ("n", x.shape, str(x.dtype))
    return ("s", type(x).__name__)


def _device_orders(args: tuple) -> list[tuple[int, ...]]:
    """The device order of every mesh the arguments are sharded over (a mesh's repr leaves it out; equal
    shardings in one process compare it, so only the on-disk key needs it)."""
    meshes = {getattr(x.sharding, "mesh", None) for x in jax.tree.leaves(args) if isinstance(x, jax.Array)}
    return sorted(tuple(d.id for d in m.devices.flat) for m in meshes if m is not None and hasattr(m, "devices"))


_INERT_OPTION = "xla_debug_buffer_assignment_show_max"


class SavedJit:
    """A ``jax.jit`` function whose executables are kept on disk (see the module's docstring) while
    ``saved_dir()`` is set; otherwise just the jitted function. ``static``: everything the function closes over
    that shapes its program (its configs, the model's structure), as text: part of the key."""

    def __init__(self, jitted: Callable[..., Any], name: str, static: str):
        self.jitted, self.name, self.static = jitted, name, static
        self._ready: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **static_kwargs: Any) -> Any:
        folder = saved_dir()
        if folder is None:
            return self.jitted(*args, **static_kwargs)
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple(map(_leaf_key, leaves)), tuple(sorted(static_kwargs.items())))
        run = self._ready.get(key)
        if run is None:
            with self._lock:
                run = self._ready.get(key) or self._load_or_compile(folder, key, args, static_kwargs)
                self._ready[key] = run
        return run(*args)

    def _cache_size(self) -> int:
        return len(self._ready) if saved_dir() is not None else self.jitted._cache_size()

    def _load_or_compile(self, folder: Path, key: Any, args: tuple, static_kwargs: dict) -> Any:
        digest = hashlib.sha256()
        for part in (_switches(), self.static, repr(key), repr(_device_orders(args))):
            digest.update(hashlib.sha256(part.encode()).digest())
        path = folder / f"{self.name}-{_process_fingerprint().hex()[:12]}-{digest.hexdigest()[:20]}.pkl"
        with _lock:
            preloaded = _preloaded.pop(path.name, None)
        if preloaded is not None or path.exists():
            start = time.perf_counter()
            try:
                run, seconds = preloaded.result() if preloaded is not None else _timed_load(path)
            except Exception as exc:  # noqa: BLE001 - a stale or broken entry: compile again, overwrite it
                _log.warning("compiled executable %s not usable (%s: %s); compiling again", path, type(exc).__name__,
                             exc)
            else:
                with _lock:  # the time this call waited; a preloaded entry's own loading overlapped other work
                    _stats["saved_load_s"] += time.perf_counter() - start
                    _stats["saved_hits"] += 1
                    if preloaded is not None:
                        _stats["saved_preloaded"] += 1
                        _stats["saved_preload_s"] += seconds
                try:
                    os.utime(path)  # used now: among the first preloaded next time
                except OSError:
                    pass
                return run
        # An executable JAX's own cache served was deserialised, and serialising it again loses its compiled
        # code (XLA:CPU then fails at run time: "Function ... not found"). So the program is compiled under an
        # inert debug option (how many buffers a buffer-assignment dump lists) set to a random value: JAX's cache
        # has never seen that program, even when this very entry was compiled before (by another process, or
        # before its file was lost). Should it be served all the same, the executable runs unsaved.
        _tls.hits = 0
        option = {_INERT_OPTION: 1000 + secrets.randbelow(1 << 30)}
        compiled = self.jitted.lower(*args, **static_kwargs).compile(compiler_options=option)
        if _tls.hits:
            _log.warning("compiled executable %s not saved (JAX's cache served it)", self.name)
            return compiled
        try:
            # the devices it runs on, in the order it was compiled for (by default it would load onto them all)
            device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
            atomic_write_bytes(path, pickle.dumps((*serialize_executable.serialize(compiled), device_ids)))
        except Exception as exc:  # noqa: BLE001 - not every executable serialises; it still runs
            _log.warning("compiled executable %s not saved (%s: %s)", self.name, type(exc).__name__, exc)
        return compiled


PRELOAD = 16  # saved executables loaded ahead by ``preload_saved``, the most recently used first
_preloaded: dict[str, concurrent.futures.Future] = {}
_preloading = False


def preload_saved() -> None:
    """Start loading the executables this process's ``SavedJit`` functions saved last (the ``PRELOAD`` most
    recently used whose key shares this process's sources, versions, flags and devices) on a background thread.
    Loading one takes 15-180 ms (SmolLM2: 0.5 s for a run's six), mostly outside the GIL: begun before a model
    is loaded, it overlaps the loader's single-threaded work. A ``SavedJit`` call takes its executable from here
    when there (or, if it failed to load, loads or compiles as usual); one not called is never used. Once per
    process; nothing without ``saved_dir()``. Initialises JAX's backend (call after ``jax.distributed``'s set-up)."""
    global _preloading
    folder = saved_dir()
    with _lock:
        if folder is None or _preloading:
            return
        _preloading = True
    cpu_kernels.available()  # registered first: executables calling the CPU kernels do not load without them
    try:
        entries = sorted(folder.glob(f"*-{_process_fingerprint().hex()[:12]}-*.pkl"),
                         key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="saved-executables")
    with _lock:
        for path in entries[:PRELOAD]:
            _preloaded[path.name] = pool.submit(_timed_load, path)
    pool.shutdown(wait=False)


def _timed_load(path: Path) -> tuple[Any, float]:
    """The executable saved at ``path``, ready to run, and the seconds loading it took."""
    start = time.perf_counter()
    payload, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
    by_id = {d.id: d for d in jax.local_devices()}
    run = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                    execution_devices=[by_id[i] for i in device_ids])
    return run, time.perf_counter() - start


_saved_dir: Path | None = None


def saved_dir() -> Path | None:
    """Where ``SavedJit`` keeps executables: ``executables/`` of the enabled compilation cache; None when the
    cache is off or not enabled (or ``$DITTO_JAX_SAVED_EXECUTABLES`` is ``0``)."""
    return _saved_dir


def _enable_saved(folder: str | None) -> None:
    global _saved_dir
    if folder is None or os.environ.get("DITTO_JAX_SAVED_EXECUTABLES", "1").strip().lower() in _OFF:
        _saved_dir = None
        return
    path = Path(folder) / "executables"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        _saved_dir = None
        return
    _saved_dir = path
