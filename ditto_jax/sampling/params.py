"""What a sampling request asks for and what it gets back: ``SamplingParams`` (``PaperSampling``: the paper's
defaults, for stage configs), ``Request``, ``Result``."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Literal, Sequence

import pydantic

from ditto_jax.config import StrictModel

FinishReason = Literal["stop", "length", "cancelled"]


class SamplingParams(StrictModel):
    """Decoding settings of one request (the Hugging Face processor order: repetition penalty, temperature,
    top-k, top-p).

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``stop_token_ids`` are added to the tokenizer's end-of-sequence id (unless ``ignore_eos``);
    generation also stops right after the text contains one of ``stop_strings`` (output cut before it).
    ``seed`` is folded with the request id and the step, so a request samples the same tokens whatever
    batch, slot or resume it runs in.
    """

    temperature: float = pydantic.Field(default=1.0, ge=0.0)
    top_k: int = pydantic.Field(default=0, ge=0)
    top_p: float = pydantic.Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = pydantic.Field(default=1.0, gt=0.0)
    max_new_tokens: int = pydantic.Field(default=256, ge=1)
    stop_token_ids: list[int] = pydantic.Field(default_factory=list)
    stop_strings: list[str] = pydantic.Field(default_factory=list)
    ignore_eos: bool = False
    seed: int = 0

    @pydantic.field_validator("stop_strings")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop_strings must not contain the empty string")
        return v



class PaperSampling(SamplingParams):
    """``SamplingParams`` with the Ditto paper's decoding defaults (temperature 0.7, top-p 0.8, repetition penalty
    1.1, up to 2,048 new tokens): the YAML face of a generation stage's sampling (simulation, eval answers).
    ``for_request`` makes one request's params."""

    temperature: float = pydantic.Field(0.7, ge=0.0)
    top_p: float = pydantic.Field(0.8, gt=0.0, le=1.0)
    repetition_penalty: float = pydantic.Field(1.1, gt=0.0)
    max_new_tokens: int = pydantic.Field(2048, ge=1)

    def for_request(self, seed: int, stop_token_ids: Sequence[int] = (), max_new_tokens: int | None = None
                    ) -> SamplingParams:
        """The engine params of one request: these settings with ``seed``, the stop ids added to the config's
        own, and ``max_new_tokens`` when given."""
        return SamplingParams(**{**self.model_dump(), "seed": seed,
                                 "stop_token_ids": sorted(set(self.stop_token_ids) | set(stop_token_ids)),
                                 "max_new_tokens": max_new_tokens or self.max_new_tokens})


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to complete: ``input_ids`` (already tokenized), optional params and constraint."""

    id: str
    input_ids: Sequence[int]
    params: SamplingParams | None = None
    constraint: Any = None  # a ditto_jax.sampling.constraints.Constraint


@dataclasses.dataclass
class Result:
    """A finished request. ``logprobs[i]`` is the log-probability of ``output_ids[i]`` under the model's raw
    (unprocessed) next-token distribution. ``finish_reason``: ``"stop"`` (end-of-sequence, stop token, stop
    string or completed constraint), ``"length"`` (``max_new_tokens`` or the cache capacity) or ``"cancelled"``
    (``SamplingEngine.cancel``; the tokens produced until then)."""

    id: str
    output_ids: list[int]
    text: str | None
    logprobs: list[float]
    finish_reason: FinishReason
    prompt_len: int = 0

    def to_json(self, with_logprobs: bool = False) -> dict[str, Any]:
        """The output-line record ``{"id", "output_ids", "text", "finish_reason"}`` (+ ``logprobs``)."""
        rec: dict[str, Any] = {"id": self.id, "output_ids": list(self.output_ids), "text": self.text,
                               "finish_reason": self.finish_reason}
        if with_logprobs:
            rec["logprobs"] = [round(float(x), 6) for x in self.logprobs]
        return rec


def request_key_data(seed: int, request_id: str) -> tuple[int, int]:
    """The two 32-bit words of a request's threefry key: a stable hash of ``(seed, id)`` (same on every host,
    process and Python run; ``hash()`` is salted, so it is not used)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{request_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
