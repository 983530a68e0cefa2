"""Sampling: jitted prefill + decode over a donated KV cache, continuous batching, a prefix cache, constraints,
resumable runs.

```python
from ditto_jax.sampling import SamplingEngine, Request, SamplingParams
engine = SamplingEngine(model, tokenizer, batch_size=16, max_len=2048, mesh=mesh)
for result in engine.generate(Request(id, ids, SamplingParams(top_p=0.8, repetition_penalty=1.1)) for ...):
    ...
```

Modules: ``engine`` (``SamplingEngine``: scheduling, prefix-cache planning, the incremental API for servers),
``sampler`` (device slots, jitted prefill / prefix fill / decode over the model's public API), ``prefix_cache``
(host index of pooled prefixes), ``logits`` (penalties, top-k/top-p), ``constraints``, ``runner`` (exactly-once
resumable runs), ``inputs`` (prompt files), ``compile_cache`` (persistent compilation cache, compile meter).
"""

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
from ditto_jax.sampling.params import Request, Result, SamplingParams

__all__ = [
    "Constraint", "Request", "Result", "SamplingEngine", "SamplingParams", "choice_constraint", "integer_constraint",
    "json_schema_constraint", "json_schema_regex", "regex_constraint",
    "vocab_constraint",
]
