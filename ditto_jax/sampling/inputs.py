"""Prompt files for ``ditto-jax sample``: one JSON object a line, ``{"id", "prompt" | "messages" | "input_ids"}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def encode_prompt_record(rec: dict[str, Any], tokenizer: Any, where: str, no_tokenizer: str | None = None) -> list[int]:
    """Token ids of one prompt record: raw ``prompt`` text (BOS first when the tokenizer has one, as
    transformers' tokenizers add it), chat ``messages`` (with the assistant generation prompt), or ``input_ids``.
    Without a tokenizer only ``input_ids`` records work; ``no_tokenizer`` says why there is none."""
    keys = [k for k in ("prompt", "messages", "input_ids") if k in rec]
    if len(keys) != 1:
        raise ValueError(f"{where}: needs exactly one of \"prompt\", \"messages\", \"input_ids\" (got {sorted(rec)})")
    key = keys[0]
    value = rec[key]
    if key == "input_ids":
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise ValueError(f"{where}: field \"input_ids\" must be a list of integers")
        return list(value)
    if tokenizer is None:
        raise ValueError(f"{where}: field \"{key}\" needs a tokenizer ({no_tokenizer or 'the model folder has none'})")
    if key == "prompt":
        if not isinstance(value, str):
            raise ValueError(f"{where}: field \"prompt\" must be a string")
        bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
        return bos + tokenizer.encode(value)
    if not isinstance(value, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        raise ValueError(f"{where}: field \"messages\" must be a list of {{\"role\", \"content\"}} objects")
    try:
        return tokenizer.encode_chat(value, add_generation_prompt=True)[0]
    except ValueError as exc:
        raise ValueError(f"{where}: field \"messages\": {exc}") from exc


def read_prompt_file(path: str | Path, tokenizer: Any, no_tokenizer: str | None = None) -> list[tuple[str, list[int]]]:
    """``[(id, input_ids)]`` of a prompts JSONL file (blank lines skipped); errors name the file, line and field
    (``no_tokenizer``: why there is no tokenizer, for the error of a text prompt)."""
    out: list[tuple[str, list[int]]] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: a line must be a JSON object")
            rid = rec.get("id")
            if not isinstance(rid, str) or not rid:
                raise ValueError(f"{where}: field \"id\" must be a non-empty string")
            if rid in seen:
                raise ValueError(f"{where}: id {rid!r} already used on line {seen[rid]}")
            seen[rid] = n
            ids = encode_prompt_record(rec, tokenizer, where, no_tokenizer)
            if not ids:
                raise ValueError(f"{where}: the prompt is empty")
            out.append((rid, ids))
    return out
