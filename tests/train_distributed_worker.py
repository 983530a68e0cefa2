"""One process of the two-process training test (also run alone as the single-process reference).

usage: python train_distributed_worker.py OUT.npz PROCESS_ID NUM_PROCESSES PORT
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> None:
    out, pid, nproc, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from ditto_jax import distributed

    distributed.initialize(f"127.0.0.1:{port}" if nproc > 1 else None, nproc if nproc > 1 else None,
                           pid if nproc > 1 else None, platform="cpu")
    import jax

    from ditto_jax.mesh import MeshConfig, make_mesh
    from ditto_jax.model import create_model, load_model_config
    from ditto_jax.train import step as steplib
    from ditto_jax.train.optim import OptimConfig, lr_schedule, make_optimizer

    assert jax.process_count() == nproc and jax.device_count() == 2, (jax.process_count(), jax.device_count())
    mesh = make_mesh(MeshConfig(data=2))
    cfg = load_model_config("model/tiny")
    optim = OptimConfig(peak_lr=1e-3, end_lr=1e-4, warmup_fraction=0.0)
    tx = make_optimizer(optim, 3)
    graphdef, state = steplib.init_state(create_model(cfg, mesh=mesh, seed=0), tx, mesh, seed=0)
    fn = steplib.compile_train_step(graphdef, jax.tree.map(lambda x: x.sharding, state), tx,
                                    lr_schedule(optim, 3), accum=2, loss_chunk=32, mesh=mesh)
    rows = 4 // nproc
    losses = []
    for i in range(3):
        r = np.random.RandomState(i)
        tok = r.randint(0, cfg.vocab_size, (4, 33)).astype(np.int32)
        full = {"tokens": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": (r.rand(4, 32) > 0.2).astype(np.float32),
                "segment_ids": np.ones((4, 32), np.int32), "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1))}
        local = {k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}
        state, metrics = fn(state, distributed.global_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(state.params, tiled=True)
    if pid == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out, losses=np.asarray(losses), **flat)


if __name__ == "__main__":
    main()
