"""Sampling: jitted prefill + decode over a donated KV cache, continuous batching, a prefix cache, constraints,
resumable runs.

```python
from ditto_jax.sampling import EngineConfig, Request, SamplingParams, load_engine
loaded = load_engine(ModelSource(path=...), EngineConfig(batch_size=16, max_len=2048))
for result in loaded.engine.generate(Request(id, ids, SamplingParams(top_p=0.8, repetition_penalty=1.1)) for ...):
    ...
```

Modules: ``config`` (``EngineConfig``: the one engine config), ``loaded`` (``load_engine`` -> ``LoadedEngine``:
model, tokenizer, engine, constraints, runs and their statistics), ``engine`` (``SamplingEngine``: scheduling,
prefix-cache planning, the incremental API for servers), ``sampler`` (device slots, jitted prefill / prefix fill / decode over the model's public API), ``prefix_cache``
(host index of pooled prefixes), ``logits`` (penalties, top-k/top-p), ``constraints``, ``runner`` (exactly-once
resumable runs), ``inputs`` (prompt files), ``compile_cache`` (persistent compilation cache, compile meter).
"""

from ditto_jax.sampling.config import EngineConfig, engine_field
from ditto_jax.sampling.constraints import (
                                            Constraint,
                                            choice_constraint,
                                            integer_constraint,
                                            json_schema_constraint,
                                            json_schema_regex,
                                            regex_constraint,
                                            vocab_constraint,
)
from ditto_jax.sampling.engine import SamplingEngine
from ditto_jax.sampling.loaded import LoadedEngine, load_engine
from ditto_jax.sampling.params import PaperSampling, Request, Result, SamplingParams

__all__ = [
    "Constraint", "EngineConfig", "LoadedEngine", "PaperSampling", "Request", "Result", "SamplingEngine",
    "SamplingParams",
    "choice_constraint", "engine_field", "integer_constraint", "json_schema_constraint", "json_schema_regex",
    "load_engine", "regex_constraint", "vocab_constraint",
]
