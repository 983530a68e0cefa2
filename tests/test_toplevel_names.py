"""Nothing of ours is importable under a top-level name another package owns, from any current directory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, os, sys
root = os.path.realpath(sys.argv[1])
for name in ("kernels", "configs"):
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError:
        print(name, "absent")
        continue
    where = os.path.realpath(getattr(mod, "__file__", None) or "")
    print(name, "OURS" if where.startswith(os.path.join(root, name) + os.sep) else "theirs")
import ditto_jax.kernels, ditto_jax.configs
print("ditto_jax.kernels", callable(ditto_jax.kernels.flash_attention))
"""


@pytest.mark.parametrize("cwd", ["root", "tests", "elsewhere"])
def test_kernels_and_configs_never_shadow_other_packages(cwd, tmp_path):
    where = {"root": ROOT, "tests": ROOT / "tests", "elsewhere": tmp_path}[cwd]
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], cwd=where, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["kernels"] in ("theirs", "absent") and lines["configs"] in ("theirs", "absent"), out.stdout
    assert lines["ditto_jax.kernels"] == "True"


def test_transformers_imports_its_kernels_package_from_the_repo_root():
    """transformers >= 5 imports the PyPI ``kernels``; run where ``python -c`` puts our root first on sys.path."""
    transformers = pytest.importorskip("transformers")
    code = "import transformers.activations, kernels, sys; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"transformers {transformers.__version__}: {out.stderr[-2000:]}"
    assert not os.path.realpath(out.stdout.strip()).startswith(str(ROOT / "kernels") + os.sep), out.stdout
