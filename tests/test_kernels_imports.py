"""kernels/ depends only on jax (and numpy / the standard library): DESIGN.md's bottom layer. One addition:
``scipy_openblas32``, which only locates the OpenBLAS library that ``kernels.cpu.matmul`` calls (no Python API).

import-linter cannot see this folder (it is mapped to ``ditto_jax.kernels`` by pyproject's package-dir, outside
the ``ditto_jax/`` tree it walks), so the rule is checked here on the source.
"""

import ast
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
ALLOWED_ROOTS = {"jax", "jaxlib", "numpy", "scipy_openblas32", "ditto_jax"} | set(sys.stdlib_module_names)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.lineno, node.module or ""


def test_kernels_import_only_jax_numpy_openblas_stdlib_and_themselves():
    files = sorted(KERNELS.glob("*.py"))
    assert files, KERNELS
    bad = []
    for path in files:
        for line, name in _imports(path):
            root = name.split(".")[0]
            if root not in ALLOWED_ROOTS:
                bad.append(f"{path.name}:{line}: {name}")
            elif root == "ditto_jax" and not (name == "ditto_jax._toplevel" or name.startswith("ditto_jax.kernels")):
                bad.append(f"{path.name}:{line}: {name} (kernels must not import the rest of ditto_jax)")
    assert not bad, "\n".join(bad)
