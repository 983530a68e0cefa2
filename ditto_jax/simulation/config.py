"""The ``ditto-jax simulate`` config schema (``configs/simulate/*.yaml``).

Two model entries, as in the paper's cross-supervision experiment (§6): ``supervision_model`` writes the data
(queries and responses); ``seed_model`` is the model that will be fine-tuned on it. Simulation only records the
seed model (in ``WORKDIR/simulation_report.json`` and ``WORKDIR/seed_model.yaml``); the SFT config names the
same entry as its ``model`` (see ``configs/simulate/qwen2.5-7b.yaml``). Self-alignment (Ditto proper) is the
case where both entries are equal. ``supervision_model`` may also be an OpenAI-compatible endpoint,
``{endpoint: URL, model: NAME, api_key_env: VAR}`` (see ``ditto_jax.simulation.backend`` for what changes:
prompts as chat messages budgeted by characters, no token automaton, repetition penalty and top-k not sent).
"""

from __future__ import annotations

from typing import Literal

import pydantic

from ditto_jax.checkpoints import ModelSource
from ditto_jax.config import StrictModel
from ditto_jax.sampling import PaperSampling
from ditto_jax.sampling.config import EngineConfig
from ditto_jax.sampling.endpoint import AnyModel


class SamplingConfig(PaperSampling):
    """Sampling of one generation stage: the sampling module's ``SamplingParams`` with the paper's defaults (top-p
    0.8, repetition penalty 1.1, 2,048 tokens). Each request's seed is the run's ``seed:`` plus this ``seed``
    (default 0), folded with the request id; ``stop_token_ids`` are added to the tokenizer's."""


class CharactersConfig(StrictModel):
    """Which characters to simulate: a knowledge-base file (``null`` = the embedded default) and a selection."""

    path: str | None = None
    split: Literal["train", "heldout", "all"] = "train"
    langs: list[Literal["en", "zh"]] = pydantic.Field(default_factory=lambda: ["en", "zh"])
    ids: list[str] = pydantic.Field(default_factory=list, description="explicit ids (empty = every match)")
    limit_per_lang: int | None = pydantic.Field(None, ge=1, description="first N per language, by id")


class PartnersConfig(StrictModel):
    """How each character A gets its partner B.

    ``random`` is the paper's choice. ``far`` prefers a partner far from A in era (years/period) and domain,
    which makes contrastive queries clearly out of A's knowledge. Partners are a matching (A's partner is B and
    B's is A), so one pair of prompts gives both characters their role-specific and contrastive queries.
    ``rounds`` > 1 draws a new matching per round: one more session per character per round.
    """

    strategy: Literal["random", "far"] = "random"
    rounds: int = pydantic.Field(1, ge=1)
    same_language: bool = True


class QueriesConfig(StrictModel):
    """Query simulation: ``num_questions`` questions per directed pair, JSON-schema constrained (a local model).

    ``response_format`` matters only for an endpoint supervision model: ``json_schema`` sends the question schema
    as OpenAI's structured-output ``response_format`` (``ditto-jax serve`` and vLLM decode under it); ``none``
    (default; OpenAI's API wants an object at the schema root) relies on the prompt's instructions, the parse
    and ``attempts`` re-asks."""

    num_questions: int = pydantic.Field(3, ge=1, le=10)
    attempts: int = pydantic.Field(3, ge=1, description="resample an unparsable (truncated) output this often")
    min_question_chars: int = pydantic.Field(5, ge=1)
    max_question_chars: int = pydantic.Field(200, ge=2)
    max_profile_chars: int = pydantic.Field(3000, ge=100, description="introduction text cut at a sentence")
    response_format: Literal["none", "json_schema"] = "none"
    sampling: SamplingConfig = pydantic.Field(default_factory=lambda: SamplingConfig(max_new_tokens=512))

    @pydantic.model_validator(mode="after")
    def _lengths(self) -> "QueriesConfig":
        if self.min_question_chars > self.max_question_chars:
            raise ValueError("min_question_chars must be <= max_question_chars")
        return self


class ResponsesConfig(StrictModel):
    """Response simulation: each query answered from the profile, independently (paper) or in dialogue."""

    context: Literal["independent", "dialogue"] = "independent"
    max_profile_chars: int = pydantic.Field(3000, ge=100)
    sampling: SamplingConfig = pydantic.Field(default_factory=SamplingConfig)


class FiltersConfig(StrictModel):
    """Quality filters over simulated turns; every drop is counted by reason in the report."""

    min_query_chars: int = pydantic.Field(5, ge=0)
    min_response_chars: int = pydantic.Field(10, ge=0)
    max_response_chars: int = pydantic.Field(6000, ge=1)
    drop_truncated: bool = pydantic.Field(True, description="drop answers cut by max_new_tokens (over-long)")
    dedupe_queries: bool = True
    character_breaks: bool = True
    language: bool = True
    min_language_ratio: float = pydantic.Field(
        0.5, ge=0.0, le=1.0, description="share of letters in the session's script (CJK for zh, Latin for en)"
    )


class SessionsConfig(StrictModel):
    """Session assembly: turns mix role-specific and contrastive queries (seeded order)."""

    order: Literal["interleave", "shuffle"] = "interleave"
    min_turns: int = pydantic.Field(1, ge=1)
    evidence_k: int = pydantic.Field(3, ge=0, description="profile facts kept as evidence per user turn")


class CorpusConfig(StrictModel):
    """Corpus output: JSONL shards under ``WORKDIR/corpus`` and the TFDS dataset under ``WORKDIR/tfds``."""

    sessions_per_shard: int = pydantic.Field(1000, ge=1)
    validation_fraction: float = pydantic.Field(0.05, ge=0.0, lt=1.0)
    tfds: bool = True


class SimulateConfig(StrictModel):
    """Everything ``ditto-jax simulate`` needs."""

    seed: int = 0
    supervision_model: AnyModel
    seed_model: ModelSource
    characters: CharactersConfig = pydantic.Field(default_factory=CharactersConfig)
    partners: PartnersConfig = pydantic.Field(default_factory=PartnersConfig)
    queries: QueriesConfig = pydantic.Field(default_factory=QueriesConfig)
    responses: ResponsesConfig = pydantic.Field(default_factory=ResponsesConfig)
    filters: FiltersConfig = pydantic.Field(default_factory=FiltersConfig)
    sessions: SessionsConfig = pydantic.Field(default_factory=SessionsConfig)
    engine: EngineConfig = pydantic.Field(default_factory=EngineConfig)
    """The supervision model's sampling engine on each process (``ditto_jax.sampling.EngineConfig``: slots, cache
    length, mesh over the process's local devices, runner shards); unused by an endpoint, except ``shard_size`` and
    ``flush_seconds`` of the resumable runs."""
    corpus: CorpusConfig = pydantic.Field(default_factory=CorpusConfig)
