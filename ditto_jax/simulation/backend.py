"""The supervision model behind the generation stages: model, tokenizer, engine, constraints, runner calls.

Loaded once per process, only when a stage still has requests to run. The engine runs on this process's
local devices (``engine.mesh`` over ``jax.local_devices()``): in a multi-host run every host is an
independent sampler over its own share of characters, so no host waits for another's batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ditto_jax.simulation.config import SamplingConfig, SimulateConfig
from ditto_jax.simulation.prompts import Message, ProfileBudget, PromptTooLong, fit_prompt


class Backend:
    """Supervision model + sampling engine of one process."""

    def __init__(self, cfg: SimulateConfig, log: Callable[[str], None] = print, progress: bool = True):
        import jax

        from ditto_jax.mesh import make_mesh
        from ditto_jax.model_source import load_model_source
        from ditto_jax.sampling import SamplingEngine

        self.cfg = cfg
        self.log = log
        self.progress = progress
        devices = jax.local_devices()[: cfg.engine.devices]
        self.mesh = make_mesh(cfg.engine.mesh, devices=devices)
        self.model, self.model_cfg, self.tokenizer = load_model_source(cfg.supervision_model, self.mesh)
        self.engine = SamplingEngine(self.model, self.tokenizer, cfg.engine.batch_size, cfg.engine.max_len,
                                     mesh=self.mesh)
        self.stop_ids = sorted(self.tokenizer.stop_ids)
        self._constraints: dict[str, Any] = {}
        self.shortened = 0
        self.last_stats: dict[str, Any] = {}

    def json_constraint(self, schema: dict[str, Any]) -> Any:
        """The (cached) token automaton of a JSON schema for this tokenizer and model vocabulary."""
        from ditto_jax.sampling import json_schema_constraint

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
        """An engine ``Request`` (seeded by ``seed`` folded with ``request_id`` inside the engine)."""
        from ditto_jax.sampling import Request
        from ditto_jax.simulation.stages import sampling_params

        return Request(request_id, ids, sampling_params(sampling, seed, self.stop_ids), constraint)

    def run(self, out_dir: Path, requests: list[Any], process_index: int, desc: str) -> None:
        """Generate every request exactly once into ``out_dir`` (resumable; see ``ditto_jax.sampling``)."""
        # INTERIM until the sampling runner lands: append finished results, skip ids already written.
        import os

        from tqdm.auto import tqdm

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"outputs.p{process_index}.jsonl"
        done = _read_file(path)
        if path.exists():
            data = path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):
                with open(path, "r+b") as f:
                    f.truncate(cut)
        todo = [r for r in requests if r.id not in done]
        start, tokens0 = time.perf_counter(), self.engine.generated_tokens
        bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc=desc, disable=not self.progress)
        with open(path, "ab") as f:
            for result in self.engine.generate(todo):
                f.write((json.dumps(result.to_json(), ensure_ascii=False) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
        bar.close()
        seconds = time.perf_counter() - start
        tokens = self.engine.generated_tokens - tokens0
        self.last_stats = {"requests": len(todo), "generated_tokens": tokens, "gen_seconds": round(seconds, 2),
                           "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0}
        (out_dir / f"DONE.p{process_index}").write_text("")


def _read_file(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for raw in path.read_bytes().splitlines(keepends=True):
            if raw.endswith(b"\n"):
                rec = json.loads(raw)
                out.setdefault(rec["id"], rec)
    return out


def stage_complete(out_dir: Path, process_index: int) -> bool:
    """Whether this process's share of a generation stage has finished."""
    return (out_dir / f"DONE.p{process_index}").exists()


def read_outputs(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every output record of a generation stage (all processes), keyed by request id."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(out_dir.glob("outputs.p*.jsonl")):
        out.update(_read_file(path))
    return out
