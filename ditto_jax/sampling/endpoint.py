"""Models behind an OpenAI-compatible HTTP endpoint, as a drop-in engine for the resumable runner.

A config names such a model as ``{endpoint: URL, model: NAME, api_key_env: VAR}`` (``EndpointSource``) wherever
a local ``ModelSource`` is accepted (eval judge and candidates, simulation's supervision model): the config type
is ``AnyModel``, the one union of both. The key is read
from the environment variable ``api_key_env`` when the client is built and is never stored: configs and reports
hold only the variable's name.

``EndpointEngine`` has the two things ``run_sampling`` uses from an engine — ``generate(requests)`` yielding
``Result``s and a ``generated_tokens`` counter — so stages run unchanged over it. Requests carry chat
``messages`` (``ChatRequest``) instead of token ids. Requests run on a thread pool of ``concurrency`` workers
through the official ``openai`` client, whose own retry loop (``max_retries``, exponential backoff with jitter)
covers connection errors, timeouts, 408/409/429 and 5xx. A request that still fails is yielded with ``text``
``None`` and its error recorded (``Result.error``), never dropped. A request's ``seed`` is folded with its id
(``request_seed``), as the local engine does, so samples of the same prompt under different ids differ.

Resumable: every answer is appended to a journal (``cache_dir/<model>.jsonl``, one fsynced line per answer)
keyed by a hash of (model, messages, sampling settings, response format, request id); after a crash a re-run
answers every journalled request from it and asks the endpoint only for the rest — an answered request is never
asked again. With several processes each appends to its own file (``<model>.pNNNNN.jsonl``) and reads all of them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import openai
import pydantic

from ditto_jax.checkpoints import ModelSource
from ditto_jax.config import ConfigError, StrictModel
from ditto_jax.sampling.params import Result, SamplingParams

Message = dict[str, str]


class EndpointSource(StrictModel):
    """A model served by an OpenAI-compatible endpoint.

    ``endpoint``: the API base URL (e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``);
    ``model``: the served model's name; ``api_key_env``: the environment variable holding the key (``null``: no
    key, for local servers). ``concurrency``: requests in flight at once; ``max_retries``: the client's retries
    (exponential backoff) on timeouts, 429 and 5xx; ``timeout``: seconds per attempt.
    """

    endpoint: str = pydantic.Field(pattern=r"^https?://")
    model: str = pydantic.Field(min_length=1)
    api_key_env: str | None = pydantic.Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    concurrency: int = pydantic.Field(8, ge=1, le=256)
    max_retries: int = pydantic.Field(6, ge=0)
    timeout: float = pydantic.Field(600.0, gt=0)

    def describe(self) -> str:
        """One line for logs and reports (never the key)."""
        return f"endpoint {self.endpoint} model {self.model}"


AnyModel = ModelSource | EndpointSource
"""A local model (checkpoint or random init) or an OpenAI-compatible endpoint (``{endpoint, model, api_key_env}``)."""


def is_endpoint(source: Any) -> bool:
    """Whether a model entry is an ``EndpointSource``."""
    return isinstance(source, EndpointSource)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion to ask for: id, messages, sampling settings (temperature, top-p, max tokens, seed
    folded with the id, stop strings are sent; top-k, repetition penalty and token constraints have no OpenAI-API
    equivalent and are not sent) and an optional ``response_format`` (e.g. ``{"type": "json_schema", ...}``,
    for servers that offer structured output)."""

    id: str
    messages: Sequence[Message]
    params: SamplingParams | None = None
    response_format: dict[str, Any] | None = None


@dataclasses.dataclass
class EndpointResult(Result):
    """A ``Result`` from an endpoint (no token ids); ``error`` when every retry failed."""

    error: str | None = None

    def to_json(self, with_logprobs: bool = False) -> dict[str, Any]:
        rec = super().to_json(with_logprobs)
        if self.error:
            rec["error"] = self.error
        return rec


def api_key(source: EndpointSource) -> str:
    """The key from the environment (``"EMPTY"`` for a keyless endpoint); a clear error when the variable is
    unset. The value is only handed to the client, never stored."""
    if source.api_key_env is None:
        return "EMPTY"
    value = os.environ.get(source.api_key_env)
    if not value:
        raise ConfigError(f"endpoint {source.endpoint}: environment variable {source.api_key_env} (api_key_env) "
                         f"is not set")
    return value


def request_seed(seed: int, request_id: str) -> int:
    """The seed sent for one request: ``seed`` folded with the request id (a 31-bit integer), so requests that
    differ only in id (re-asks, judge samples) sample differently and a re-run sends the same seed."""
    digest = hashlib.sha256(f"{seed}\x00{request_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _request_key(source: EndpointSource, req: ChatRequest) -> str:
    params = (req.params or SamplingParams()).model_dump(mode="json")
    parts: list[Any] = [source.endpoint, source.model, req.id, list(req.messages), params]
    if req.response_format is not None:  # keys of requests without one stay as before (existing journals)
        parts.append(req.response_format)
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Journal:
    """Append-only answers of one endpoint model (one JSON line per answer, flushed and fsynced). ``path`` is
    the file this process appends to; ``read`` (default: ``path`` alone) every file whose answers count."""

    def __init__(self, path: str | Path, read: Sequence[Path] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, dict[str, Any]] = {}
        for src in (read if read is not None else [self.path]):
            if not src.exists():
                continue
            for line in src.read_text(encoding="utf-8").splitlines():
                try:  # a crash mid-write leaves at most a partial last line: that answer is asked again
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self.entries[rec["key"]] = rec
        self._lock = threading.Lock()

    def add(self, key: str, rec: dict[str, Any]) -> None:
        """Record one answer durably."""
        line = json.dumps({"key": key, **rec}, ensure_ascii=False) + "\n"
        with self._lock:
            self.entries[key] = rec
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


class EndpointEngine:
    """Chat completions from an OpenAI-compatible endpoint with the sampling engine's ``generate`` interface."""

    def __init__(self, source: EndpointSource, cache_dir: str | Path | None = None, process_index: int | None = None):
        self.source = source
        self.client = openai.OpenAI(base_url=source.endpoint, api_key=api_key(source),
                                    max_retries=source.max_retries, timeout=source.timeout)
        name = hashlib.sha256(f"{source.endpoint}\x00{source.model}".encode()).hexdigest()[:16]
        self.journal = None
        if cache_dir is not None:
            cache = Path(cache_dir)
            if process_index is None:
                self.journal = Journal(cache / f"{name}.jsonl")
            else:
                self.journal = Journal(cache / f"{name}.p{process_index:05d}.jsonl",
                                       read=sorted([*cache.glob(f"{name}.jsonl"), *cache.glob(f"{name}.p*.jsonl")]))
        self.generated_tokens = 0
        self.asked = 0  # requests sent to the endpoint by this engine (journal hits excluded)
        self.journal_hits = 0  # requests answered from the journal
        self.failed = 0  # requests that failed after the client's retries (yielded with ``error``)
        self.errors: collections.Counter = collections.Counter()  # failures by exception type
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        """Counters for run reports: asked, answered from the journal, failed (by error type), tokens."""
        return {"asked": self.asked, "journal_hits": self.journal_hits, "failed": self.failed,
                "errors": dict(sorted(self.errors.items())), "generated_tokens": self.generated_tokens}

    def _ask(self, req: ChatRequest) -> EndpointResult:
        p = req.params or SamplingParams()
        kwargs: dict[str, Any] = {"model": self.source.model, "messages": list(req.messages),
                                  "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_new_tokens,
                                  "seed": request_seed(p.seed, req.id)}
        if p.stop_strings:
            kwargs["stop"] = list(p.stop_strings)
        if req.response_format is not None:
            kwargs["response_format"] = req.response_format
        with self._lock:
            self.asked += 1
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except openai.OpenAIError as exc:
            # the client already retried transient failures; a 4xx or exhausted retries end here
            with self._lock:
                self.failed += 1
                self.errors[type(exc).__name__] += 1
            return EndpointResult(req.id, [], None, [], "stop", error=f"{type(exc).__name__}: {exc}"[:500])
        choice = resp.choices[0]
        text = choice.message.content or ""
        finish = "length" if choice.finish_reason == "length" else "stop"
        tokens = resp.usage.completion_tokens if resp.usage is not None else 0
        with self._lock:
            self.generated_tokens += int(tokens or 0)
        return EndpointResult(req.id, [], text, [], finish)

    def generate(self, requests: Iterable[ChatRequest]) -> Iterator[EndpointResult]:
        """Answer every request (completion order); journalled answers are returned without asking."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.source.concurrency)
        pending: dict[concurrent.futures.Future, tuple[str, ChatRequest]] = {}
        it = iter(requests)
        try:
            while True:
                while len(pending) < 2 * self.source.concurrency:
                    req = next(it, None)
                    if req is None:
                        break
                    key = _request_key(self.source, req)
                    hit = self.journal.entries.get(key) if self.journal is not None else None
                    if hit is not None:
                        self.journal_hits += 1
                        yield EndpointResult(req.id, [], hit.get("text"), [], hit.get("finish_reason", "stop"))
                        continue
                    pending[pool.submit(self._ask, req)] = (key, req)
                if not pending:
                    return
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    key, _req = pending.pop(fut)
                    result = fut.result()
                    if self.journal is not None and result.error is None:
                        self.journal.add(key, {"id": result.id, "text": result.text,
                                               "finish_reason": result.finish_reason})
                    yield result
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
