"""One resumable evaluation stage: a set of expected request ids, completed exactly once on disk.

``run_stage`` reads what a previous (possibly killed) run left in the stage folder, asks ``make_requests`` only
for the ids still pending — building requests may need the model's tokenizer, so nothing is loaded when nothing is
pending — runs them through the sampling engine, and marks the stage complete (``DONE``). Ids that
``make_requests`` chose not to send (e.g. a judge prompt that cannot fit the cache) are simply absent from the
returned mapping; the caller counts them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from ditto_jax.fileio import atomic_write_text

DONE = "DONE"
OUTPUT = "outputs.jsonl"
LOG = "log.jsonl"  # one line per run that did work: requests found done ("resumed") and sent


def read_outputs(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished records of a stage (``id -> {"id","output_ids","text","finish_reason"}``); a torn last line left by
    a kill is ignored (that request runs again)."""
    path = stage_dir / OUTPUT
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            rec = json.loads(raw)
            out.setdefault(rec["id"], rec)
    return out


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut != len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)


def run_stage(stage_dir: str | Path, expected_ids: Sequence[str], make_requests: Callable[[set[str]], Iterable[Any]],
              get_engine: Callable[[], Any], desc: str, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Complete a stage; returns ``id -> record`` for every request that was sent (now or by an earlier run)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    done = read_outputs(stage_dir)
    if (stage_dir / DONE).exists():
        return done
    pending = set(expected_ids) - set(done)
    resumed = len(done)
    if pending:
        engine = get_engine()
        requests = [r for r in make_requests(pending) if r.id in pending]
        path = stage_dir / OUTPUT
        _truncate_torn_tail(path)
        bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)
        with open(path, "ab") as f:
            for result in engine.generate(requests):
                rec = result.to_json()
                f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                done[rec["id"]] = rec
                bar.update(1)
        bar.close()
        with open(stage_dir / LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps({"resumed": resumed, "sent": len(requests), "expected": len(expected_ids)}) + "\n")
    atomic_write_text(stage_dir / DONE, json.dumps({"expected": len(expected_ids), "completed": len(done)}) + "\n")
    return done
