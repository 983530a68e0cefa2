"""The supervision model behind the generation stages: model, tokenizer, engine, constraints, runner calls.

Loaded once per process, only when a stage still has requests to run. The engine runs on this process's
local devices (``engine.mesh`` over ``jax.local_devices()``): in a multi-host run every host is an
independent sampler over its own share of characters, so no host waits for another's batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax

from ditto_jax.checkpoints import load_model_source
from ditto_jax.mesh import make_mesh
from ditto_jax.sampling import Request, SamplingEngine, SamplingParams, json_schema_constraint, vocab_constraint
from ditto_jax.sampling.compile_cache import compile_stats, enable_compilation_cache
from ditto_jax.sampling.runner import read_outputs as runner_outputs
from ditto_jax.sampling.runner import run_complete, run_sampling
from ditto_jax.simulation.config import SamplingConfig, SimulateConfig
from ditto_jax.simulation.prompts import Message, ProfileBudget, PromptTooLong, fit_prompt


class Backend:
    """Supervision model + sampling engine of one process."""

    def __init__(self, cfg: SimulateConfig, log: Callable[[str], None] = print, progress: bool = True):
        self.cfg = cfg
        self.log = log
        self.progress = progress
        enable_compilation_cache()  # before the first compilation of the process (JAX decides once)
        devices = jax.local_devices()[: cfg.engine.devices]
        self.mesh = make_mesh(cfg.engine.mesh, devices=devices)
        self.model, self.model_cfg, self.tokenizer = load_model_source(cfg.supervision_model, self.mesh,
                                                                            require_tokenizer=True)
        self.engine = SamplingEngine(self.model, self.tokenizer, cfg.engine.batch_size, cfg.engine.max_len,
                                     mesh=self.mesh)
        self.stop_ids = sorted(self.tokenizer.stop_ids)
        self._constraints: dict[str, Any] = {}
        self.free_text = (vocab_constraint(self.tokenizer, self.model_cfg.vocab_size)
                          if self.model_cfg.vocab_size > self.tokenizer.vocab_size else None)
        self.shortened = 0
        self.last_stats: dict[str, Any] = {}

    def json_constraint(self, schema: dict[str, Any]) -> Any:
        """The (cached) token automaton of a JSON schema for this tokenizer and model vocabulary."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._constraints:
            start = time.perf_counter()
            self._constraints[key] = json_schema_constraint(schema, self.tokenizer, vocab_size=self.model_cfg.vocab_size)
            self.log(f"  query constraint: {self._constraints[key].num_states} states "
                     f"({time.perf_counter() - start:.1f}s)")
        return self._constraints[key]

    def encode(self, messages: list[Message]) -> list[int]:
        """Prompt ids of chat messages, ending with the assistant generation prompt."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]

    def fit(self, build: Callable[[ProfileBudget], list[Message]], intro_chars: int, max_new_tokens: int) -> list[int] | None:
        """Prompt ids with the largest profile that leaves ``max_new_tokens`` of room (None: nothing fits)."""
        limit = self.cfg.engine.max_len - max_new_tokens
        try:
            ids, shortened = fit_prompt(build, self.encode, limit, intro_chars)
        except PromptTooLong:
            return None
        self.shortened += shortened
        return ids

    def request(self, request_id: str, ids: list[int], sampling: SamplingConfig, seed: int, constraint: Any) -> Any:
        """An engine ``Request`` (seeded by ``seed`` folded with ``request_id`` inside the engine); free text
        (``constraint=None``) is kept to the tokenizer's ids."""
        return Request(request_id, ids, sampling_params(sampling, seed, self.stop_ids), constraint or self.free_text)

    def run(self, out_dir: Path, requests: list[Any], process_index: int, process_count: int, desc: str) -> None:
        """Generate every request exactly once into ``out_dir`` with the sampling runner (resumable)."""
        summary = run_sampling(self.engine, requests, out_dir, partition=False, process_index=process_index,
                               process_count=process_count, shard_size=self.cfg.engine.shard_size,
                               flush_seconds=self.cfg.engine.flush_seconds, progress=self.progress, desc=desc,
                               total=len(requests))
        self.last_stats = summary.to_json() | {"engine": self.engine.timing.to_json(), "compile": compile_stats(),
                                               "prefix_cache": self.engine.prefix.stats.to_json()
                                               if self.engine.prefix is not None else None}


def stage_complete(out_dir: Path, process_index: int, process_count: int) -> bool:
    """Whether this process finished its share of a generation stage in a run with the same process count."""
    return run_complete(out_dir, process_index, process_count)


def read_outputs(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every output record of a generation stage (all processes), keyed by request id."""
    return runner_outputs(out_dir) if out_dir.exists() else {}


def sampling_params(s: SamplingConfig, seed: int, stop_ids: Iterable[int], max_new_tokens: int | None = None
                    ) -> SamplingParams:
    """Engine ``SamplingParams`` from a stage's sampling config (the runner folds ``seed`` with each id)."""
    return SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          repetition_penalty=s.repetition_penalty,
                          max_new_tokens=max_new_tokens or s.max_new_tokens, stop_token_ids=sorted(stop_ids),
                          stop_strings=list(s.stop_strings), seed=seed)
