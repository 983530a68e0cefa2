"""The ``ditto-jax eval`` config schema (``configs/eval/*.yaml``).

One or more ``candidates`` (models under test, e.g. the seed model and its Ditto fine-tune) answer the same test
sessions; one ``judge`` scores every answer. Each candidate gets ``WORKDIR/runs/<name>/report.json``; the first
candidate's report is also ``WORKDIR/report.json`` (DESIGN.md's contract) and ``WORKDIR/report.md`` shows all
candidates side by side.
"""

from __future__ import annotations

from typing import Literal

import pydantic

from ditto_jax.config import StrictModel
from ditto_jax.sampling import PaperSampling
from ditto_jax.sampling.config import engine_field
from ditto_jax.sampling.endpoint import AnyModel


class AnswerSampling(PaperSampling):
    """Candidate sampling: the paper's decoding (``sampling.PaperSampling``: top-p 0.8, repetition penalty 1.1),
    answers up to 1,024 tokens; ``seed`` and ``stop_token_ids`` (added to the tokenizer's) apply to every answer."""

    max_new_tokens: int = pydantic.Field(1024, ge=1)


class CandidateConfig(StrictModel):
    """A model under test: a short ``name`` (a folder name and the report's row label) and its source."""

    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=64)
    model: AnyModel


EvalEngine = engine_field(max_len=8192, min_bucket=64, shard_size=64, flush_seconds=10.0)
"""The ``engine:`` section (``ditto_jax.sampling.EngineConfig``, shared by the candidates and the judge) with
evaluation's defaults: 8,192-token cache (the paper's sequence length), prompt buckets from 64, a shard every 64
results or 10 s. ``mesh: null`` runs on one device, unsharded."""


class JudgeConfig(StrictModel):
    """The judge model and how it is asked.

    ``protocol``: ``reference`` (default: the paper's prompt structure and answer formats, free reasoning before
    the verdict; see ``ditto_jax.eval.judge``) or ``terse`` (one letter / number / 0-1, for cheap smoke runs).
    ``samples``: judgements per turn and metric (paper: 3 at temperature 0.2). ``max_new_tokens``: the free
    text's budget (``null``: 512 for ``reference``, 4 for ``terse``). ``constrained``: ``terse`` decodes the whole
    output under the format's regex; ``reference`` decodes rejection's 0/1 under it and, for a sample whose free
    text ends without a parsable verdict, forces only the final sentence/line (a local judge; an endpoint judge
    cannot be constrained, its unparsable samples are counted). ``analysis_lead``: a local judge's turn under
    ``reference`` starts with ``judge.ANALYSIS_LEAD`` ("Let me analyse the reply step by step.", "Analysis:"), so
    a small judge reasons before its verdict (an endpoint judge: no lead). ``rejection_tie``: how a tied refusal vote
    resolves (``first``: the first sample's vote, as the reference; see ``ditto_jax.eval.metrics``).
    ``knowledge_turns``: ``all`` turns (paper) or only ``answerable`` ones (rejection label 0). ``max_*_chars``:
    text cut before it enters a judge prompt; a prompt still longer than the engine's ``max_len`` is shortened
    further, then counted as ``too_long`` if it cannot fit.
    """

    model: AnyModel
    protocol: Literal["reference", "terse"] = "reference"
    samples: int = pydantic.Field(3, ge=1)
    temperature: float = pydantic.Field(0.2, ge=0.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    constrained: bool = True
    analysis_lead: bool = True
    max_new_tokens: int | None = pydantic.Field(None, ge=1)
    rejection_tie: Literal["first", "not_refused", "refused"] = "first"
    knowledge_turns: Literal["all", "answerable"] = "all"
    max_answer_chars: int = pydantic.Field(2000, ge=16)
    max_summary_chars: int = pydantic.Field(1500, ge=16)
    max_evidence_chars: int = pydantic.Field(1500, ge=16)

    @property
    def new_tokens(self) -> int:
        """The free-text budget actually used."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return 512 if self.protocol == "reference" else 4

    @pydantic.model_validator(mode="after")
    def _budget(self) -> "JudgeConfig":
        if self.protocol == "reference" and self.max_new_tokens is not None and self.max_new_tokens < 512:
            raise ValueError(f"judge.max_new_tokens={self.max_new_tokens}: the reference protocol's reasoning needs "
                             f"at least 512 tokens (or use judge.protocol=terse)")
        return self


class CalibrationConfig(StrictModel):
    """The judge's calibration run before the evaluation (``ditto_jax.eval.calibration``): hand-labelled items
    (``path``: a calibration JSONL, ``null`` = the shipped en + zh set), ``limit``: first N items per language.
    A judge whose accuracy is within ``margin`` of chance, or whose most frequent verdict covers at least
    ``max_majority_share`` of its samples, is flagged and its scores marked unreliable."""

    enabled: bool = True
    path: str | None = None
    limit: int | None = pydantic.Field(None, ge=1)
    margin: float = pydantic.Field(0.1, ge=0.0, le=1.0)
    max_majority_share: float = pydantic.Field(0.9, gt=0.0, le=1.0)


class TestSetConfig(StrictModel):
    """What to evaluate on. ``wikiroleeval``: a WikiRoleEval JSONL (ours or the Ditto release; ``null`` = the shipped
    tiny set). ``characters``: the knowledge base that describes the multiple-choice candidates (``null`` = the
    embedded one). ``limit``: first N sessions (after the language filter); ``max_turns``: first N turns of
    each. ``mtbench``: FastChat's MT-Bench ``question.jsonl`` (``fastchat/llm_judge/data/mt_bench/question.jsonl``
    in lm-sys/FastChat; its roleplay items are ids 91-100; not shipped here), ``null`` = the shipped
    project-written roleplay questions (reported as "Roleplay (project set)", not MT-Bench); used when
    ``mtbench_enabled``. ``mtbench_judge_prompts``: FastChat's ``judge_prompts.jsonl`` (the ``single-v1`` and
    ``single-v1-multi-turn`` grading prompts, used verbatim); ``null`` = our wording of the same format."""

    wikiroleeval: str | None = None
    characters: str | None = None
    langs: list[Literal["en", "zh"]] = pydantic.Field(default_factory=lambda: ["en", "zh"])
    limit: int | None = pydantic.Field(None, ge=1)
    max_turns: int | None = pydantic.Field(None, ge=1, description="first N turns of each session")
    mtbench: str | None = None
    mtbench_judge_prompts: str | None = None
    mtbench_enabled: bool = True
    mtbench_limit: int | None = pydantic.Field(None, ge=1)


class EvalConfig(StrictModel):
    """Everything ``ditto-jax eval`` needs. ``seed`` seeds the judge's sampling; ``answer`` (the sampling module's
    ``SamplingParams``, its own ``seed`` included) the candidates'. The tokenizer's end-of-turn ids are always
    added to ``answer.stop_token_ids``."""

    seed: int = 0
    candidates: list[CandidateConfig] = pydantic.Field(min_length=1)
    judge: JudgeConfig
    testset: TestSetConfig = pydantic.Field(default_factory=TestSetConfig)
    answer: AnswerSampling = pydantic.Field(default_factory=AnswerSampling)
    engine: EvalEngine  # type: ignore[valid-type]
    calibration: CalibrationConfig = pydantic.Field(default_factory=CalibrationConfig)

    @pydantic.model_validator(mode="after")
    def _unique_names(self) -> "EvalConfig":
        names = [c.name for c in self.candidates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidate names must be unique, repeated: {dupes}")
        return self
