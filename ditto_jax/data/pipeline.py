"""The SFT input pipeline (Grain): sessions -> tokens + loss mask -> packed, batched, per-process arrays.

    source (JSONL | TFDS corpus | array_record of JSON)        all processes read and validate (counted)
      -> this process's shard (record i goes to process i % count)
      -> encode_chat: ids + assistant mask; over-long sessions truncated at a turn boundary or dropped
      -> grain.MapDataset: seeded shuffle, reshuffled every epoch (repeat)
      -> packing to seq_len (first-fit / best-fit; or one session a row) with segment ids and positions
      -> batch (global batch / process count) -> optional multiprocess prefetch

Each session is tokenized once, up front, in the calling process: every skip is counted exactly (worker
processes cannot report counters back) and epochs after the first cost nothing. Batches are dicts of numpy
arrays ``[B, S]``: ``tokens`` int32, ``targets`` int32 (next token), ``loss_mask`` float32 (1 where the target is
an assistant token), ``segment_ids`` int32 (0 = padding), ``positions`` int32 (restart at 0 per segment).
``DataIterator.get_state()`` is a JSON-able dict (store it in Orbax with ``ocp.args.JsonSave``);
``set_state`` resumes exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import grain
import jax
import numpy as np
import pydantic
from absl import flags

from ditto_jax.config import StrictModel
from ditto_jax.data.corpus import Session, parse_session
from ditto_jax.data.records import ReadReport, decode_json, expand_paths, find_dataset_dir, iter_json_lines, read_items
from ditto_jax.data.tfds_builder import open_split
from ditto_jax.tokenizer import Tokenizer

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_PACKED = ("tokens", "targets", "loss_mask")


class DataConfig(StrictModel):
    """Where the corpus is and how it becomes batches (embedded in the SFT config as ``data``)."""

    paths: list[str] = pydantic.Field(default_factory=list, description="files, folders or globs")
    format: Literal["auto", "jsonl", "tfds", "array_record"] = "auto"
    split: str = "train"
    seq_len: int = pydantic.Field(512, gt=1)
    global_batch_size: int = pydantic.Field(8, gt=0)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = pydantic.Field(None, gt=0, description="None: repeat forever")
    packing: Literal["first_fit", "best_fit", "none"] = "first_fit"
    packing_bins: int | None = pydantic.Field(None, gt=0, description="bins per packing round; None: 4 x batch")
    over_long: Literal["truncate", "drop"] = "truncate"
    on_error: Literal["skip", "fail"] = "skip"
    workers: int = pydantic.Field(0, ge=0, description="Grain worker processes (0: in-process)")
    worker_buffer_size: int = pydantic.Field(2, gt=0)


@dataclasses.dataclass
class PipelineSummary:
    """Every count of a pipeline build: read/kept/skipped by reason, over-long handling, tokens."""

    read: ReadReport
    process_index: int = 0
    process_count: int = 1
    sessions_in_shard: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    over_long_truncated: int = 0
    over_long_dropped: int = 0
    turns_truncated: int = 0
    no_trained_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (what the trainer logs as the data run summary)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "read"}
        return {"read": self.read.to_dict(), **d}


# ------------------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------------------
def _detect_format(paths: Sequence[str]) -> str:
    first = Path(paths[0])
    if first.is_dir() and find_dataset_dir(first):
        return "tfds"
    if ".array_record" in first.name or (first.is_dir() and any(first.glob("*.array_record*"))):
        return "array_record"
    return "jsonl"


def _raw_items(cfg: DataConfig) -> Iterator[tuple[str, int, Any]]:
    """``(origin, index, object | RecordError)`` for every record of the configured source."""
    if not cfg.paths:
        raise ValueError("data.paths is empty: give the corpus files, folder or glob")
    fmt = cfg.format if cfg.format != "auto" else _detect_format(cfg.paths)
    if fmt == "jsonl":
        for path in expand_paths(cfg.paths):
            yield from iter_json_lines(path)
    elif fmt == "tfds":
        for p in cfg.paths:
            ds = find_dataset_dir(p)
            if ds is None:
                raise FileNotFoundError(f"{p}: no TFDS dataset (dataset_info.json) here")
            source = open_split(ds, cfg.split)
            origin = f"{ds}[{cfg.split}]"
            for i in range(len(source)):
                yield origin, i, decode_json(source[i]["json"], origin, i)
    elif fmt == "array_record":
        files = [str(p) for p in expand_paths(cfg.paths, suffix=".array_record")]
        source = grain.sources.ArrayRecordDataSource(files)
        for i in range(len(source)):
            yield "array_record", i, decode_json(source[i], "array_record", i)
    else:
        raise ValueError(f"unknown data format {fmt!r}")


def read_corpus(cfg: DataConfig) -> tuple[list[Session], ReadReport]:
    """Every valid session of the source (duplicates by id dropped) and the read report."""
    return read_items(_raw_items(cfg), parse_session, cfg.on_error, key=lambda s: s.id)


# ------------------------------------------------------------------------------------------------------------
# tokenization
# ------------------------------------------------------------------------------------------------------------
def encode_session(session: Session, tokenizer: Tokenizer, seq_len: int, over_long: str,
                   summary: PipelineSummary | None = None) -> dict[str, np.ndarray] | None:
    """``{"tokens", "targets", "loss_mask"}`` (length <= ``seq_len``) of a session, or None when dropped.

    A session longer than ``seq_len + 1`` ids keeps its longest prefix of whole user/assistant exchanges that
    fits (``over_long="truncate"``), else is dropped; both are counted in ``summary``.
    """
    messages = session.messages()
    ids, mask = tokenizer.encode_chat(messages)
    if len(ids) - 1 > seq_len:
        exchanges = (len(messages) - 1) // 2
        kept = 0
        if over_long == "truncate":
            for k in range(exchanges - 1, 0, -1):
                ids, mask = tokenizer.encode_chat(messages[: 1 + 2 * k])
                if len(ids) - 1 <= seq_len:
                    kept = k
                    break
        if summary is not None:
            if kept:
                summary.over_long_truncated += 1
                summary.turns_truncated += exchanges - kept
            else:
                summary.over_long_dropped += 1
        if not kept:
            return None
    arr = np.asarray(ids, np.int32)
    loss = np.asarray(mask[1:], np.float32)
    if not loss.any():
        if summary is not None:
            summary.no_trained_tokens += 1
        return None
    if summary is not None:
        summary.examples += 1
        summary.tokens += len(arr) - 1
        summary.trained_tokens += int(loss.sum())
    return {"tokens": arr[:-1], "targets": arr[1:], "loss_mask": loss}


def prepare_examples(cfg: DataConfig, tokenizer: Tokenizer, process_index: int = 0,
                     process_count: int = 1) -> tuple[list[dict[str, np.ndarray]], PipelineSummary]:
    """Read and validate the source, take this process's shard, tokenize it; returns examples and counts."""
    sessions, report = read_corpus(cfg)
    summary = PipelineSummary(read=report, process_index=process_index, process_count=process_count)
    shard = sessions[process_index::process_count]
    summary.sessions_in_shard = len(shard)
    examples = []
    for s in shard:
        ex = encode_session(s, tokenizer, cfg.seq_len, cfg.over_long, summary)
        if ex is not None:
            examples.append(ex)
    return examples, summary


# ------------------------------------------------------------------------------------------------------------
# grain graph
# ------------------------------------------------------------------------------------------------------------
class _ToBatch:
    """Packed features -> the contract's batch keys (picklable for worker processes)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = b["tokens_segment_ids"].astype(np.int32)
        pad = seg == 0
        return {
            "tokens": np.where(pad, self.pad_id, b["tokens"]).astype(np.int32),
            "targets": np.where(pad, self.pad_id, b["targets"]).astype(np.int32),
            "loss_mask": np.where(pad, 0.0, b["loss_mask"]).astype(np.float32),
            "segment_ids": seg,
            "positions": np.where(pad, 0, b["tokens_positions"]).astype(np.int32),
        }


class _PadOne:
    """One session a row (``packing="none"``): pad to ``seq_len``."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(ex["tokens"])
        out = {k: np.zeros(self.seq_len, ex[k].dtype) for k in _PACKED}
        for k in _PACKED:
            out[k][:n] = ex[k]
        out["tokens_segment_ids"] = np.zeros(self.seq_len, np.int32)
        out["tokens_segment_ids"][:n] = 1
        out["tokens_positions"] = np.zeros(self.seq_len, np.int32)
        out["tokens_positions"][:n] = np.arange(n, dtype=np.int32)
        return out


def _ensure_absl_flags_parsed() -> None:
    """Grain worker processes read absl flags; outside an absl app they must be marked parsed."""

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(examples: Sequence[dict[str, np.ndarray]], cfg: DataConfig, batch_size: int, pad_id: int):
    """The Grain ``IterDataset`` of batches over prepared examples."""

    if not examples:
        raise ValueError("no training examples left after validation/tokenization (see the pipeline summary)")
    ds = grain.MapDataset.source(list(examples))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)  # reshuffled every epoch
    it = ds.to_iter_dataset()
    lengths = {k: cfg.seq_len for k in _PACKED}
    bins = cfg.packing_bins or 4 * batch_size
    if cfg.packing == "first_fit":
        it = grain.experimental.FirstFitPackIterDataset(it, length_struct=lengths, num_packing_bins=bins,
                                                        seed=cfg.seed, shuffle_bins=cfg.shuffle)
    elif cfg.packing == "best_fit":
        it = grain.experimental.BestFitPackIterDataset(it, length_struct=lengths, num_packing_bins=bins,
                                                       seed=cfg.seed, shuffle_bins=cfg.shuffle)
    else:
        it = it.map(_PadOne(cfg.seq_len))
    it = it.batch(batch_size, drop_remainder=True).map(_ToBatch(pad_id))
    if cfg.workers > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return it


class DataIterator:
    """Iterator of batches with exact save/restore and running packing statistics."""

    def __init__(self, dataset: Any):
        self._it = iter(dataset)
        self.batches = 0
        self.positions = 0
        self.real_tokens = 0
        self.trained_tokens = 0

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.batches += 1
        self.positions += batch["segment_ids"].size
        self.real_tokens += int((batch["segment_ids"] > 0).sum())
        self.trained_tokens += int(batch["loss_mask"].sum())
        return batch

    @property
    def packing_efficiency(self) -> float:
        """Non-pad fraction of the positions delivered so far."""
        return self.real_tokens / self.positions if self.positions else 0.0

    def stats(self) -> dict[str, Any]:
        """Batches, positions, real and trained tokens delivered, packing efficiency."""
        return {"batches": self.batches, "positions": self.positions, "real_tokens": self.real_tokens,
                "trained_tokens": self.trained_tokens, "packing_efficiency": round(self.packing_efficiency, 4)}

    def get_state(self) -> dict[str, Any]:
        """A JSON-able snapshot (Grain's iterator state + our counters)."""
        counters = {k: getattr(self, k) for k in ("batches", "positions", "real_tokens", "trained_tokens")}
        return {"grain": self._it.get_state(), "counters": counters}

    def set_state(self, state: dict[str, Any] | str | bytes) -> None:
        """Restore a ``get_state`` snapshot (dict, or its JSON text/bytes); the next batch is as before."""
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        self._it.set_state(state["grain"])
        for k, v in state["counters"].items():
            setattr(self, k, v)

    def state_bytes(self) -> bytes:
        """``get_state`` as JSON bytes."""
        return json.dumps(self.get_state()).encode()


@dataclasses.dataclass
class DataPipeline:
    """A built pipeline: the Grain dataset, this process's batch size, and the build summary."""

    dataset: Any
    batch_size: int
    summary: PipelineSummary
    config: DataConfig

    def iterator(self) -> DataIterator:
        """A fresh iterator from the start (restore a saved position with ``set_state``)."""
        return DataIterator(self.dataset)


def make_pipeline(cfg: DataConfig, tokenizer: Tokenizer, process_index: int | None = None,
                  process_count: int | None = None) -> DataPipeline:
    """Build the pipeline for this process (defaults: ``jax.process_index()`` / ``jax.process_count()``)."""
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if cfg.global_batch_size % process_count:
        raise ValueError(f"data.global_batch_size {cfg.global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    batch_size = cfg.global_batch_size // process_count
    examples, summary = prepare_examples(cfg, tokenizer, process_index, process_count)
    return DataPipeline(build_dataset(examples, cfg, batch_size, tokenizer.pad_id), batch_size, summary, cfg)


def reason_counts(summary: PipelineSummary) -> dict[str, int]:
    """Every skip/drop reason with its count (read errors, duplicates, over-long, nothing to train on)."""
    counts = collections.Counter(summary.read.skipped)
    counts["duplicate"] += summary.read.duplicates
    counts["over_long_dropped"] += summary.over_long_dropped
    counts["no_trained_tokens"] += summary.no_trained_tokens
    return {k: v for k, v in sorted(counts.items()) if v}
