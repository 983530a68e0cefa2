"""Cross-supervision (Ditto §6) as one command: ``ditto-jax grid --config configs/grid/*.yaml --workdir DIR``.

Every supervision model simulates a corpus; every seed model is fine-tuned on every corpus; every seed model is
also evaluated as it is (the no-role-play baseline); one judge scores all of them in one evaluation. The result is
the paper's seed x supervision table per metric (``grid.md``, ``grid.json``) and a heatmap (``grid.png``).

* ``config``: ``GridConfig`` (named models, seeds, supervisors, the three stage sections on presets).
* ``pipeline``: ``run_grid(cfg, workdir)`` — resumable, each stage skipped when done.
* ``report``: the tables and the heatmap.
"""
