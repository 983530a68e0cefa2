"""The supervision model behind the generation stages: one interface, two implementations.

The stages (``simulation/stages.py``) only call ``json_constraint``, ``fit``, ``request``, ``run`` and
``prompt_stats``, and read ``last_stats`` / ``shortened``; what a prompt, a request and a constraint are is the
backend's business:

* ``LocalBackend`` (a ``ModelSource``): model, tokenizer and sampling engine of this process. Prompts are token
  ids rendered with the chat template; the profile shrinks (``prompts.fit_prompt``) until prompt +
  ``max_new_tokens`` fit ``engine.max_len``; the query stage decodes under the JSON schema's token automaton, so
  a finished output always parses. The engine runs on this process's local devices (``engine.mesh`` over
  ``jax.local_devices()``): in a multi-host run every host is an independent sampler over its own share of
  characters, so no host waits for another's batches.
* ``EndpointBackend`` (an ``EndpointSource``, ``{endpoint, model, api_key_env}``): chat messages sent through
  ``EndpointEngine`` (concurrency limit, the client's retries with exponential backoff, the resumable journal
  ``WORKDIR/endpoint_cache/``). There is no tokenizer here, so the profile budget is by characters: the
  introduction is cut at ``max_profile_chars`` (at a sentence end) and the endpoint's context window is trusted —
  a prompt the server refuses fails that request, which is counted (``endpoint_error``). No token automaton over
  HTTP: the query prompt already asks for the JSON; with ``queries.response_format: json_schema`` the schema is
  also sent as OpenAI's structured-output ``response_format`` (``ditto-jax serve`` and vLLM honour it; OpenAI's
  own API wants an object at the root, so leave it ``none`` there), otherwise unparsable outputs are re-asked
  (``queries.attempts``) and counted (``format``). Sent: temperature, top-p, max_tokens, stop strings and the
  seed folded with the request id; ``top_k`` and ``repetition_penalty`` have no OpenAI field and are not sent.

Both are loaded once per process, only when a stage still has requests to run, and each process asks only for
its own characters' requests (the stages pass this process's share).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ditto_jax.sampling import Request, load_engine
from ditto_jax.sampling.endpoint import ChatRequest, EndpointEngine, is_endpoint
from ditto_jax.sampling.runner import read_outputs as runner_outputs
from ditto_jax.sampling.runner import run_complete, run_sampling
from ditto_jax.simulation.config import SamplingConfig, SimulateConfig
from ditto_jax.simulation.prompts import Message, ProfileBudget, PromptTooLong, fit_prompt

ENDPOINT_CACHE = "endpoint_cache"  # WORKDIR/endpoint_cache/: the endpoint journal (answers never asked twice)


def make_backend(cfg: SimulateConfig, workdir: Path, process_index: int, log: Callable[[str], None] = print,
                 progress: bool = True) -> "LocalBackend | EndpointBackend":
    """The backend of ``cfg.supervision_model``: an endpoint or a local model."""
    if is_endpoint(cfg.supervision_model):
        return EndpointBackend(cfg, workdir / ENDPOINT_CACHE, process_index, log=log, progress=progress)
    return LocalBackend(cfg, log=log, progress=progress)


class LocalBackend:
    """Supervision model + sampling engine of one process (``ditto_jax.sampling.load_engine``)."""

    def __init__(self, cfg: SimulateConfig, log: Callable[[str], None] = print, progress: bool = True):
        self.cfg = cfg
        self.log = log
        self.progress = progress
        self.loaded = load_engine(cfg.supervision_model, cfg.engine, require_tokenizer=True)
        self.tokenizer = self.loaded.tokenizer
        self.shortened = 0
        self.last_stats: dict[str, Any] = {}

    def json_constraint(self, schema: dict[str, Any]) -> Any:
        """The (cached) token automaton of a JSON schema for this tokenizer and model vocabulary."""
        built = len(self.loaded.constraints)
        start = time.perf_counter()
        constraint = self.loaded.json_constraint(schema)
        if len(self.loaded.constraints) > built:
            self.log(f"  query constraint: {constraint.num_states} states ({time.perf_counter() - start:.1f}s)")
        return constraint

    def encode(self, messages: list[Message]) -> list[int]:
        """Prompt ids of chat messages, ending with the assistant generation prompt."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]

    def fit(self, build: Callable[[ProfileBudget], list[Message]], intro_chars: int, max_new_tokens: int) -> list[int] | None:
        """Prompt ids with the largest profile that leaves ``max_new_tokens`` of room (None: nothing fits)."""
        limit = self.loaded.config.max_len - max_new_tokens
        try:
            ids, shortened = fit_prompt(build, self.encode, limit, intro_chars)
        except PromptTooLong:
            return None
        self.shortened += shortened
        return ids

    def request(self, request_id: str, ids: list[int], sampling: SamplingConfig, seed: int, constraint: Any) -> Any:
        """An engine ``Request`` (seeded by ``seed`` folded with ``request_id`` inside the engine); free text
        (``constraint=None``) is kept to the tokenizer's ids."""
        return Request(request_id, ids, sampling.for_request(seed + sampling.seed, self.loaded.stop_ids),
                       constraint or self.loaded.free_text)

    def run(self, out_dir: Path, requests: list[Any], process_index: int, process_count: int, desc: str) -> None:
        """Generate every request exactly once into ``out_dir`` with the sampling runner (resumable)."""
        summary = self.loaded.run(requests, out_dir, partition=False, process_index=process_index,
                                  process_count=process_count, progress=self.progress, desc=desc, total=len(requests))
        self.last_stats = summary.to_json() | self.loaded.stats()

    @staticmethod
    def prompt_stats(requests: list[Any]) -> dict[str, Any]:
        """Size of this process's prompts of a stage."""
        return {"assigned_prompt_tokens": sum(len(r.input_ids) for r in requests)}


class EndpointBackend:
    """The supervision model behind an OpenAI-compatible endpoint (see the module docstring for the rules)."""

    def __init__(self, cfg: SimulateConfig, cache_dir: Path, process_index: int, log: Callable[[str], None] = print,
                 progress: bool = True):
        self.cfg = cfg
        self.log = log
        self.progress = progress
        self.engine = EndpointEngine(cfg.supervision_model, cache_dir, process_index=process_index)
        self.shortened = 0  # never: the profile budget is the configured characters
        self.last_stats: dict[str, Any] = {}

    def json_constraint(self, schema: dict[str, Any]) -> dict[str, Any] | None:
        """The structured-output ``response_format`` of a JSON schema (``queries.response_format: json_schema``),
        else ``None``: the prompt's instructions, the parse and the re-asks do the work."""
        if self.cfg.queries.response_format != "json_schema":
            return None
        return {"type": "json_schema", "json_schema": {"name": "questions", "schema": schema}}

    def fit(self, build: Callable[[ProfileBudget], list[Message]], intro_chars: int, max_new_tokens: int
            ) -> list[Message]:
        """The chat messages with the introduction cut at ``intro_chars`` characters (no tokenizer here)."""
        return build(ProfileBudget(intro_chars))

    def request(self, request_id: str, messages: list[Message], sampling: SamplingConfig, seed: int,
                constraint: dict[str, Any] | None) -> ChatRequest:
        """A ``ChatRequest`` (``seed`` is folded with ``request_id`` by the endpoint engine)."""
        return ChatRequest(request_id, messages, sampling.for_request(seed + sampling.seed), response_format=constraint)

    def run(self, out_dir: Path, requests: list[Any], process_index: int, process_count: int, desc: str) -> None:
        """Answer every request exactly once into ``out_dir`` (the runner's shards; the journal behind them)."""
        before = self.engine.stats()
        summary = run_sampling(self.engine, requests, out_dir, partition=False, process_index=process_index,
                               process_count=process_count, shard_size=self.cfg.engine.shard_size,
                               flush_seconds=self.cfg.engine.flush_seconds, progress=self.progress, desc=desc,
                               total=len(requests))
        after = self.engine.stats()
        errors = {k: v - before["errors"].get(k, 0) for k, v in after["errors"].items()
                  if v - before["errors"].get(k, 0)}
        endpoint = {k: after[k] - before[k] for k in ("asked", "journal_hits", "failed", "generated_tokens")}
        self.last_stats = summary.to_json() | {"endpoint": endpoint | {"errors": errors}}
        if endpoint["failed"]:
            self.log(f"  {desc}: {endpoint['failed']} request(s) failed after retries {errors} (counted as "
                     f"endpoint_error in the report)")

    @staticmethod
    def prompt_stats(requests: list[Any]) -> dict[str, Any]:
        """Size of this process's prompts of a stage (characters: no tokenizer here)."""
        return {"assigned_prompt_chars": sum(len(m["content"]) for r in requests for m in r.messages)}


def stage_complete(out_dir: Path, process_index: int, process_count: int) -> bool:
    """Whether this process finished its share of a generation stage in a run with the same process count."""
    return run_complete(out_dir, process_index, process_count)


def read_outputs(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every output record of a generation stage (all processes), keyed by request id."""
    return runner_outputs(out_dir) if out_dir.exists() else {}


