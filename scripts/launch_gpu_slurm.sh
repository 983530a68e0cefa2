#!/usr/bin/env bash
# Run `ditto-jax train` on a SLURM GPU cluster: one task per node, each task driving all of its node's GPUs.
#
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 --cpus-per-task=64 \
#       scripts/launch_gpu_slurm.sh --config configs/sft/qwen2.5-7b-8xh100.yaml --workdir /shared/runs/qwen7b
#   (or interactively inside an allocation: scripts/launch_gpu_slurm.sh --config ... --workdir ...)
#
# jax.distributed reads SLURM's variables (SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_STEP_NODELIST) to find
# the coordinator (the first node) and this process's index, so no coordinator flags are needed; a single node
# runs as one process. The venv is taken from $DITTO_VENV (default: .venv in the repository, created with
# `pip install -e '.[gpu]'`). --workdir must be on a filesystem every node sees; each task's output goes to
# LOGS/task-<procid>.log (LOGS defaults to WORKDIR/logs). Re-submitting the same command resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${DITTO_VENV:-$ROOT/.venv}"
[[ -x "$VENV/bin/ditto-jax" ]] || { echo "no ditto-jax in $VENV: python3 -m venv $VENV && $VENV/bin/pip install -e '$ROOT[gpu]'" >&2; exit 2; }
WORKDIR=""
for ((i = 1; i <= $#; i++)); do [[ "${!i}" == "--workdir" ]] && { j=$((i + 1)); WORKDIR="${!j}"; }; done
[[ -n "$WORKDIR" ]] || { echo "usage: $0 --config FILE --workdir DIR [overrides]" >&2; exit 2; }
LOGS="${LOGS:-$WORKDIR/logs}"
mkdir -p "$LOGS"

# XLA GPU flags that help large-model training (latency-hiding scheduler overlaps collectives with compute).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "not inside a SLURM allocation: running one process on this machine"
  exec "$VENV/bin/ditto-jax" train "$@" 2>&1 | tee "$LOGS/task-0.log"
fi
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  bash -c "exec '$VENV/bin/ditto-jax' train $(printf '%q ' "$@") > '$LOGS/task-\${SLURM_PROCID}.log' 2>&1"
echo "done; logs in $LOGS/task-<procid>.log"
