#!/usr/bin/env bash
# The single GPU device call (issue: GPU measurement). From the repository root on the lent machine:
#   bash scripts/gpu_check.sh --budget 420   # results under $OUT (the device tool's folder) or ./benchmarks;
#   ~7 min (the wheels, then 420 s of sections); give the device call a 480 s timeout
# The image has jax 0.11.x, flax, optax, orbax, torch, transformers; the wheels it lacks travel in .whl/
# (see the device tool's README): pydantic, outlines-core, tensorboardX, grain, array-record, portpicker.
set -u
cd "$(dirname "$0")/.."
# The wheels are for the device image's Python 3.12; another Python (a CPU --small run here) uses its own packages.
if ls .whl/*.whl >/dev/null 2>&1 && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
# ditto_jax.kernels is kernels/ (pyproject package-dir). Without an install, scripts run from the repository
# root import the repo's ditto_jax/, which has no kernels/ inside: link it (the link is git-ignored).
[ -e ditto_jax/kernels ] || ln -s ../kernels ditto_jax/kernels
[ -e ditto_jax/configs ] || ln -s ../configs ditto_jax/configs
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L || true
python3 scripts/gpu_check.py --out "${OUT:-benchmarks}" "$@"
