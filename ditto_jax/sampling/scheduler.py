"""Continuous batching: a host-side scheduler that keeps ``B`` device slots busy over any stream of requests.

``SamplingEngine.generate(requests)`` pulls requests lazily from any iterable. Free slots are filled at once:
new prompts are grouped by length bucket (powers of two from ``min_bucket`` up to ``max_len``) and prefilled
in groups of a power-of-two size (padding rows are dropped on device), then all slots decode together in
chunks of ``chunk`` steps inside one jitted ``while_loop``. Between chunks the host appends the new tokens,
applies stop strings (exact: the output is cut before the first occurrence, token ids up to the token that
completes it), yields finished ``Result``s (in completion order) and refills their slots. Compilations: one
decode, one prefill per (bucket, group size) seen, one more of each when a constraint table doubles in size.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ditto_jax.sampling.constraints import ConstraintTables
from ditto_jax.sampling.params import Request, Result, SamplingParams, request_key_data
from ditto_jax.sampling.sampler import FINISH_NAMES, FINISH_NONE, FINISH_STOP, RowParams, Sampler, SamplerConfig


@dataclasses.dataclass
class _Live:
    request: Request
    params: SamplingParams
    prompt_len: int
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    stop_checked: int = 0


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
      decode_path: ``"fused"`` (``sampling/decoder.py``: weights re-laid out for decoding, one extra copy of
        them; the CPU default) or ``"model"`` (the model's own scanned forward; the default elsewhere).
      share_compiled: run the process-wide compiled prefill/decode of every engine over a model of the same
        structure and config (weights are arguments, never constants); ``False`` compiles private ones.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, max_len: int, mesh: jax.sharding.Mesh | None = None,
                 *, chunk: int = 16, prefill_batch: int | None = None, min_bucket: int = 16, max_top_k: int = 64,
                 max_stop_ids: int = 8, default_params: SamplingParams | None = None, decode_path: str | None = None,
                 share_compiled: bool = True):
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"batch_size must be >= 1 and max_len >= 2, got {batch_size}, {max_len}")
        self.tokenizer = tokenizer
        if decode_path is None:
            decode_path = "fused" if jax.default_backend() == "cpu" else "model"
        self.cfg = SamplerConfig(batch_size=batch_size, max_len=max_len, chunk=chunk, max_stop_ids=max_stop_ids,
                                 max_top_k=max_top_k, decode_path=decode_path)
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
            self._tables = (jnp.asarray(next_state), jnp.asarray(token_class))
            self._tables_version = version
        return self._tables

    # ---- scheduling ------------------------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Complete every request; yields ``Result``s in completion order (any number of requests)."""
        b = self.cfg.batch_size
        live: list[_Live | None] = [None] * b
        source = iter(requests)
        exhausted = False
        while True:
            admitted: list[tuple[int, _Live]] = []
            free = [i for i in range(b) if live[i] is None]
            while free and not exhausted:
                try:
                    req = next(source)
                except StopIteration:
                    exhausted = True
                    break
                params = req.params or self.default_params
                self._check(req, params)
                slot = free.pop(0)
                live[slot] = _Live(req, params, len(req.input_ids))
                admitted.append((slot, live[slot]))
            if admitted:
                for slot, rec, code in self._prefill(admitted):
                    if code != FINISH_NONE:
                        live[slot] = None
                        yield self._result(rec, FINISH_NAMES[code])
                if any(x is None for x in live) and not exhausted:
                    continue
            if all(x is None for x in live):
                if exhausted:
                    return
                continue
            keep = np.array([x is not None for x in live])
            tokens, logprobs, finish, _ = self.sampler.decode(self._device_tables(), keep)
            for slot in range(b):
                rec = live[slot]
                if rec is None:
                    continue
                row = tokens[slot]
                n_new = int(np.sum(row >= 0))
                rec.output_ids.extend(int(t) for t in row[:n_new])
                rec.logprobs.extend(float(x) for x in logprobs[slot, :n_new])
                self.generated_tokens += n_new
                done = self._apply_stop_strings(rec)
                if done:
                    live[slot] = None
                    yield self._result(rec, "stop")
                elif finish[slot] != FINISH_NONE:
                    live[slot] = None
                    yield self._result(rec, FINISH_NAMES[int(finish[slot])])

    def _prefill(self, admitted: list[tuple[int, _Live]]) -> list[tuple[int, _Live, int]]:
        groups: dict[int, list[tuple[int, _Live]]] = collections.defaultdict(list)
        for slot, rec in admitted:
            bucket = next(x for x in self.buckets if x >= rec.prompt_len)
            groups[bucket].append((slot, rec))
        out = []
        for bucket, items in sorted(groups.items()):
            for start in range(0, len(items), self.prefill_batch):
                part = items[start:start + self.prefill_batch]
                out.extend(self._prefill_group(bucket, part))
        return out

    def _prefill_group(self, bucket: int, items: list[tuple[int, _Live]]) -> list[tuple[int, _Live, int]]:
        g = 1
        while g < len(items):
            g *= 2
        b, ms = self.cfg.batch_size, self.cfg.max_stop_ids
        slots = np.full((g,), b, np.int32)  # >= B: a padding row, dropped on device
        tokens = np.zeros((g, bucket), np.int32)
        lengths = np.ones((g,), np.int32)
        key = np.zeros((g, 2), np.uint32)
        temp, top_p, rep = np.zeros((g,), np.float32), np.ones((g,), np.float32), np.ones((g,), np.float32)
        top_k, max_new = np.zeros((g,), np.int32), np.ones((g,), np.int32)
        stop_ids = np.full((g, ms), -1, np.int32)
        cstate, ccon = np.full((g,), -1, np.int32), np.zeros((g,), np.int32)
        for i, (slot, rec) in enumerate(items):
            p, req = rec.params, rec.request
            slots[i] = slot
            tokens[i, :rec.prompt_len] = np.asarray(req.input_ids, np.int32)
            lengths[i] = rec.prompt_len
            key[i] = request_key_data(p.seed, req.id)
            temp[i], top_p[i], rep[i], top_k[i], max_new[i] = (p.temperature, p.top_p, p.repetition_penalty,
                                                              p.top_k, p.max_new_tokens)
            ids = self._stop_ids(req, p)
            stop_ids[i, :len(ids)] = ids
            if req.constraint is not None:
                ccon[i], cstate[i] = self.constraints.register(req.constraint)
        rows = RowParams(key=jnp.asarray(key), temperature=jnp.asarray(temp), top_k=jnp.asarray(top_k),
                         top_p=jnp.asarray(top_p), repetition_penalty=jnp.asarray(rep), max_new=jnp.asarray(max_new),
                         stop_ids=jnp.asarray(stop_ids), cstate=jnp.asarray(cstate), ccon=jnp.asarray(ccon))
        tok, lp, code = self.sampler.prefill(self._device_tables(), slots, tokens, lengths, rows)
        out = []
        for i, (slot, rec) in enumerate(items):
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

