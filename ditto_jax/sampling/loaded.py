"""``load_engine``: a model source and an ``EngineConfig`` to one ``LoadedEngine`` — model, model config,
tokenizer, ``SamplingEngine``, stop ids, the free-text vocabulary constraint, cached decoding constraints,
resumable runs and the run-summary statistics. Every caller that samples (``sample``, ``serve``/``chat``,
simulation, evaluation, ``bench sample``) gets its engine here.

```python
loaded = load_engine(ModelSource(path="runs/sft/export/hf"), EngineConfig(batch_size=8, max_len=2048))
summary = loaded.run(requests, out_dir)          # resumable, exactly once (``runner.run_sampling``)
report = summary.to_json() | loaded.stats()      # engine timing, compile time, prefix-cache counters
```

The persistent compilation cache is switched on (``EngineConfig.compile_cache``) before the model loads:
JAX decides once per process, at its first compilation, whether it uses the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax

from ditto_jax.checkpoints import ModelSource, load_model_source
from ditto_jax.mesh import make_mesh
from ditto_jax.model import decode_matmul_kind
from ditto_jax.sampling.compile_cache import compile_stats, enable_compilation_cache, preload_saved
from ditto_jax.sampling.config import EngineConfig
from ditto_jax.sampling.constraints import Constraint, json_schema_constraint, vocab_constraint
from ditto_jax.sampling.engine import SamplingEngine
from ditto_jax.sampling.params import Request
from ditto_jax.sampling.runner import RunSummary, run_sampling

MaxLen = Callable[[Any, Any], int]
"""``(model_config, tokenizer) -> max_len``: a cache length that depends on the loaded model (its position
limit) or on prompts read with its tokenizer."""


@dataclasses.dataclass
class LoadedEngine:
    """A loaded model with its tokenizer and sampling engine.

    ``config`` is the engine config actually used (``max_len`` resolved). ``load_s``: seconds spent loading the
    weights and building the engine (compilations come later, at the first requests).
    """

    source: ModelSource
    config: EngineConfig
    model: Any
    model_cfg: Any
    tokenizer: Any
    engine: SamplingEngine
    mesh: Any = None
    load_s: float = 0.0
    constraints: dict[Any, Constraint] = dataclasses.field(default_factory=dict)

    @property
    def stop_ids(self) -> list[int]:
        """The tokenizer's end-of-sequence and end-of-turn ids, sorted (empty without a tokenizer)."""
        return sorted(int(t) for t in self.tokenizer.stop_ids) if self.tokenizer is not None else []

    @functools.cached_property
    def free_text(self) -> Constraint | None:
        """A constraint keeping free text to the tokenizer's ids when the model's embedding has more rows (a
        random-init model samples them, and their text cannot be decoded); None when they agree."""
        if self.tokenizer is None or self.model_cfg.vocab_size <= self.tokenizer.vocab_size:
            return None
        return vocab_constraint(self.tokenizer, self.model_cfg.vocab_size)

    def constraint(self, key: Any, build: Callable[[], Constraint]) -> Constraint:
        """A decoding constraint built once per loaded model: the engine registers constraints by identity, so
        reusing the object keeps its device tables (and compiled shapes) from growing with every stage."""
        if key not in self.constraints:
            self.constraints[key] = build()
        return self.constraints[key]

    def json_constraint(self, schema: dict[str, Any]) -> Constraint:
        """The (cached) token automaton of a JSON schema for this tokenizer and the model's vocabulary."""
        return self.constraint(("json", json.dumps(schema, sort_keys=True)),
                               lambda: json_schema_constraint(schema, self.tokenizer,
                                                              vocab_size=self.model_cfg.vocab_size))

    def run(self, requests: Iterable[Request], out_dir: str | Path, **kwargs: Any) -> RunSummary:
        """``runner.run_sampling`` on this engine, writing shards every ``config.shard_size`` results or
        ``config.flush_seconds`` unless ``kwargs`` say otherwise (see ``run_sampling`` for the rest)."""
        kwargs.setdefault("shard_size", self.config.shard_size)
        kwargs.setdefault("flush_seconds", self.config.flush_seconds)
        return run_sampling(self.engine, requests, out_dir, **kwargs)

    def stats(self) -> dict[str, Any]:
        """For run summaries: ``load_s``, ``engine`` (prefill / prefix fill / decode seconds and counts,
        ``EngineTiming``), ``compile`` (process-wide compile seconds and persistent-cache hits,
        ``compile_cache.compile_stats``), ``prefix_cache`` (hits, tokens saved; None when off) and
        ``decode_matmul`` (``model.decode_matmul_kind``: the CPU few-row kernel or XLA's dot, and why)."""
        prefix = self.engine.prefix
        return {"load_s": round(self.load_s, 3), "engine": self.engine.timing.to_json(), "compile": compile_stats(),
                "prefix_cache": prefix.stats.to_json() if prefix is not None else None,
                "decode_matmul": decode_matmul_kind(self.engine.sampler.decode_weights)}


def engine_mesh(cfg: EngineConfig) -> Any:
    """The mesh of ``cfg``: ``cfg.mesh`` over this process's first ``cfg.devices`` local devices; None when
    ``cfg.mesh`` is None (one device, unsharded)."""
    if cfg.mesh is None:
        return None
    return make_mesh(cfg.mesh, devices=jax.local_devices()[: cfg.devices])


def load_engine(source: ModelSource, cfg: EngineConfig, *, mesh: Any = None, require_tokenizer: bool = False,
                max_len: MaxLen | None = None, **engine_kwargs: Any) -> LoadedEngine:
    """Load ``source`` and build its ``SamplingEngine`` as ``cfg`` says.

    Args:
      source: the model (checkpoint of any kind, or a random-init preset).
      cfg: engine shape, mesh, compilation cache and run sharding.
      mesh: a mesh to use instead of ``cfg``'s (several models sharing one); default ``engine_mesh(cfg)``.
      require_tokenizer: a source without a tokenizer is an error naming the missing files (before any weight
        is read); otherwise its tokenizer is None (token-id prompts only, no text).
      max_len: resolves the cache length from the loaded model config and tokenizer, replacing ``cfg.max_len``
        (the returned ``config`` holds the value used).
      engine_kwargs: further ``SamplingEngine`` arguments (``prefill_batch``, ``default_params``, ...).
    """
    enable_compilation_cache(cfg.compile_cache)  # before anything compiles (JAX decides once per process)
    start = time.perf_counter()
    if mesh is None:
        mesh = engine_mesh(cfg)
    preload_saved()  # the saved step executables load meanwhile
    model, model_cfg, tokenizer = load_model_source(source, mesh, require_tokenizer=require_tokenizer)
    if max_len is not None:
        cfg = cfg.model_copy(update={"max_len": int(max_len(model_cfg, tokenizer))})
    engine = SamplingEngine(model, tokenizer, mesh=mesh, **(cfg.engine_kwargs() | engine_kwargs))
    return LoadedEngine(source=source, config=cfg, model=model, model_cfg=model_cfg, tokenizer=tokenizer,
                        engine=engine, mesh=mesh, load_s=time.perf_counter() - start)
