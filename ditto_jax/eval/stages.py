"""One resumable evaluation stage: a set of expected request ids, completed exactly once on disk.

Generation goes through the sampling runner (``ditto_jax.sampling.runner.run_sampling``): atomic shards, a
manifest, every request exactly once however often the run is killed and restarted. On top of it a stage knows
which ids it *expects*: ``run_stage`` reads what earlier runs left, asks ``make_requests`` only for the ids still
pending — building requests may need the model's tokenizer, so nothing is loaded when nothing is pending — and
marks the stage complete (``DONE``). Ids that ``make_requests`` chose not to send (a judge prompt that cannot fit
the cache) are absent from the returned mapping; the caller counts them.

Results are flushed to a shard every ``engine.shard_size`` results or ``engine.flush_seconds`` (the eval config's
``EngineConfig``): a kill loses at most those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ditto_jax.fileio import atomic_write_text
from ditto_jax.sampling.config import EngineConfig
from ditto_jax.sampling.runner import read_outputs, run_sampling

DONE = "DONE"
LOG = "log.jsonl"  # one line per run that generated something: {"resumed", "sent", "expected", ...}

__all__ = ["DONE", "LOG", "read_outputs", "run_stage"]


def run_stage(stage_dir: str | Path, expected_ids: Sequence[str], make_requests: Callable[[set[str]], Iterable[Any]],
              get_engine: Callable[[], Any], desc: str, engine_cfg: EngineConfig,
              progress: bool = True) -> dict[str, dict[str, Any]]:
    """Complete a stage; returns ``id -> {"id","output_ids","text","finish_reason"}`` for every request sent (now
    or by an earlier run). ``get_engine`` loads the engine (a ``SamplingEngine`` or an endpoint's) only when
    something is pending; ``engine_cfg`` gives the shard size and flush interval."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    done = read_outputs(stage_dir)
    if (stage_dir / DONE).exists():
        return done
    pending = set(expected_ids) - set(done)
    if pending:
        engine = get_engine()
        requests = [r for r in make_requests(pending) if r.id in pending]
        summary = run_sampling(engine, requests, stage_dir, partition=False, process_index=0, process_count=1,
                               shard_size=engine_cfg.shard_size, flush_seconds=engine_cfg.flush_seconds,
                               progress=progress, desc=desc, total=len(requests))
        with open(stage_dir / LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps({"resumed": len(done), "sent": summary.generated, "expected": len(expected_ids),
                                  "seconds": round(summary.seconds, 2),
                                  "generated_tokens": summary.generated_tokens}) + "\n")
        done = read_outputs(stage_dir)
    atomic_write_text(stage_dir / DONE, json.dumps({"expected": len(expected_ids), "completed": len(done)}) + "\n")
    return done
