"""Continuous batching: a host-side loop that keeps ``B`` device slots busy over any stream of requests.

``SamplingEngine.generate(requests)`` pulls requests lazily from any iterable, ``lookahead`` ahead of the free slots
(``submit``/``step``/``cancel`` drive the same loop incrementally). Free slots are filled at once: first every
prompt prefix that two or more requests (admitted, queued or seen) share and the prefix cache lacks is computed into
a pool row (``prefix_cache.py``), then each prompt's remainder after its pooled prefix (the whole prompt when it has
none) is prefilled, grouped by remainder bucket (powers of two from ``min_bucket`` up to ``max_len``) under the
widest prefix width of the group (a multiple of ``prefix_bucket``), in groups of a power-of-two size whose padding
rows carry narrower remainders where there are any (other padding rows are dropped on device); then all slots
decode together in chunks of ``chunk`` steps inside one jitted ``while_loop``. Between chunks the host appends the new tokens, applies stop
strings (exact: the output is cut before the first occurrence, token ids up to the token that completes it), yields
finished ``Result``s (in completion order) and refills their slots. Compilations: one decode, one prefill per
(prefix width, bucket, group size) seen, one prefix fill per (width, group size), one more of each when a constraint
table doubles in size; the persistent compilation cache (``compile_cache.py``) keeps them across runs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from ditto_jax.sampling.compile_cache import compile_stats, start_compile_meter
from ditto_jax.sampling.constraints import ConstraintTables
from ditto_jax.sampling.params import Request, Result, SamplingParams, request_key_data
from ditto_jax.sampling.prefix_cache import PrefixIndex
from ditto_jax.sampling.sampler import (
    FINISH_NAMES,
    FINISH_NONE,
    FINISH_STOP,
    RowParams,
    Sampler,
    SamplerConfig,
    round_up,
)


@dataclasses.dataclass
class _Live:
    request: Request
    params: SamplingParams
    prompt_len: int
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    stop_checked: int = 0
    on_token: Callable[[str, list[int]], None] | None = None
    delivered: int = 0  # output ids already passed to on_token
    prefilled: int | None = None  # chunked prefill under way: prompt tokens already in the slot's cache
    names: list[int] | None = None  # the prompt's prefix-cache block names (computed once, when first needed)
    # (pool row, which fill of it, length) whose keys/values begin the slot's cache; None: none
    shared_from: tuple[int, int, int] | None = None


def _pow2(n: int) -> int:
    g = 1
    while g < n:
        g *= 2
    return g


@dataclasses.dataclass
class EngineTiming:
    """Where an engine's time went: host wall seconds around its device calls, by phase, with the time those
    calls spent tracing, lowering and compiling (or loading from the persistent compilation cache: the first call
    of each shape) taken out into ``compile_s``, so the phases and ``compile_s`` add up to the calls' time.

    The compile meter is process-wide: another engine compiling on another thread during a call is counted here
    too. The ``*_cpu_s`` (process CPU time, all threads; steadier on a shared machine) exclude compilation as
    well, taking its CPU time equal to its wall time (tracing and lowering run on the calling thread)."""

    prefill_s: float = 0.0
    prefix_fill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0
    prefill_cpu_s: float = 0.0
    prefix_fill_cpu_s: float = 0.0
    decode_cpu_s: float = 0.0
    prefill_calls: int = 0
    prefill_chunks: int = 0  # non-final chunks of chunked prefills (included in prefill_calls)
    prefix_fill_calls: int = 0
    decode_calls: int = 0
    decode_steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of the prefilled requests
    prompt_tokens_computed: int = 0  # run through the model (shared prefixes once)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one device call of phase ``name`` (``prefill``, ``prefix_fill`` or ``decode``): adds its wall and
        CPU seconds, less the compilation inside it, to ``{name}_s``/``{name}_cpu_s`` and that to ``compile_s``."""
        t0, c0, k0 = time.perf_counter(), time.process_time(), compile_stats()["compile_s"]
        try:
            yield
        finally:
            compiled = compile_stats()["compile_s"] - k0
            self.compile_s += compiled
            setattr(self, f"{name}_s", getattr(self, f"{name}_s") + max(time.perf_counter() - t0 - compiled, 0.0))
            setattr(self, f"{name}_cpu_s",
                    getattr(self, f"{name}_cpu_s") + max(time.process_time() - c0 - compiled, 0.0))

    def to_json(self) -> dict[str, Any]:
        """Plain dict, seconds rounded."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


FILL_TOKENS = 256
"""A prefix fill computes at most this many positions at once (whole prefixes, at least one): one prefix of 256
positions already keeps the CPU's dots near their peak, and calls of one wide prefix each keep the compiled
variants few (the real workload: two fill executables instead of three, the same compute)."""


def _pack(rows: list[tuple[int, int, Any]], limit: int) -> list[tuple[int, int, list[Any]]]:
    """Prefill groups ``(prefix width, bucket, items)`` for ``rows`` ``(prefix width, bucket, item)``.

    A group runs ``_pow2(len)`` rows of its widths, so its padding rows are free: each group takes up to ``limit``
    rows of the widest (bucket, prefix width) left and of its bucket under a narrower prefix (one call instead of
    one per prefix width: a row's own prefix length masks the rest of the group's prefix), then fills its padding
    rows with the widest rows left that fit (bucket and prefix width no larger).
    The rows' compute never grows, and calls and compiled variants become fewer: the real workload's first
    admission of 8 prompts was one row in a 16-token bucket and seven in a 32-token bucket padded to eight, two
    calls where one holds them all."""
    left = sorted(rows, key=lambda r: (r[1], r[0]), reverse=True)
    groups = []
    while left:
        pp, ps = left[0][:2]
        take = [i for i, r in enumerate(left) if r[1] == ps and r[0] <= pp][:limit]
        free = min(_pow2(len(take)), limit) - len(take)
        take += [i for i, r in enumerate(left) if r[0] <= pp and r[1] <= ps and i not in take][:free]
        groups.append((pp, ps, [left[i][2] for i in take]))
        left = [r for i, r in enumerate(left) if i not in take]
    return groups


def length_buckets(max_len: int, min_bucket: int = 16) -> list[int]:
    """Prompt-length buckets: powers of two from ``min_bucket``, the last one ``max_len``."""
    out, b = [], min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return out


class SamplingEngine:
    """Batched, continuously scheduled sampling of one model.

    The engine takes its own reference to the model's weights when it is built (and, on the fused path, a
    re-laid-out copy): after changing the model's parameters (training), build a new engine.

    Two ways to drive it:

    - ``generate(requests)``: pull requests lazily from an iterable, yield ``Result``s in completion order
      (the resumable runner, ``sample``, the pipeline stages, the benchmarks).
    - incrementally, for a server: one thread owns the loop and calls ``step()`` while ``busy()`` (each call
      admits queued requests into free slots and runs one decode chunk of ``chunk`` tokens, returning the
      requests finished in it); any thread may ``submit(request, on_token=...)`` (queued; ``on_token(id,
      new_ids)`` is called from the loop thread after each chunk with the request's new token ids, already cut
      at a stop string completed within them) or ``cancel(request_id)`` (the next ``step`` frees the slot and
      returns the request with ``finish_reason="cancelled"``). Ids must be unique among unfinished requests.
      A text stream decodes the delivered ids; a stop string that spans chunks may still cut text already
      streamed, so a server that streams text holds back the longest stop string's length.

    ``timing`` (``EngineTiming``) splits the wall time into prefill / prefix fill / decode and counts prompt
    tokens computed; ``prefix.stats`` holds the prefix-cache counters.

    Args:
      model: a ``ditto_jax.model.Transformer`` (sharded over ``mesh`` when given).
      tokenizer: provides ``stop_ids``/``eos_id`` (default stop tokens, with the model config's EOS ids) and
        ``decode`` (texts and stop strings); may be None (no text; stops on the config's EOS ids only).
      batch_size: number of slots ``B`` decoded together.
      max_len: cache capacity per slot (prompt + generated tokens).
      mesh: device mesh; slots are split over its data axes, cached kv heads over ``tensor``.
      chunk: decode steps per device call between host checks.
      prefill_batch: the largest prefill group (default ``B``).
      min_bucket: the smallest prompt-length bucket.
      max_top_k: the largest ``top_k`` a request may ask for (a static bound of ``lax.top_k``).
      default_params: used for requests without ``params``.
      decode_path: ``"fused"`` (``ditto_jax.model.decode_step``: weights re-laid out for decoding, one extra copy of
        them; the CPU default) or ``"model"`` (the model's own scanned forward; the default elsewhere).
      share_compiled: run the process-wide compiled prefill/decode of every engine over a model of the same
        structure and config (weights are arguments, never constants); ``False`` compiles private ones.
      prefix_cache_rows: rows of ``max_len`` tokens of the prefix cache (``sampling/prefix_cache.py``): prompt
        prefixes shared by two or more requests are computed once into a row and reused (default ``min(B, 8)``;
        0 off). Costs ``rows / B`` times the slot cache's memory.
      prefix_block: granularity (tokens) of shared prefixes.
      prefix_bucket: prefixes are computed and read in widths of a multiple of this (SmolLM2's ~320-token profiles
        are read 320 or 384 wide, not 435: the prefill's attention, gather and slot copy scale with the width).
      lookahead: how many queued requests beyond the free slots the prefix cache looks at: a prefix is pooled
        when two or more requests share it, counting those admitted now, the next ``lookahead`` queued ones and
        those seen before (so a character's first prompt, admitted alone, already pools the profile its later
        prompts reuse); ``generate`` pulls that many requests ahead of the free slots. Default ``B`` with the
        prefix cache, 0 without.
      prefill_chunk: a prompt whose remainder (after its pooled prefix) is longer than this many tokens is
        prefilled in chunks of this size, one chunk per ``step``, with a decode chunk of the running slots in
        between (a long prompt never stalls the others for its whole prefill); each chunk attends to the
        earlier ones in the slot's cache. ``None``: whole prompts at once.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, max_len: int, mesh: jax.sharding.Mesh | None = None,
                 *, chunk: int = 16, prefill_batch: int | None = None, min_bucket: int = 16, max_top_k: int = 64,
                 max_stop_ids: int = 8, default_params: SamplingParams | None = None, decode_path: str | None = None,
                 share_compiled: bool = True, prefix_cache_rows: int | None = None, prefix_block: int = 16,
                 prefix_bucket: int = 64, prefill_chunk: int | None = 512, lookahead: int | None = None):
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"batch_size must be >= 1 and max_len >= 2, got {batch_size}, {max_len}")
        self.tokenizer = tokenizer
        if decode_path is None:
            decode_path = "fused" if jax.default_backend() == "cpu" else "model"
        rows = min(batch_size, 8) if prefix_cache_rows is None else prefix_cache_rows
        if max_len <= prefix_block:
            rows = 0
        self.cfg = SamplerConfig(batch_size=batch_size, max_len=max_len, chunk=chunk, max_stop_ids=max_stop_ids,
                                 max_top_k=max_top_k, decode_path=decode_path, prefix_rows=rows,
                                 prefix_row_tokens=max_len if rows else 0)
        self.prefix = PrefixIndex(rows, max_len, prefix_block) if rows else None
        self.prefix_bucket = prefix_bucket
        if lookahead is not None and lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.lookahead = (batch_size if rows else 0) if lookahead is None else lookahead
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.sampler = Sampler(model, self.cfg, mesh, share_compiled=share_compiled)
        self.vocab_size = model.cfg.vocab_size
        self.buckets = length_buckets(max_len, min_bucket)
        self.prefill_batch = prefill_batch or batch_size
        self.default_params = default_params or SamplingParams()
        eos = set(model.cfg.eos_ids)
        if tokenizer is not None:  # end of sequence and end of turn (a chat reply ends at <|im_end|>)
            eos.update(int(t) for t in getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id])
        self.eos_ids = sorted(eos)
        self.constraints = ConstraintTables(self.vocab_size)
        self._tables = None
        self._tables_version = -1
        self.generated_tokens = 0  # running count of tokens produced (for progress bars)
        self.timing = EngineTiming()
        start_compile_meter()  # so the timing can keep compilation apart (once per process)
        self._lock = threading.RLock()
        self._live: list[_Live | None] = [None] * batch_size
        self._pending: collections.deque[_Live] = collections.deque()
        self._in_flight: set[str] = set()
        self._cancelled: set[str] = set()
        self._pool_fills: collections.Counter[int] = collections.Counter()  # fills of each prefix-cache row so far

    # ---- request preparation -------------------------------------------------------------------------------
    def _stop_ids(self, req: Request, params: SamplingParams) -> list[int]:
        ids = list(params.stop_token_ids)
        if not params.ignore_eos or req.constraint is not None:
            ids += self.eos_ids
        if req.constraint is not None:
            ids.append(req.constraint.eos_id)
        ids = sorted(set(ids))
        if len(ids) > self.cfg.max_stop_ids:
            raise ValueError(f"request {req.id}: {len(ids)} stop token ids, at most {self.cfg.max_stop_ids} "
                             f"(raise max_stop_ids)")
        return ids

    def _check(self, req: Request, params: SamplingParams) -> None:
        n = len(req.input_ids)
        if n == 0:
            raise ValueError(f"request {req.id}: empty prompt")
        if n > self.cfg.max_len:
            raise ValueError(f"request {req.id}: prompt has {n} tokens, engine max_len is {self.cfg.max_len}")
        bad = [t for t in req.input_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"request {req.id}: token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if 0 < params.top_k < self.vocab_size and params.top_k > self.cfg.max_top_k:
            raise ValueError(f"request {req.id}: top_k={params.top_k} exceeds the engine's max_top_k={self.cfg.max_top_k}")

    def _device_tables(self):
        version = len(self.constraints.constraints)
        if version != self._tables_version:
            next_state, token_class = self.constraints.arrays()
            self._tables = jax.device_put((next_state, token_class))
            self._tables_version = version
        return self._tables

    # ---- scheduling ------------------------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Complete every request; yields ``Result``s in completion order (any number of requests, pulled
        lazily as slots free up). Not to be mixed with ``submit``/``step`` driven by another thread."""
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and self._free_slots() + self.lookahead > len(self._pending):
                    try:
                        self.submit(next(source))
                    except StopIteration:
                        exhausted = True
                if not self.busy():
                    if exhausted:
                        return
                    continue
                yield from self.step()
        finally:
            self._abandon()

    # ---- incremental API (a server's loop) ---------------------------------------------------------------
    def submit(self, request: Request, on_token: Callable[[str, list[int]], None] | None = None) -> None:
        """Queue a request (from any thread); the loop's next ``step`` admits it when a slot is free.
        ``on_token(request_id, new_token_ids)`` is called from the loop's thread as tokens are produced."""
        params = request.params or self.default_params
        self._check(request, params)
        with self._lock:
            if request.id in self._in_flight:
                raise ValueError(f"request {request.id}: an unfinished request has the same id")
            self._in_flight.add(request.id)
            self._pending.append(_Live(request, params, len(request.input_ids), on_token=on_token))

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request (from any thread): the loop's next ``step`` frees its slot and
        returns it with ``finish_reason="cancelled"`` and the tokens produced so far. False if unknown."""
        with self._lock:
            if request_id not in self._in_flight:
                return False
            self._cancelled.add(request_id)
            return True

    def busy(self) -> bool:
        """Whether any request is queued or running."""
        with self._lock:
            return bool(self._pending) or any(x is not None for x in self._live)

    def step(self) -> list[Result]:
        """One round of the loop: apply cancellations, admit queued requests into free slots (prefill), then,
        unless queued requests still wait for slots freed by the prefill, one decode chunk of every running
        slot. Returns the requests that finished in it (completion order). Call from one thread."""
        done: list[Result] = []
        live = self._live
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                for rec in [r for r in self._pending if r.request.id in cancelled]:
                    self._pending.remove(rec)
                    done.append(self._finish(rec, "cancelled"))
            for slot, rec in enumerate(live):
                if rec is not None and rec.request.id in cancelled:
                    live[slot] = None
                    done.append(self._finish(rec, "cancelled"))
            admitted: list[tuple[int, _Live]] = []
            free = [i for i in range(len(live)) if live[i] is None]
            while free and self._pending:
                slot = free.pop(0)
                live[slot] = self._pending.popleft()
                admitted.append((slot, live[slot]))
        chunking = [(slot, rec) for slot, rec in enumerate(live) if rec is not None and rec.prefilled is not None]
        if chunking:  # prompts admitted earlier whose chunked prefill continues (admitted ones start below)
            self._settle_prefilled(self._prefill_chunks(chunking), done)
        if admitted:
            self._settle_prefilled(self._prefill(admitted), done)
            if self._pending and any(x is None for x in live):
                return done
        if all(x is None or x.prefilled is not None for x in live):
            return done
        keep = np.array([x is not None and x.prefilled is None for x in live])
        # cache positions this chunk can reach: a slot feeds its last token at prompt + outputs - 1, then one more
        # per step; the decode reads only that far (in a few static widths)
        need = max(x.prompt_len + len(x.output_ids) - 1 + self.cfg.chunk for x, k in zip(live, keep) if k)
        with self.timing.phase("decode"):
            tokens, logprobs, finish, steps = self.sampler.decode(self._device_tables(), keep,
                                                                  self.sampler.read_width(need),
                                                                  self._shared_prefixes(live, keep))
        self.timing.decode_calls += 1
        self.timing.decode_steps += steps
        for slot, rec in enumerate(live):
            if rec is None or rec.prefilled is not None:
                continue
            row = tokens[slot]
            n_new = int(np.sum(row >= 0))
            rec.output_ids.extend(int(t) for t in row[:n_new])
            rec.logprobs.extend(float(x) for x in logprobs[slot, :n_new])
            self.generated_tokens += n_new
            stopped = self._apply_stop_strings(rec)
            self._deliver(rec)
            if stopped:
                live[slot] = None
                done.append(self._finish(rec, "stop"))
            elif finish[slot] != FINISH_NONE:
                live[slot] = None
                done.append(self._finish(rec, FINISH_NAMES[int(finish[slot])]))
        return done

    def _settle_prefilled(self, prefilled: list[tuple[int, _Live, int]], done: list[Result]) -> None:
        """Deliver each prefilled prompt's first token; free the slots of those that finished with it."""
        for slot, rec, code in prefilled:
            self._deliver(rec)
            if code != FINISH_NONE:
                self._live[slot] = None
                done.append(self._finish(rec, FINISH_NAMES[code]))

    def _free_slots(self) -> int:
        return sum(x is None for x in self._live)

    def _deliver(self, rec: _Live) -> None:
        if rec.on_token is not None and len(rec.output_ids) > rec.delivered:
            new = rec.output_ids[rec.delivered:]
            rec.delivered = len(rec.output_ids)
            rec.on_token(rec.request.id, new)

    def _finish(self, rec: _Live, reason: str) -> Result:
        with self._lock:
            self._in_flight.discard(rec.request.id)
        return self._result(rec, reason)

    def _abandon(self) -> None:
        """Forget every queued and running request (``generate`` closed early); their slots are freed."""
        with self._lock:
            self._pending.clear()
            self._live[:] = [None] * len(self._live)
            self._in_flight.clear()
            self._cancelled.clear()

    def _prefill(self, admitted: list[tuple[int, _Live]]) -> list[tuple[int, _Live, int]]:
        """Prefill the admitted requests: shared prefixes first (into the prefix cache), then every prompt's
        remainder, in power-of-two groups (``_pack``)."""
        plan = self._plan_prefixes(admitted)
        whole: list[tuple[int, int, tuple[int, _Live, int, int]]] = []
        first_chunks: dict[tuple[int, int], list[tuple[int, _Live, int, int]]] = collections.defaultdict(list)
        for slot, rec, row, m in plan:
            rest = rec.prompt_len - m
            # the prefix is only read (gathered, attended to, copied into the slot) in a multiple of the prefix
            # bucket: every position past the prefix is work for all three
            pp = 0 if m == 0 else min(round_up(m, self.prefix_bucket), self.cfg.prefix_row_tokens)
            if self.prefill_chunk is not None and rest > self.prefill_chunk:
                first_chunks[pp, self.prefill_chunk].append((slot, rec, row, m))
                continue
            whole.append((pp, next(x for x in self.buckets if x >= rest), (slot, rec, row, m)))
        out = []
        for pp, ps, items in _pack(whole, self.prefill_batch):
            out.extend(self._prefill_group(pp, ps, items))
        for (pp, ps), items in sorted(first_chunks.items()):
            for start in range(0, len(items), self.prefill_batch):
                self._prefill_group(pp, ps, items[start:start + self.prefill_batch], upto=self.prefill_chunk)
        return out

    def _prefill_chunks(self, chunking: list[tuple[int, _Live]]) -> list[tuple[int, _Live, int]]:
        """The next chunk of every prompt whose chunked prefill is under way (its earlier chunks are read from
        the slot's own cache); a prompt's last chunk samples its first token, as a whole-prompt prefill does."""
        groups: dict[tuple[int, int, bool], list[tuple[int, _Live, int, int]]] = collections.defaultdict(list)
        for slot, rec in chunking:
            m = rec.prefilled
            rest = rec.prompt_len - m
            final = rest <= self.prefill_chunk
            ps = next(x for x in self.buckets if x >= rest) if final else self.prefill_chunk
            groups[min(round_up(m, self.prefill_chunk), self.cfg.max_len), ps, final].append((slot, rec, slot, m))
        out = []
        for (pp, ps, final), items in sorted(groups.items()):
            for start in range(0, len(items), self.prefill_batch):
                part = items[start:start + self.prefill_batch]
                out.extend(self._prefill_group(pp, ps, part, upto=None if final else self.prefill_chunk,
                                               from_slots=True))
        return out

    def _plan_prefixes(self, admitted: list[tuple[int, _Live]]) -> list[tuple[int, _Live, int, int]]:
        """``(slot, rec, pool row, prefix length)`` per admitted request, after computing into the pool every
        prefix that two or more requests share (this batch, the next queued ones or earlier ones) and the pool
        lacks."""
        index = self.prefix
        if index is None:
            return [(slot, rec, 0, 0) for slot, rec in admitted]
        ids = {slot: rec.request.input_ids for slot, rec in admitted}
        names = {slot: self._names(rec) for slot, rec in admitted}
        with self._lock:
            upcoming = list(itertools.islice(self._pending, self.lookahead))
        counts = collections.Counter(h for ns in [*names.values(), *map(self._names, upcoming)] for h in set(ns))
        need: dict[int, Any] = {}
        pinned: set[int] = set()
        for slot, _ in admitted:
            ns = names[slot]
            row, m = index.lookup(ids[slot], ns)
            if row >= 0:
                pinned.add(row)
            for j in range(len(ns), m // index.block, -1):
                if counts[ns[j - 1]] + index.seen_count(ns[j - 1]) >= 2:
                    need.setdefault(ns[j - 1], ids[slot][:j * index.block])
                    break
        for slot, _ in admitted:
            index.note_seen(names[slot])
        fills: list[tuple[int, Any]] = []
        for tokens in need.values():
            row = index.allocate(tokens, pinned)
            if row >= 0:
                pinned.add(row)
                fills.append((row, tokens))
        self._fill_prefixes(fills)
        fresh = {row for row, _ in fills}
        plan, users = [], collections.Counter()
        stats = index.stats
        for slot, rec in admitted:
            row, m = index.lookup(ids[slot], names[slot])
            stats.lookups += 1
            stats.prompt_tokens += rec.prompt_len
            if row >= 0:
                index.touch(row)
                users[row] += 1
                stats.hits += row not in fresh
                stats.tokens_saved += m
            plan.append((slot, rec, max(row, 0), m))
        stats.hits += sum(n - 1 for row, n in users.items() if row in fresh)
        stats.tokens_saved -= sum(len(t) for _, t in fills)  # computed once (for its first user)
        return plan

    def _names(self, rec: _Live) -> list[int]:
        if rec.names is None:
            rec.names = self.prefix.names(rec.request.input_ids)
        return rec.names

    def _shared_prefixes(self, live: list[_Live | None], keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lead [B], length [B])`` for the decode: running slots whose caches begin with the same fill of one
        prefix-cache row (copied bit for bit at their prefill) name the first such slot and that length, so the
        CPU decode attention reads those positions once for all of them."""
        lead, length = np.arange(len(live), dtype=np.int32), np.zeros((len(live),), np.int32)
        first: dict[tuple[int, int, int], int] = {}
        for slot, (rec, running) in enumerate(zip(live, keep)):
            if running and rec.shared_from is not None:
                lead[slot] = first.setdefault(rec.shared_from, slot)
                length[slot] = rec.shared_from[2] if lead[slot] != slot else 0
        return lead, length

    def _fill_prefixes(self, fills: list[tuple[int, Any]]) -> None:
        """Compute prefixes into their pool rows, grouped by width bucket in power-of-two groups of at most
        ``FILL_TOKENS`` positions (at least one prefix)."""
        groups: dict[int, list[tuple[int, Any]]] = collections.defaultdict(list)
        for row, tokens in fills:
            groups[min(round_up(len(tokens), self.prefix_bucket), self.cfg.prefix_row_tokens)].append((row, tokens))
            self._pool_fills[row] += 1
        for width, items in sorted(groups.items()):
            per_call = max(1, min(self.prefill_batch, FILL_TOKENS // width))
            for start in range(0, len(items), per_call):
                part = items[start:start + per_call]
                g = _pow2(len(part))
                rows = np.full((g,), self.cfg.prefix_rows, np.int32)  # >= rows: padding, dropped on device
                tokens = np.zeros((g, width), np.int32)
                for i, (row, toks) in enumerate(part):
                    rows[i] = row
                    tokens[i, :len(toks)] = np.asarray(toks, np.int32)
                with self.timing.phase("prefix_fill"):
                    self.sampler.prefix_fill(rows, tokens)
                self.timing.prefix_fill_calls += 1
                self.timing.prompt_tokens_computed += sum(len(t) for _, t in part)

    def _prefill_group(self, pp: int, ps: int, items: list[tuple[int, _Live, int, int]], upto: int | None = None,
                       from_slots: bool = False) -> list[tuple[int, _Live, int]]:
        """Prefill ``items`` ``(slot, rec, source row, cached prefix length)``: the prefix from pool row (or,
        ``from_slots``, from the slot itself), then the rest of the prompt in a ``ps``-wide bucket. ``upto``:
        only the next ``upto`` tokens (a non-final chunk: the slot stays inactive, nothing is returned)."""
        if upto is not None:
            out = self._prefill_group_rows(pp, ps, items, upto, from_slots)
            for _, rec, _, m in items:
                rec.prefilled = m + upto
            return out
        for _, rec, _, _ in items:
            rec.prefilled = None
        return self._prefill_group_rows(pp, ps, items, None, from_slots)

    def _prefill_group_rows(self, pp: int, ps: int, items: list[tuple[int, _Live, int, int]], upto: int | None,
                            from_slots: bool) -> list[tuple[int, _Live, int]]:
        g = _pow2(len(items))
        b, ms = self.cfg.batch_size, self.cfg.max_stop_ids
        slots = np.full((g,), b, np.int32)  # >= B: a padding row, dropped on device
        prompts = np.zeros((g, pp + ps), np.int32)
        suffix = np.zeros((g, ps), np.int32)
        src_rows, prefix_len = np.zeros((g,), np.int32), np.zeros((g,), np.int32)
        lengths = np.ones((g,), np.int32)
        key = np.zeros((g, 2), np.uint32)
        temp, top_p, rep = np.zeros((g,), np.float32), np.ones((g,), np.float32), np.ones((g,), np.float32)
        top_k, max_new = np.zeros((g,), np.int32), np.ones((g,), np.int32)
        stop_ids = np.full((g, ms), -1, np.int32)
        cstate, ccon = np.full((g,), -1, np.int32), np.zeros((g,), np.int32)
        for i, (slot, rec, row, m) in enumerate(items):
            p, req = rec.params, rec.request
            ids = np.asarray(req.input_ids, np.int32)
            if upto is not None:
                ids = ids[:m + upto]  # a non-final chunk: the prompt so far
            slots[i] = slot
            prompts[i, :len(ids)] = ids
            suffix[i, :len(ids) - m] = ids[m:]
            src_rows[i], prefix_len[i] = row, m
            if not from_slots:  # the slot's first positions: a copy of this fill of the pool row (or none)
                rec.shared_from = (row, self._pool_fills[row], m) if pp > 0 and m > 0 else None
            lengths[i] = len(ids)
            key[i] = request_key_data(p.seed, req.id)
            temp[i], top_p[i], rep[i], top_k[i], max_new[i] = (p.temperature, p.top_p, p.repetition_penalty,
                                                              p.top_k, p.max_new_tokens)
            ids = self._stop_ids(req, p)
            stop_ids[i, :len(ids)] = ids
            if req.constraint is not None:
                ccon[i], cstate[i] = self.constraints.register(req.constraint)
        rows = jax.device_put(RowParams(key=key, temperature=temp, top_k=top_k, top_p=top_p, repetition_penalty=rep,
                                        max_new=max_new, stop_ids=stop_ids, cstate=cstate, ccon=ccon))
        final = upto is None
        with self.timing.phase("prefill"):
            if pp == 0:
                tok, lp, code = self.sampler.prefill(self._device_tables(), slots, suffix, lengths, rows, final=final)
            else:
                tok, lp, code = self.sampler.prefill(self._device_tables(), slots, prompts, lengths, rows,
                                                     src_rows=src_rows, prefix_len=prefix_len, suffix=suffix,
                                                     from_slots=from_slots, final=final)
        self.timing.prefill_calls += 1
        self.timing.prefill_chunks += not final
        if not from_slots:  # a prompt is counted once, when its prefill starts
            self.timing.prompt_tokens += sum(rec.prompt_len for _, rec, _, _ in items)
        self.timing.prompt_tokens_computed += int(np.sum(lengths[:len(items)] - prefix_len[:len(items)]))
        if not final:
            return []
        out = []
        for i, (slot, rec, _, _) in enumerate(items):
            rec.output_ids.append(int(tok[i]))
            rec.logprobs.append(float(lp[i]))
            self.generated_tokens += 1
            c = FINISH_STOP if self._apply_stop_strings(rec) else int(code[i])
            out.append((slot, rec, c))
        return out

    # ---- results -------------------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        limit = self.tokenizer.vocab_size  # ids of padded embedding rows beyond the tokenizer have no text
        return self.tokenizer.decode([t for t in ids if t < limit])

    def _apply_stop_strings(self, rec: _Live) -> bool:
        """Cut the output at the first stop string (exact); True if one occurred."""
        stops = rec.params.stop_strings
        if not stops or self.tokenizer is None:
            return False
        text = self._decode(rec.output_ids)
        if not any(s in text for s in stops):
            rec.stop_checked = len(rec.output_ids)
            return False
        k = max(rec.stop_checked, 1)
        while k < len(rec.output_ids) and not any(s in self._decode(rec.output_ids[:k]) for s in stops):
            k += 1
        del rec.output_ids[k:], rec.logprobs[k:]
        return True

    def _result(self, rec: _Live, reason: str) -> Result:
        text = self._decode(rec.output_ids)
        if text is not None and rec.params.stop_strings:
            hits = [text.find(s) for s in rec.params.stop_strings if s in text]
            if hits:
                text = text[:min(hits)]
                reason = "stop"
        return Result(id=rec.request.id, output_ids=list(rec.output_ids), text=text, logprobs=list(rec.logprobs),
                      finish_reason=reason, prompt_len=rec.prompt_len)  # type: ignore[arg-type]

    def compile_count(self) -> int:
        """Compiled executables so far (constant after warm-up over a fixed set of buckets), counting those of
        other engines that share them (``share_compiled``)."""
        return self.sampler.compile_count()

