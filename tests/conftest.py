"""Every test process keeps its compiled executables in a folder of its own test session, not in the user's
``~/.cache/ditto-jax/jax-cache``: the suite neither fills the user's cache with test programs nor depends on what
earlier runs left there (as on a fresh CI machine). A folder given in ``$DITTO_JAX_COMPILATION_CACHE`` is kept."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_compilation_cache(tmp_path_factory):
    if "DITTO_JAX_COMPILATION_CACHE" in os.environ:
        yield
        return
    os.environ["DITTO_JAX_COMPILATION_CACHE"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield
    os.environ.pop("DITTO_JAX_COMPILATION_CACHE", None)
