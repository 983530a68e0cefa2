#!/usr/bin/env bash
# Run `ditto-jax train` on every worker of a Cloud TPU VM slice (v5p-64, v5e-256, ...).
#
#   scripts/launch_tpu_pod.sh --name NAME --zone ZONE --type v5p-64 [--create] [--version RUNTIME] \
#       [--repo PATH_ON_WORKERS] [--logs DIR] -- --config configs/sft/qwen2.5-7b-v5p-64.yaml \
#       --workdir /mnt/gcs/runs/qwen7b [dotted.overrides ...]
#
# Steps: (optionally) create the TPU VM slice; copy this repository to every worker (`--worker=all`);
# install it with the [tpu] extra; start training on all workers at once. jax.distributed initialises itself
# from the TPU metadata, so no coordinator flags are needed. Each worker's output goes to
# LOGS/worker-<i>.log here (and /tmp/ditto-train.log on the worker). Re-running the same command resumes from
# the newest complete checkpoint in --workdir, a folder every worker reaches: a gcsfuse mount of a bucket at the
# same path on each worker (`gcsfuse --implicit-dirs BUCKET /mnt/gcs`) or NFS; `gs://` URLs are refused.
set -euo pipefail

NAME="" ZONE="" TYPE="" CREATE=0 VERSION="v2-alpha-tpuv5" REPO_DIR="ditto-jax" LOGS="logs/tpu" PROJECT_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --create) CREATE=1; shift ;;
    --version) VERSION="$2"; shift 2 ;;
    --repo) REPO_DIR="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    --project) PROJECT_ARGS=(--project "$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" ]] || { echo "usage: $0 --name NAME --zone ZONE [--type TYPE --create] -- TRAIN_ARGS" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "no train arguments after -- (at least --config and --workdir)" >&2; exit 2; }
TRAIN_ARGS=$(printf ' %q' "$@")
GC=(gcloud compute tpus tpu-vm "${PROJECT_ARGS[@]}")

if [[ $CREATE == 1 ]]; then
  [[ -n "$TYPE" ]] || { echo "--create needs --type (e.g. v5p-64)" >&2; exit 2; }
  "${GC[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION"
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
echo "copying $ROOT to $REPO_DIR on every worker"
tar -C "$ROOT" --exclude .git --exclude .venv --exclude 'runs' -czf /tmp/ditto-jax-src.tgz .
"${GC[@]}" scp /tmp/ditto-jax-src.tgz "$NAME":/tmp/ditto-jax-src.tgz --zone "$ZONE" --worker=all
"${GC[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command \
  "set -e; mkdir -p $REPO_DIR && tar -C $REPO_DIR -xzf /tmp/ditto-jax-src.tgz && cd $REPO_DIR && \
   python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"

mkdir -p "$LOGS"
NUM_WORKERS=$("${GC[@]}" describe "$NAME" --zone "$ZONE" --format=json |
  python3 -c 'import json, sys; print(len(json.load(sys.stdin).get("networkEndpoints", [])) or 1)')
echo "starting training on all $NUM_WORKERS workers; combined output in $LOGS/all-workers.log"
status=0
"${GC[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && .venv/bin/ditto-jax train$TRAIN_ARGS > /tmp/ditto-train.log 2>&1; rc=\$?; tail -n 3 /tmp/ditto-train.log; exit \$rc" \
  2>&1 | tee "$LOGS/all-workers.log" || status=$?
for ((i = 0; i < NUM_WORKERS; i++)); do  # one log file per worker
  "${GC[@]}" scp "$NAME":/tmp/ditto-train.log "$LOGS/worker-$i.log" --zone "$ZONE" --worker="$i" >/dev/null 2>&1 ||
    echo "could not fetch worker $i's log" >&2
done
echo "finished (exit status $status); per-worker logs: $LOGS/worker-<i>.log"
exit $status
