"""The OpenAI-compatible HTTP API (FastAPI) over the engine loop.

Routes: ``POST /v1/chat/completions`` (``stream`` for server-sent events), ``POST /v1/completions`` (a prompt
string or token ids), ``GET /v1/models``, ``GET /health``. Honoured: ``temperature`` (0 = greedy), ``top_p``,
``max_tokens`` (or ``max_completion_tokens``), ``stop`` (string or list), ``response_format`` (chat:
``{"type": "json_schema", "json_schema": {"schema": ...}}`` decodes under the schema's token automaton, as
OpenAI's structured outputs; ``json_object`` is refused with a 400 — give a schema), ``seed`` (the engine folds the seed
with the request id; with a ``seed`` the id is derived from the prompt, so the same prompt, settings and seed
sample the same text whatever else runs — unless an identical request is in flight at the same moment). A bad request gets
status 400 and ``{"error": {"message", "type": "invalid_request_error", "param": FIELD}}``. A client that
disconnects has its request cancelled, which frees its slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any, AsyncIterator, Literal

import fastapi
import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ditto_jax.sampling import Request, SamplingParams, json_schema_constraint
from ditto_jax.serve.loop import EngineLoop, Handle


class _Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = pydantic.Field(1.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = pydantic.Field(None, ge=1)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = pydantic.Field(1, ge=1, le=1, description="one choice per request")

    @pydantic.field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items) or len(items) > 4:
            raise ValueError("stop: up to 4 non-empty strings")
        return v


class ChatMessage(pydantic.BaseModel):
    """One chat message."""

    model_config = pydantic.ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    """``/v1/chat/completions`` request body."""

    messages: list[ChatMessage] = pydantic.Field(min_length=1)
    response_format: dict[str, Any] | None = None


class CompletionBody(_Body):
    """``/v1/completions`` request body."""

    prompt: str | list[int]


def _request_id(loop: EngineLoop, prefix: str, ids: list[int], p: SamplingParams, seeded: bool,
                schema: str | None = None) -> str:
    if not seeded:
        return loop.new_id(prefix)
    digest = hashlib.sha256(json.dumps([ids, p.model_dump(mode="json"), schema]).encode()).hexdigest()[:20]
    return f"{prefix}-s{p.seed}-{digest}"


def _submit(loop: EngineLoop, rid: str, ids: list[int], p: SamplingParams, param: str | None,
            constraint: Any = None) -> Handle:
    try:
        return loop.submit(Request(rid, ids, p, constraint))
    except ValueError as exc:
        if "same id" in str(exc):  # an identical seeded request is in flight: this one gets its own id
            return loop.submit(Request(loop.new_id(rid), ids, p, constraint))
        raise BadRequest(str(exc), param) from exc


class BadRequest(Exception):
    """A request that cannot be served, naming the field."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def _error(message: str, param: str | None, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


class TextStream:
    """Token ids -> text deltas that concatenate to the final text: text that may still change (a partial UTF-8
    character, or up to the longest stop string, which the engine may cut) is held back until the end."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.sent = ""

    def add(self, ids: list[int]) -> str:
        """New ids; returns the text that is now safe to send."""
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        while text.endswith("\ufffd"):
            text = text[:-1]
        safe = text[: len(text) - self.hold] if self.hold else text
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final: str) -> str:
        """The rest of the final text."""
        delta = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final
        return delta


def create_app(loop: EngineLoop, tokenizer: Any, model_name: str, max_len: int, default_max_tokens: int = 256
               ) -> fastapi.FastAPI:
    """The FastAPI app serving ``loop``'s engine as ``model_name``."""
    app = fastapi.FastAPI(title="ditto-jax", version="1")
    stop_ids = sorted(tokenizer.stop_ids)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return _error(f"{param or 'body'}: {err.get('msg')}", param)

    @app.exception_handler(BadRequest)
    async def _bad(_: fastapi.Request, exc: BadRequest) -> JSONResponse:
        return _error(str(exc), exc.param)

    def params(body: _Body, prompt_len: int) -> SamplingParams:
        room = max_len - prompt_len
        if room < 1:
            raise BadRequest(f"the prompt has {prompt_len} tokens; this server holds {max_len} per request",
                             "messages" if isinstance(body, ChatBody) else "prompt")
        wanted = body.max_completion_tokens or body.max_tokens
        if wanted is not None and wanted > room:
            raise BadRequest(f"max_tokens={wanted} exceeds the {room} tokens left after the {prompt_len}-token "
                             f"prompt (the server's max length is {max_len})", "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(temperature=body.temperature, top_p=body.top_p,
                              max_new_tokens=wanted or min(default_max_tokens, room), stop_strings=stops,
                              stop_token_ids=stop_ids, seed=body.seed or 0)

    schemas: dict[str, Any] = {}  # token automata of the JSON schemas asked for, built once each

    async def schema_constraint(body: ChatBody) -> tuple[str | None, Any]:
        fmt = body.response_format
        kind = (fmt or {}).get("type", "text")
        if fmt is None or kind == "text":
            return None, None
        if kind != "json_schema":
            raise BadRequest(f"response_format.type {kind!r} is not supported (use json_schema with a schema, "
                             f"or text)", "response_format.type")
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema: a JSON schema object is required",
                             "response_format.json_schema.schema")
        key = json.dumps(schema, sort_keys=True)
        if key not in schemas:
            try:
                schemas[key] = await asyncio.to_thread(json_schema_constraint, schema, tokenizer,
                                                       loop.engine.vocab_size)
            except Exception as exc:  # outlines rejects a schema it cannot compile
                raise BadRequest(f"response_format.json_schema.schema: {exc}"[:500],
                                 "response_format.json_schema.schema") from exc
        return key, schemas[key]

    def check_model(body: _Body) -> None:
        if body.model not in (None, model_name):
            raise BadRequest(f"model {body.model!r} is not served here (this server serves {model_name!r})", "model")

    async def wait_done(handle: Handle, request: fastapi.Request) -> Any:
        while True:
            try:
                kind, value = await asyncio.wait_for(handle.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    loop.cancel(handle.id)
                    raise
                continue
            if kind == "done":
                return value
            if kind == "error":
                raise fastapi.HTTPException(500, value)

    async def events(handle: Handle, stream: TextStream, chunk: Any) -> AsyncIterator[str]:
        finished = False
        try:
            yield "data: " + json.dumps(chunk(None, {"role": "assistant", "content": ""})) + "\n\n"
            while True:
                kind, value = await handle.events.get()
                if kind == "tokens":
                    delta = stream.add(value)
                    if delta:
                        yield "data: " + json.dumps(chunk(delta, None)) + "\n\n"
                elif kind == "done":
                    finished = True
                    rest = stream.finish(value.text or "")
                    yield "data: " + json.dumps(chunk(rest, None, value.finish_reason)) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    finished = True
                    yield "data: " + json.dumps({"error": {"message": value, "type": "server_error"}}) + "\n\n"
                    return
        finally:
            if not finished:  # the client went away: free the slot
                loop.cancel(handle.id)

    def usage(result: Any) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_len, "completion_tokens": len(result.output_ids),
                "total_tokens": result.prompt_len + len(result.output_ids)}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if loop.error is None else "error", "error": loop.error, "model": model_name,
                "in_flight": loop.in_flight(), "finished": loop.finished, "cancelled": loop.cancelled}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "ditto-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: fastapi.Request) -> Any:
        check_model(body)
        ids = tokenizer.encode_chat([m.model_dump() for m in body.messages], add_generation_prompt=True)[0]
        p = params(body, len(ids))
        schema, constraint = await schema_constraint(body)
        handle = _submit(loop, _request_id(loop, "chatcmpl", ids, p, body.seed is not None, schema), ids, p, None,
                         constraint)
        rid = handle.id
        created = int(time.time())
        if body.stream:
            def chunk(delta: str | None, first: dict[str, str] | None, finish: str | None = None) -> dict[str, Any]:
                d = first if first is not None else ({"content": delta} if delta else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

            return StreamingResponse(events(handle, TextStream(tokenizer, p.stop_strings), chunk),
                                     media_type="text/event-stream")
        result = await wait_done(handle, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text or ""},
                             "finish_reason": result.finish_reason}], "usage": usage(result)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: fastapi.Request) -> Any:
        check_model(body)
        ids = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        if not ids:
            raise BadRequest("prompt: empty", "prompt")
        p = params(body, len(ids))
        handle = _submit(loop, _request_id(loop, "cmpl", ids, p, body.seed is not None), ids, p, "prompt")
        rid = handle.id
        created = int(time.time())
        if body.stream:
            def chunk(delta: str | None, first: Any, finish: str | None = None) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                        "choices": [{"index": 0, "text": delta or "", "finish_reason": finish}]}

            return StreamingResponse(events(handle, TextStream(tokenizer, p.stop_strings), chunk),
                                     media_type="text/event-stream")
        result = await wait_done(handle, request)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": result.text or "", "finish_reason": result.finish_reason}],
                "usage": usage(result)}

    return app
