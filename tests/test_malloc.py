"""``ditto_jax.malloc``: the program restarts itself once with glibc settings that keep freed memory (a large
block then comes from the heap, not ``mmap``), unless switched off or the user set their own; a baseline gets
the user's environment back."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from ditto_jax.malloc import MALLOC_ENV, MALLOC_MARK, MALLOC_TUNABLES, malloc_environment, user_environment


def test_the_settings_are_added_once_and_only_where_they_apply():
    env = malloc_environment({"PATH": "/bin"}, "glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": MALLOC_TUNABLES, MALLOC_MARK: "1"}
    assert malloc_environment(env, "glibc") is None  # the restarted process goes on
    assert malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc") is None  # the user's own
    assert malloc_environment({MALLOC_ENV: "system"}, "glibc") is None
    assert malloc_environment({MALLOC_ENV: " Keep "}, "glibc") is not None
    assert malloc_environment({}, "") is None  # musl, macOS: nothing to set
    with pytest.raises(SystemExit, match="DITTO_JAX_MALLOC='fast'"):
        malloc_environment({MALLOC_ENV: "fast"}, "glibc")


def test_a_baseline_gets_the_users_environment_back():
    ours = malloc_environment({"PATH": "/bin"}, "glibc")
    assert user_environment(ours) == {"PATH": "/bin"}
    users = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert user_environment(users) == users  # set by the user, not by us: kept


_PROBE = """
import ctypes, os, sys
from ditto_jax.malloc import restart_with_malloc_settings
restart_with_malloc_settings()

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks
block = libc.malloc(256 << 20)
print(os.environ.get("GLIBC_TUNABLES"), os.environ.get("DITTO_JAX_MALLOC_SET"), libc.mallinfo2().hblks - before,
      sys.argv[1:])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's settings")
@pytest.mark.parametrize("switch", ["keep", "system"])
def test_the_program_restarts_itself_with_the_settings_in_effect(switch):
    """A 256 MiB block: from the heap after the restart (no mmapped block added), by mmap with the system's."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", MALLOC_MARK)}
    env[MALLOC_ENV] = switch
    run = subprocess.run([sys.executable, "-c", _PROBE, "--an-argument", "kept"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1  # the first process printed nothing: it became the second
    if switch == "keep":
        assert lines[0] == f"{MALLOC_TUNABLES} 1 0 ['--an-argument', 'kept']"
    else:
        assert lines[0] == "None None 1 ['--an-argument', 'kept']"
