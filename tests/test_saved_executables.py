"""``SavedJit``: the sampler's step functions keep their compiled executables on disk under a key of everything
their tracing depends on; a later process runs them without tracing, lowering or compiling, with the same
outputs; other shapes or configurations get their own entries; a broken entry is compiled again; the switch and
the cache's own off switch turn it off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditto_jax.sampling import compile_cache
from ditto_jax.sampling.compile_cache import SavedJit, compile_stats


def _scaled(x, y):
    return jnp.tanh(x @ y) * 3.0


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "_saved_dir", tmp_path)
    return tmp_path


def test_executables_are_saved_and_loaded_per_shape_and_configuration(saved):
    x, y = jnp.ones((4, 8)), jnp.full((8, 3), 0.5)
    first = SavedJit(jax.jit(_scaled), "scaled", "config-a")
    want = np.asarray(first(x, y))
    assert len(list(saved.glob("scaled-*.pkl"))) == 1 and first._cache_size() == 1
    hits = compile_stats()["saved_hits"]
    again = SavedJit(jax.jit(_scaled), "scaled", "config-a")  # a new process would build it like this
    assert np.array_equal(np.asarray(again(x, y)), want)
    assert compile_stats()["saved_hits"] == hits + 1
    SavedJit(jax.jit(_scaled), "scaled", "config-b")(x, y)  # another configuration: its own entry
    again(jnp.ones((2, 8)), y)  # another shape: its own entry
    assert len(list(saved.glob("scaled-*.pkl"))) == 3


def test_settings_that_change_no_program_share_the_entry(saved, monkeypatch):
    """The allocator settings (set by the program's restart) and the cache's bound do not key the entries: a run
    with other values loads what an earlier run saved."""
    x, y = jnp.ones((4, 8)), jnp.full((8, 3), 0.5)
    SavedJit(jax.jit(_scaled), "scaled", "c")(x, y)
    for name, value in (("DITTO_JAX_MALLOC", "system"), ("DITTO_JAX_MALLOC_SET", "1"),
                        ("DITTO_JAX_COMPILATION_CACHE_MAX_SIZE", "8G")):
        monkeypatch.setenv(name, value)
        SavedJit(jax.jit(_scaled), "scaled", "c")(x, y)
    assert len(list(saved.glob("scaled-*.pkl"))) == 1
    assert not list(saved.glob("*.tmp"))


def test_a_broken_entry_is_compiled_again(saved, caplog):
    x, y = jnp.ones((4, 8)), jnp.full((8, 3), 0.5)
    want = np.asarray(SavedJit(jax.jit(_scaled), "scaled", "c")(x, y))
    (entry,) = saved.glob("scaled-*.pkl")
    entry.write_bytes(b"not a pickle")
    assert np.array_equal(np.asarray(SavedJit(jax.jit(_scaled), "scaled", "c")(x, y)), want)
    assert "not usable" in caplog.text and entry.read_bytes() != b"not a pickle"  # written again


def test_preloaded_entries_are_used_and_a_broken_one_is_compiled_again(saved, monkeypatch, caplog):
    x, y = jnp.ones((4, 8)), jnp.full((8, 3), 0.5)
    want = np.asarray(SavedJit(jax.jit(_scaled), "scaled", "p")(x, y))
    SavedJit(jax.jit(_scaled), "scaled", "q")(x, y)
    good, bad = sorted(saved.glob("scaled-*.pkl"), key=lambda p: p.stat().st_mtime)
    bad.write_bytes(b"not a pickle")
    for state, value in (("_preloading", False), ("_preloaded", {})):
        monkeypatch.setattr(compile_cache, state, value)
    compile_cache.preload_saved()
    assert set(compile_cache._preloaded) == {good.name, bad.name}
    before = compile_stats()
    assert np.array_equal(np.asarray(SavedJit(jax.jit(_scaled), "scaled", "p")(x, y)), want)
    assert compile_stats()["saved_preloaded"] == before["saved_preloaded"] + 1
    SavedJit(jax.jit(_scaled), "scaled", "q")(x, y)  # its preload failed: compiled again and saved again
    assert "not usable" in caplog.text and bad.read_bytes() != b"not a pickle"
    assert compile_stats()["saved_preloaded"] == before["saved_preloaded"] + 1 and not compile_cache._preloaded


def test_without_a_folder_it_is_the_jitted_function(monkeypatch):
    monkeypatch.setattr(compile_cache, "_saved_dir", None)
    jitted = jax.jit(_scaled)
    f = SavedJit(jitted, "scaled", "c")
    f(jnp.ones((4, 8)), jnp.ones((8, 3)))
    assert f._cache_size() == jitted._cache_size() == 1


def _sample(tmp_path, name: str, **env: str) -> tuple[dict, list]:
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about item {i}."}) + "\n"
                                   for i in range(6)))
    out = tmp_path / name
    cmd = [sys.executable, "-m", "ditto_jax.cli", "sample", "--config", "model/tiny", "--prompts", str(prompts),
           "--out", str(out), "--max-new-tokens", "12", "--batch-size", "4", "--chunk", "4", "--top-p", "0.8",
           "--no-progress"]
    full_env = dict(os.environ, XLA_FLAGS="", DITTO_JAX_COMPILATION_CACHE=str(tmp_path / "jax-cache"), **env)
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = sorted((r["id"], r["output_ids"]) for p in sorted(out.glob("part-*.jsonl"))
                     for r in map(json.loads, p.read_text().splitlines()))
    return json.loads(done.stdout.strip().splitlines()[-1])["compile"], outputs


def test_a_second_process_runs_the_saved_executables_with_the_same_outputs(tmp_path):
    cold, want = _sample(tmp_path, "first")
    folder = tmp_path / "jax-cache" / "executables"
    names = sorted(p.name.split("-")[0] for p in folder.glob("*.pkl"))
    assert cold["saved_hits"] == 0 and {"decode", "prefill"} <= set(names)
    warm, got = _sample(tmp_path, "second")
    assert got == want
    assert warm["saved_hits"] == len(names) and warm["cache_misses"] == 0
    assert warm["saved_preloaded"] == len(names)  # loaded ahead, while the model loaded
    assert warm["compile_s"] < cold["compile_s"]
    off, got = _sample(tmp_path, "third", DITTO_JAX_SAVED_EXECUTABLES="0")
    assert got == want and off["saved_hits"] == 0
    # the entries lost while JAX's cache still holds what they were compiled from: compiled again (JAX's copy,
    # once deserialised, would not serialise whole) and saved again
    for p in folder.glob("*.pkl"):
        p.unlink()
    again, got = _sample(tmp_path, "fourth")
    assert got == want and again["saved_hits"] == 0
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.pkl")) == names
    last, got = _sample(tmp_path, "fifth")
    assert got == want and last["saved_hits"] == len(names)


def test_settings_read_while_tracing_are_part_of_the_key(saved, monkeypatch):
    from ditto_jax.model import transformer

    x, y = jnp.ones((4, 8)), jnp.full((8, 3), 0.5)
    SavedJit(jax.jit(_scaled), "scaled", "c")(x, y)
    monkeypatch.setenv("DITTO_SOME_SWITCH", "1")
    SavedJit(jax.jit(_scaled), "scaled", "c")(x, y)
    monkeypatch.setattr(transformer, "FUSE_PROJECTIONS", False)
    SavedJit(jax.jit(_scaled), "scaled", "c")(x, y)
    assert len(list(saved.glob("scaled-*.pkl"))) == 3


_LOST_ENTRY_SCRIPT = """
import jax, jax.numpy as jnp
from ditto_jax.sampling.compile_cache import SavedJit, enable_compilation_cache, saved_dir
enable_compilation_cache()
f = SavedJit(jax.jit(lambda x: jnp.tanh(x) * 3.0), "lost", "c")
print(float(f(jnp.ones((4,))).sum()))
print(len(list(saved_dir().glob("lost-*.pkl"))))
"""


def test_an_entry_lost_again_and_again_is_saved_again_each_time(tmp_path):
    # JAX's own cache keeps every program SavedJit compiled; however often an entry is lost, the next
    # compilation must be one JAX's cache cannot serve, or it could not be saved
    env = dict(os.environ, XLA_FLAGS="", DITTO_JAX_COMPILATION_CACHE=str(tmp_path / "jax-cache"))
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _LOST_ENTRY_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        total, entries = done.stdout.split()
        assert abs(float(total) - 12 * np.tanh(1.0)) < 1e-5 and entries == "1", done.stderr[-2000:]
        for p in (tmp_path / "jax-cache" / "executables").glob("lost-*.pkl"):
            p.unlink()


def test_cache_size_is_parsed_with_units_and_bad_values_name_the_variable(monkeypatch):
    assert compile_cache.resolve_max_size("4G") == 4 * 1000**3
    assert compile_cache.resolve_max_size("4GiB") == 4 << 30
    assert compile_cache.resolve_max_size(" 500 MiB ") == 500 << 20
    assert compile_cache.resolve_max_size("123") == 123
    assert compile_cache.resolve_max_size("-1") == compile_cache.resolve_max_size("unlimited") == -1
    monkeypatch.delenv(compile_cache.MAX_SIZE_ENV, raising=False)
    assert compile_cache.resolve_max_size() == compile_cache.DEFAULT_MAX_SIZE
    monkeypatch.setenv(compile_cache.MAX_SIZE_ENV, "2M")
    assert compile_cache.resolve_max_size() == 2_000_000
    with pytest.raises(ValueError, match="DITTO_JAX_COMPILATION_CACHE_MAX_SIZE='four gigs'"):
        compile_cache.resolve_max_size("four gigs")


def _entry(path, size, when):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (when, when))
    return path


def test_the_cache_is_pruned_least_recently_used_first_across_both_stores(tmp_path):
    t = 1_700_000_000
    old_jax = _entry(tmp_path / "jit_a-1-cache", 300, t)  # created first, used later (its -atime record)
    (tmp_path / "jit_a-1-atime").write_bytes(int((t + 50) * 1e9).to_bytes(8, "little"))
    mid_jax = _entry(tmp_path / "jit_b-2-cache", 300, t + 45)
    (tmp_path / "jit_b-2-atime").write_bytes(b"")  # an unreadable record: its creation time counts
    read_jax = _entry(tmp_path / "jit_c-3-cache", 300, t + 5)
    os.utime(read_jax, (t + 60, t + 5))  # no record, read (a hit) last of all: its access time counts
    old_saved = _entry(tmp_path / "executables" / "decode-x.pkl", 300, t + 10)
    os.utime(old_saved, (t + 100, t + 10))  # read (preloaded) but not used since: its mtime counts
    new_saved = _entry(tmp_path / "executables" / "prefill-y.pkl", 300, t + 40)
    other = _entry(tmp_path / "executables" / "notes.txt", 5000, t)  # not an entry: never counted or deleted
    assert compile_cache.prune_cache(tmp_path, -1) == (0, 0)
    assert compile_cache.prune_cache(tmp_path, 1500) == (0, 0)
    assert compile_cache.prune_cache(tmp_path, 900) == (2, 600)  # the two least recently used
    assert not old_saved.exists() and not new_saved.exists()
    assert old_jax.exists() and mid_jax.exists() and read_jax.exists() and other.exists()
    assert compile_cache.prune_cache(tmp_path, 600) == (1, 300)
    assert not mid_jax.exists() and not (tmp_path / "jit_b-2-atime").exists() and old_jax.exists()
    assert compile_cache.prune_cache(tmp_path, 300) == (1, 300)
    assert not old_jax.exists() and not (tmp_path / "jit_a-1-atime").exists() and read_jax.exists()
    assert compile_cache.prune_cache(tmp_path, 0) == (1, 300)
    assert not read_jax.exists() and other.exists()


def test_enabling_the_cache_prunes_it_and_says_so(tmp_path):
    """In a fresh process (JAX decides on its cache once per process): an over-full folder is cut to the bound,
    the most recently used entries kept, and the deletion reported."""
    for i in range(4):
        _entry(tmp_path / "executables" / f"step-{i}.pkl", 1000, 1_700_000_000 + i)
    code = "from ditto_jax.sampling.compile_cache import enable_compilation_cache as e; print(e())"
    env = dict(os.environ, DITTO_JAX_COMPILATION_CACHE=str(tmp_path), DITTO_JAX_COMPILATION_CACHE_MAX_SIZE="2500")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "executables").glob("*.pkl")) == ["step-2.pkl", "step-3.pkl"]
    assert "deleted 2 least recently used entries" in run.stderr and run.stdout.strip() == str(tmp_path)


def _reads_move_access_times(folder):
    """Whether the file system moves a file's access time when it is read after a write (not ``noatime``)."""
    probe = folder / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, (1_700_000_000, 1_700_000_100))
    probe.read_bytes()
    moved = probe.stat().st_atime > 1_700_000_000
    probe.unlink()
    return moved


def test_a_jax_entry_is_aged_by_its_last_use_across_processes(tmp_path):
    """JAX reads an entry on each hit, which moves its access time: an entry written first but used again later
    outlives one written after it when the cache is pruned; JAX writes no ``-atime`` records (it is not given the
    bound, so it never lists the folder)."""
    if not _reads_move_access_times(tmp_path):
        pytest.skip("this file system does not record access times (noatime): entries age by creation there")
    code = ("import sys, numpy as np, jax\n"
            "from ditto_jax.sampling.compile_cache import enable_compilation_cache\n"
            "enable_compilation_cache()\n"
            "def first(x): return x * 2.0 + 1.0\n"
            "def second(x): return x - 3.0\n"
            "x = np.ones(3, np.float32)\n"
            "for name in sys.argv[1:]: jax.block_until_ready(jax.jit(globals()[name])(x))\n")
    env = dict(os.environ, DITTO_JAX_COMPILATION_CACHE=str(tmp_path), DITTO_JAX_COMPILATION_CACHE_MAX_SIZE="1G")

    def run(*names):
        done = subprocess.run([sys.executable, "-c", code, *names], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    def entry(name):
        (path,) = tmp_path.glob(f"jit_{name}-*-cache")
        return path

    run("first", "second")  # `first` written before `second`
    first, second = entry("first"), entry("second")
    assert not list(tmp_path.glob("*-atime"))
    written = first.stat()
    os.utime(first, ns=(written.st_mtime_ns - 10**9, written.st_mtime_ns))  # as if last read before the write
    run("first")  # a hit: read, not written again
    assert first.stat().st_mtime_ns == written.st_mtime_ns
    assert first.stat().st_atime_ns > second.stat().st_mtime_ns
    total, size = sum(p.stat().st_size for p in tmp_path.glob("*-cache")), second.stat().st_size
    assert compile_cache.prune_cache(tmp_path, total - 1) == (1, size)
    assert first.exists() and not second.exists()
