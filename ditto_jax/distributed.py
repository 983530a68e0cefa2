"""Multi-process (multi-host) start-up and per-process data -> global arrays.

``initialize`` must run before anything touches a JAX backend. It picks, in order:
  1. explicit ``coordinator`` / ``num_processes`` / ``process_id`` (the ``--coordinator`` ... CLI flags);
  2. the environment variables ``DITTO_COORDINATOR``, ``DITTO_NUM_PROCESSES``, ``DITTO_PROCESS_ID``;
  3. a SLURM job step with more than one task, or a multi-host TPU slice: ``jax.distributed.initialize()``
     with no arguments (JAX reads SLURM's / the TPU metadata's cluster description itself);
  4. otherwise a single process: nothing to do.
On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from ditto_jax.mesh import batch_sharding


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def cluster_kind() -> str:
    """``slurm`` | ``tpu`` | ``none``: what kind of multi-process launch the environment describes."""
    if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return "none"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               platform: str = "auto") -> dict[str, Any]:
    """Start ``jax.distributed`` when the run has several processes; returns how it was set up."""
    coordinator = coordinator or os.environ.get("DITTO_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("DITTO_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("DITTO_PROCESS_ID")
    if platform == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id (or DITTO_NUM_PROCESSES / "
                             "DITTO_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} is outside [0, {num_processes})")
        if num_processes > 1:
            jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return {"mode": "explicit", "coordinator": coordinator, "num_processes": num_processes,
                "process_id": process_id}
    kind = cluster_kind()
    if kind != "none":
        jax.distributed.initialize()
        return {"mode": kind, "num_processes": jax.process_count(), "process_id": jax.process_index()}
    return {"mode": "single", "num_processes": 1, "process_id": 0}


def is_primary() -> bool:
    """Whether this process writes the run's shared files (logs, metadata, exports)."""
    return jax.process_index() == 0


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's rows (``[B / processes, S]``) into global arrays sharded over the data axes."""

    out = {}
    for key, value in local.items():
        sharding = batch_sharding(mesh, np.ndim(value))
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out
