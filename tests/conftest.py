"""The test run keeps its compiled executables in a folder of its own (shared by the xdist workers of one run), not
in the user's ``~/.cache/ditto-jax/jax-cache``: the suite neither fills the user's cache with test programs nor
depends on what earlier runs left there (as on a fresh CI machine). A folder given in
``$DITTO_JAX_COMPILATION_CACHE`` is kept.

Decoding runs the CPU kernels in tests on every host (``DITTO_CPU_DECODE_KERNELS=1`` unless the variable is set):
without AVX2 decoding would keep XLA's ops by default, and the kernels' paths would go untested there;
``test_kernels_cpu.py`` tests that default."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DITTO_CPU_DECODE_KERNELS", "1")


@pytest.fixture(scope="session", autouse=True)
def _run_compilation_cache(tmp_path_factory):
    if "DITTO_JAX_COMPILATION_CACHE" in os.environ:
        yield
        return
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: .../pytest-N/popen-gwK
    folder = root / "jax-cache"
    folder.mkdir(exist_ok=True)
    os.environ["DITTO_JAX_COMPILATION_CACHE"] = str(folder)
    yield
    os.environ.pop("DITTO_JAX_COMPILATION_CACHE", None)
