"""Keep the repository's folders from shadowing PyPI packages of the same top-level name.

``kernels/`` and ``configs/`` are installed as ``ditto_jax.kernels`` / ``ditto_jax.configs`` (pyproject
package-dir). When the repository root is on ``sys.path`` (``python -m pytest``, ``python -c`` run there) they
are also reachable as top-level ``kernels`` / ``configs``, names that belong to other packages (transformers
imports the PyPI ``kernels``). Their ``__init__`` calls :func:`hand_over`, which replaces the module being
imported by the package that owns the name, or fails as if the folder were not there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Load the top-level package ``name`` from ``sys.path`` without the repository root into ``sys.modules``.

    The ``import`` statement that is running returns ``sys.modules[name]`` afterwards, i.e. the owner's module.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        sys.modules.pop(name, None)
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
