"""``run_grid``: simulate per supervisor, fine-tune each seed on each corpus, evaluate all cells with one judge.

Work dir layout (every stage resumes on its own; a finished one is skipped without loading a model)::

    WORKDIR/grid_config.yaml               the config of this run (a re-run must match it)
    WORKDIR/simulate/<supervisor>/         ditto-jax simulate work dir (corpus/ inside)
    WORKDIR/sft/<seed>__<supervisor>/      ditto-jax train work dir (the candidate is its last step)
    WORKDIR/eval/                          one ditto-jax eval over every cell (report.json per candidate)
    WORKDIR/grid.json, grid.md, grid.png   the seed x supervision tables and heatmap
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ditto_jax.config import pin_config
from ditto_jax.eval.pipeline import run_eval
from ditto_jax.eval.report import REPORT_JSON
from ditto_jax.grid.config import NONE, GridConfig, cell_name
from ditto_jax.grid.report import write_grid_report
from ditto_jax.simulation.stages import Simulation
from ditto_jax.train.config import resolve_asset_paths
from ditto_jax.train.loop import run_training

Log = Callable[[str], None]


def _simulate(cfg: GridConfig, supervisor: str, workdir: Path, log: Log, progress: bool) -> dict[str, Any]:
    out = workdir / "simulate" / supervisor
    report = Simulation(cfg.simulate_config(supervisor), out, log=log, progress=progress).run()
    return {"dir": str(out), "sessions": report["corpus"]["sessions"], "turns": report["corpus"]["turns"]}


def _sft_paths(cfg: GridConfig, corpus: Path, sessions: int, log: Log) -> tuple[list[str], list[str]]:
    if sessions >= cfg.corpus.min_sessions:
        return [str(corpus)], []
    mixed = resolve_asset_paths(cfg.corpus.mix_in)
    log(f"  only {sessions} simulated sessions (< corpus.min_sessions={cfg.corpus.min_sessions}): also training on "
        f"{', '.join(cfg.corpus.mix_in)}")
    return ([str(corpus)] if sessions else []) + mixed, list(cfg.corpus.mix_in)


def _train(cfg: GridConfig, seed: str, supervisor: str, paths: list[str], workdir: Path) -> dict[str, Any]:
    out = workdir / "sft" / cell_name(seed, supervisor)
    result = run_training(cfg.sft_config(seed, paths), out)
    if result.status != "completed":
        raise RuntimeError(f"training {out} ended with status {result.status!r} at step {result.step}; re-run the "
                           f"grid to resume")
    return {"dir": str(out), "step": result.step}


def run_grid(cfg: GridConfig, workdir: str | Path, *, log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole grid; returns ``grid.json``'s content."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    pin_config(workdir, "grid_config.yaml", cfg, "a grid run")
    timings: dict[str, float] = {}
    corpora: dict[str, Any] = {}
    for sup in cfg.supervisors:
        log(f"[grid] simulate with {sup}")
        t0 = time.perf_counter()
        corpora[sup] = _simulate(cfg, sup, workdir, log, progress)
        timings[f"simulate/{sup}"] = round(time.perf_counter() - t0, 1)
    trained: dict[str, Any] = {}
    for seed in cfg.seeds:
        for sup in cfg.supervisors:
            name = cell_name(seed, sup)
            log(f"[grid] fine-tune {seed} on {sup}'s corpus")
            t0 = time.perf_counter()
            paths, mixed = _sft_paths(cfg, Path(corpora[sup]["dir"]) / "corpus", corpora[sup]["sessions"], log)
            trained[name] = {**_train(cfg, seed, sup, paths, workdir), "mixed_in": mixed}
            timings[f"sft/{name}"] = round(time.perf_counter() - t0, 1)
    candidates = []
    for seed in cfg.seeds:
        if cfg.baseline:
            candidates.append({"name": cell_name(seed, NONE), "model": cfg.models[seed].model_dump(mode="json")})
        for sup in cfg.supervisors:
            name = cell_name(seed, sup)
            # the training workdir: the checkpoint store resolves it to its last step (tokenizer included)
            candidates.append({"name": name, "model": {"path": trained[name]["dir"]}})
    log(f"[grid] evaluate {len(candidates)} models with one judge")
    t0 = time.perf_counter()
    run_eval(cfg.eval_config(candidates), workdir / "eval", progress=progress)
    timings["eval"] = round(time.perf_counter() - t0, 1)
    reports = {c["name"]: json.loads((workdir / "eval" / "runs" / c["name"] / REPORT_JSON).read_text("utf-8"))
               for c in candidates}
    columns = list(cfg.supervisors) + ([NONE] if cfg.baseline else [])
    return write_grid_report(workdir, cfg.seeds, columns, reports,
                             {"corpora": corpora, "trained": trained, "seconds": timings})
