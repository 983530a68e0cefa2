"""Resumable, sharded sampling runs with exactly-once output (``ditto-jax sample`` and the pipeline stages).

Layout of an output folder::

    part-p00000-000000.jsonl    one record a line: {"id", "output_ids", "text", "finish_reason"} (+ "logprobs")
    part-p00000-000001.jsonl    ... every shard is written atomically (temp file, fsync, rename)
    manifest-p00000.json        this process's shards, record/token counts and "complete"

Exactly once: a request is in at most one shard (shards are only ever created whole, and a run first skips
every id present in any shard of any process), and a finished run has every request in one (completion is
recorded in the manifest only after the last shard). A run killed at any moment loses at most the results not
yet flushed (every ``shard_size`` results or ``flush_seconds``); re-running regenerates exactly those, and
since randomness is per request (seed folded with the id and the step) they come out the same.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
from tqdm.auto import tqdm

from ditto_jax.fileio import atomic_write_json, atomic_write_jsonl
from ditto_jax.sampling.params import Request, Result

SHARD_GLOB = "part-p*.jsonl"


@dataclasses.dataclass
class RunSummary:
    """What one ``run_sampling`` call did (this process)."""

    assigned: int = 0  # requests of this process's share
    already_done: int = 0  # skipped: present in an earlier run's shards
    generated: int = 0  # completed now
    shards_written: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of this run."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain dict for reports."""
        return dataclasses.asdict(self) | {"tokens_per_s": round(self.tokens_per_s, 1)}


def _shard_name(process: int, seq: int) -> str:
    return f"part-p{process:05d}-{seq:06d}.jsonl"


def _manifest_path(out_dir: Path, process: int) -> Path:
    return out_dir / f"manifest-p{process:05d}.json"


def _read_shard(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc}); shards are written atomically, so this file "
                             f"was changed by something else") from exc
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{path}:{n}: a record needs an \"id\" field")
        records.append(rec)
    return records


def read_outputs(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every record of a run folder (all processes, all shards), keyed by id; a duplicate id is an error."""
    out: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for path in sorted(Path(out_dir).glob(SHARD_GLOB)):
        for rec in _read_shard(path):
            rid = str(rec["id"])
            if rid in out:
                raise ValueError(f"id {rid!r} appears twice: {where[rid]} and {path.name}")
            out[rid] = rec
            where[rid] = path.name
    return out


def run_complete(out_dir: str | Path, process_index: int = 0, process_count: int | None = None) -> bool:
    """Whether process ``process_index`` finished its share in ``out_dir`` (in a run of ``process_count``
    processes, when given: a share of another split is not this one)."""
    path = _manifest_path(Path(out_dir), process_index)
    if not path.exists():
        return False
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return bool(manifest.get("complete")) and (process_count is None or manifest.get("process_count") == process_count)


def _this_share(requests: Iterable[Request], process_index: int, process_count: int, partition: bool,
                done: set[str], summary: RunSummary, on_skip: Any) -> Iterator[Request]:
    seen: set[str] = set()
    for i, req in enumerate(requests):
        if partition and i % process_count != process_index:
            continue
        if req.id in seen:
            raise ValueError(f"duplicate request id {req.id!r} (input position {i})")
        seen.add(req.id)
        summary.assigned += 1
        if req.id in done:
            summary.already_done += 1
            on_skip()
            continue
        yield req


def run_sampling(engine: Any, requests: Iterable[Request], out_dir: str | Path, *, partition: bool | None = None,
                 process_index: int | None = None, process_count: int | None = None, shard_size: int = 512,
                 flush_seconds: float = 60.0, with_logprobs: bool = False, progress: bool = True,
                 desc: str = "sample", total: int | None = None) -> RunSummary:
    """Generate every request exactly once into ``out_dir``; re-running after any crash resumes.

    Args:
      engine: a ``SamplingEngine`` (anything with ``generate(requests) -> Iterator[Result]`` and a
        ``generated_tokens`` counter).
      requests: any iterable of ``Request`` (ids unique); consumed lazily, ids already in ``out_dir`` skipped.
      out_dir: the run folder (see the module docstring for its layout); shared by all processes.
      partition: with several processes, True makes this process take requests ``i`` with
        ``i % process_count == process_index`` (every process passes the same full sequence); False means the
        caller already passes only this process's share. Required when ``process_count > 1``.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      shard_size, flush_seconds: a shard is written after this many results or this many seconds.
      with_logprobs: also store per-token log-probabilities.
      progress: show a tqdm bar (requests done, skipped ones included, and generated tokens/s); ``total``
        (this process's number of requests) sizes it when known.

    Returns a ``RunSummary``. Read the results with ``read_outputs(out_dir)``.
    """

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if process_count > 1 and partition is None:
        raise ValueError("run_sampling with several processes: pass partition=True (split the requests here) or "
                         "partition=False (each process already passes its own share)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [*out_dir.glob(f".part-p{process_index:05d}-*.tmp"), *out_dir.glob(f".manifest-p{process_index:05d}.json*.tmp")]
    for path in stale:  # temp files of a killed run of this process (a shard or the manifest being written)
        path.unlink(missing_ok=True)
    done = set(read_outputs(out_dir))
    mine = sorted(out_dir.glob(f"part-p{process_index:05d}-*.jsonl"))
    shards = [{"file": p.name, "records": len(_read_shard(p))} for p in mine]
    seq = int(mine[-1].stem.rsplit("-", 1)[1]) + 1 if mine else 0

    summary = RunSummary()
    start, tokens0 = time.perf_counter(), engine.generated_tokens
    buffer: list[dict[str, Any]] = []
    last_flush = time.perf_counter()

    def manifest(complete: bool) -> None:
        atomic_write_json(_manifest_path(out_dir, process_index), {
            "process_index": process_index, "process_count": process_count, "complete": complete,
            "records": sum(s["records"] for s in shards), "shards": shards, "last_run": summary.to_json()})

    def flush() -> None:
        nonlocal seq, last_flush
        if buffer:
            name = _shard_name(process_index, seq)
            atomic_write_jsonl(out_dir / name, buffer)
            shards.append({"file": name, "records": len(buffer)})
            seq += 1
            summary.shards_written += 1
            buffer.clear()
            summary.seconds = time.perf_counter() - start
            summary.generated_tokens = engine.generated_tokens - tokens0
            manifest(False)
        last_flush = time.perf_counter()

    bar = tqdm(total=total, desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    todo = _this_share(requests, process_index, process_count, bool(partition), done, summary, lambda: bar.update(1))
    result: Result
    for result in engine.generate(todo):
        buffer.append(result.to_json(with_logprobs))
        summary.generated += 1
        bar.update(1)
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            bar.set_postfix(tok_s=f"{(engine.generated_tokens - tokens0) / elapsed:.0f}", refresh=False)
        if len(buffer) >= shard_size or time.perf_counter() - last_flush >= flush_seconds:
            flush()
    flush()
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.generated_tokens = engine.generated_tokens - tokens0
    manifest(True)
    return summary
