"""``EngineConfig``: the one typed config of a sampling engine (the ``engine:`` section of the simulate and eval
configs; ``sample``, ``serve`` and the benchmarks build one from their flags).

A caller whose defaults differ (eval: ``max_len`` 8192, ``min_bucket`` 64, smaller shards) declares its field
with ``engine_field(**defaults)``: the defaults apply to an absent section and to every key a YAML section
leaves out, so ``engine: {batch_size: 8}`` keeps that caller's other defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic

from ditto_jax.config import StrictModel
from ditto_jax.mesh import MeshConfig


class EngineConfig(StrictModel):
    """Shape of one process's sampling engine (``ditto_jax.sampling.SamplingEngine``) and of its runs.

    ``batch_size`` slots are decoded together, ``chunk`` steps per device call; each slot caches ``max_len``
    tokens (prompt + generated). Prompts are prefilled in power-of-two length buckets from ``min_bucket`` up to
    ``max_len`` (each bucket compiles once: a larger ``min_bucket`` means fewer compilations, more padding).
    Prompt prefixes shared by two or more requests are computed once into ``prefix_cache_rows`` rows of the
    prefix cache (``null``: ``min(batch_size, 8)``; 0 switches it off), in blocks of ``prefix_block`` tokens,
    counting the next ``prefix_lookahead`` queued requests (``null``: ``batch_size``) among the sharers.
    A prompt remainder longer than ``prefill_chunk`` tokens is prefilled in chunks of that size with decode
    steps of the other slots in between (``null``: whole prompts). ``max_top_k``: the largest ``top_k`` a
    request may ask for. ``decode_path``: ``fused`` or ``model``
    (``null``: fused on CPU, the model's own forward elsewhere).

    ``mesh`` spans this process's first ``devices`` local devices (``null``: all of them); ``mesh: null`` runs on
    one device, unsharded. ``compile_cache``: the persistent compilation cache folder (``null``:
    ``$DITTO_JAX_COMPILATION_CACHE``, else the user cache folder; ``off``: none). A resumable run writes an
    output shard every ``shard_size`` results or ``flush_seconds`` (a kill loses at most that much).
    """

    batch_size: int = pydantic.Field(16, ge=1)
    max_len: int = pydantic.Field(4096, ge=16)
    min_bucket: int = pydantic.Field(16, ge=1)
    chunk: int = pydantic.Field(16, ge=1)
    prefix_cache_rows: int | None = pydantic.Field(None, ge=0)
    prefix_block: int = pydantic.Field(16, ge=1)
    prefix_lookahead: int | None = pydantic.Field(None, ge=0)
    prefill_chunk: int | None = pydantic.Field(512, ge=1)
    max_top_k: int = pydantic.Field(64, ge=1)
    decode_path: Literal["fused", "model"] | None = None
    devices: int | None = pydantic.Field(None, ge=1, description="use the first N local devices (None = all)")
    mesh: MeshConfig | None = pydantic.Field(default_factory=MeshConfig)
    compile_cache: str | None = None
    shard_size: int = pydantic.Field(256, ge=1, description="runner: results per output shard")
    flush_seconds: float = pydantic.Field(30.0, ge=0.0, description="runner: write a shard at least this often "
                                          "(a kill loses at most this much generation)")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``SamplingEngine`` (besides model, tokenizer and mesh)."""
        return {"batch_size": self.batch_size, "max_len": self.max_len, "chunk": self.chunk,
                "min_bucket": min(self.min_bucket, self.max_len), "max_top_k": self.max_top_k,
                "decode_path": self.decode_path, "prefix_cache_rows": self.prefix_cache_rows,
                "prefix_block": self.prefix_block, "lookahead": self.prefix_lookahead,
                "prefill_chunk": self.prefill_chunk}


def engine_field(**defaults: Any) -> Any:
    """The type of a config's ``engine:`` field whose defaults differ from ``EngineConfig``'s, e.g.
    ``EvalEngine = engine_field(max_len=8192)`` then ``engine: EvalEngine``: an absent section is
    ``EngineConfig(**defaults)``, and a section's missing keys take ``defaults`` before the class defaults."""
    EngineConfig(**defaults)  # a bad default fails at import, not at the first config

    def fill(value: Any) -> Any:
        return {**defaults, **value} if isinstance(value, dict) else value

    return Annotated[EngineConfig, pydantic.BeforeValidator(fill),
                     pydantic.Field(default_factory=lambda: EngineConfig(**defaults))]
