"""The one engine factory: ``load_engine`` gives the same greedy output as ``ditto-jax sample`` and as an engine
built by hand on the same random weights; ``stats()`` carries timing, compile and prefix-cache figures; the
``EngineConfig`` of a caller with other defaults (``engine_field``) fills the keys a YAML section leaves out."""

from __future__ import annotations

import dataclasses
import json

import pydantic
import pytest

from ditto_jax import cli
from ditto_jax.checkpoints import ModelSource, load_model_source
from ditto_jax.config import StrictModel
from ditto_jax.sampling import EngineConfig, Request, SamplingEngine, SamplingParams, engine_field, load_engine
from ditto_jax.sampling.compile_cache import compile_stats
from ditto_jax.sampling.inputs import encode_prompt_record
from ditto_jax.sampling.runner import read_outputs

TINY = ModelSource(config="model/tiny", seed=3)
PROMPT = "Tell me about the sea, the ships that sail on it and the people who live by its shores."
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def test_loaded_engine_matches_sample_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DITTO_JAX_COMPILATION_CACHE", "off")
    cfg = EngineConfig(batch_size=2, max_len=64, chunk=4, mesh=None, shard_size=1)
    loaded = load_engine(TINY, cfg, require_tokenizer=True)
    assert loaded.tokenizer is not None and loaded.config == cfg and loaded.mesh is None
    assert loaded.stop_ids == sorted(loaded.tokenizer.stop_ids) and loaded.load_s > 0
    ids = encode_prompt_record({"prompt": PROMPT}, loaded.tokenizer, "test")  # as `sample` encodes it
    # a prompt that shares its prefix with the first, so the prefix cache has something to count
    requests = [Request("a", ids, GREEDY), Request("b", ids + ids[1:4], GREEDY)]
    summary = loaded.run(requests, tmp_path / "mine", progress=False)
    assert summary.generated == 2 and summary.shards_written == 2  # config.shard_size reached the runner
    mine = read_outputs(tmp_path / "mine")
    assert len(mine["a"]["output_ids"]) == 12 and len(ids) > 16  # a shared prefix of at least one block

    # an engine built by hand on the same weights
    model, _, tokenizer = load_model_source(TINY)
    by_hand = SamplingEngine(model, tokenizer, batch_size=2, max_len=64, chunk=4)
    assert next(iter(by_hand.generate([Request("a", ids, GREEDY)]))).output_ids == mine["a"]["output_ids"]

    # the command line
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": PROMPT}) + "\n")
    capsys.readouterr()
    assert cli.main(["sample", "--config", "model/tiny", "--prompts", str(prompts), "--out", str(tmp_path / "cli"),
                     "--temperature", "0", "--max-new-tokens", "12", "--ignore-eos", "--batch-size", "2",
                     "--chunk", "4", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # model/tiny with seed 0 is the command's model: compare with a loaded engine of that seed
    cli_out = read_outputs(tmp_path / "cli")["a"]["output_ids"]
    seed0 = load_engine(ModelSource(config="model/tiny"), cfg)
    assert next(iter(seed0.engine.generate([Request("a", ids, GREEDY)]))).output_ids == cli_out
    assert report["max_len"] == len(ids) + 12 and report["generated"] == 1

    stats = loaded.stats()
    assert set(stats["engine"]) >= {"prefill_s", "decode_s", "prefix_fill_s", "prompt_tokens_computed"}
    assert stats["engine"]["prefill_calls"] >= 1 and stats["engine"]["decode_steps"] > 0
    assert {"compile_s", "compiles", "cache_hits", "cache_dir"} <= set(stats["compile"])
    assert stats["compile"]["cache_dir"] is None  # switched off above
    assert stats["prefix_cache"]["lookups"] == 2 and stats["prefix_cache"]["hits"] >= 1
    assert set(report) >= {"engine", "compile", "prefix_cache", "load_s"}


def test_free_text_constraint_and_cached_constraints(monkeypatch):
    monkeypatch.setenv("DITTO_JAX_COMPILATION_CACHE", "off")
    cfg = EngineConfig(batch_size=1, max_len=32, mesh=None)
    assert load_engine(TINY, cfg).free_text is None  # embedding rows == tokenizer ids: nothing to mask
    # an embedding larger than the tokenizer (Qwen2.5's padded rows): free text is masked to the tokenizer's ids
    loaded = load_engine(TINY.model_copy(update={"overrides": ["vocab_size=2112"]}), cfg)
    assert loaded.model_cfg.vocab_size == 2112 > loaded.tokenizer.vocab_size
    assert loaded.free_text is loaded.free_text and loaded.free_text.token_class[loaded.tokenizer.vocab_size] == 1
    schema = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 4}}, "required": ["q"]}
    assert loaded.json_constraint(schema) is loaded.json_constraint(dict(reversed(list(schema.items()))))
    built = []
    assert loaded.constraint("k", lambda: built.append(1) or loaded.free_text) is loaded.constraint("k", list)
    assert built == [1]


def test_max_len_resolver_and_engine_kwargs(monkeypatch):
    monkeypatch.setenv("DITTO_JAX_COMPILATION_CACHE", "off")
    loaded = load_engine(TINY, EngineConfig(batch_size=1, max_len=4096, min_bucket=64, prefix_cache_rows=0,
                                            mesh=None),
                         max_len=lambda model_cfg, tok: min(40, model_cfg.max_position_embeddings))
    assert loaded.config.max_len == 40 and loaded.engine.cfg.max_len == 40
    assert loaded.engine.buckets == [40]  # min_bucket is capped at max_len
    assert loaded.engine.prefix is None and loaded.stats()["prefix_cache"] is None


class _Caller(StrictModel):
    engine: engine_field(max_len=8192, min_bucket=64)  # type: ignore[valid-type]


def test_caller_defaults_fill_missing_keys():
    assert _Caller().engine.max_len == 8192 and _Caller().engine.min_bucket == 64
    partial = _Caller.model_validate({"engine": {"batch_size": 4}}).engine
    assert (partial.batch_size, partial.max_len, partial.min_bucket, partial.chunk) == (4, 8192, 64, 16)
    assert _Caller.model_validate({"engine": {"max_len": 512}}).engine.max_len == 512
    assert _Caller.model_validate({"engine": {"mesh": None}}).engine.mesh is None
    with pytest.raises(pydantic.ValidationError, match="bogus"):
        _Caller.model_validate({"engine": {"bogus": 1}})
    assert EngineConfig().max_len == 4096 and EngineConfig().min_bucket == 16


def test_engine_timing_keeps_compilation_apart(monkeypatch):
    """The phases exclude the tracing/lowering/compiling inside their calls, which ``compile_s`` holds: a first
    run on a new shape compiles (counted there, as the process-wide meter saw it), a second identical run does
    not (``compile_s`` stays put while the phases grow)."""
    monkeypatch.setenv("DITTO_JAX_COMPILATION_CACHE", "off")
    model, _, tokenizer = load_model_source(ModelSource(config="model/tiny", seed=4))
    engine = SamplingEngine(model, tokenizer, batch_size=2, max_len=40, chunk=3, min_bucket=8)  # a shape of its own
    requests = [Request(str(i), list(range(5, 12 + i)), GREEDY) for i in range(3)]
    before = compile_stats()["compile_s"]
    assert len(list(engine.generate(requests))) == 3
    first = dataclasses.replace(engine.timing)
    assert first.compile_s > 0 and first.compile_s == pytest.approx(compile_stats()["compile_s"] - before, abs=0.01)
    assert first.decode_s > 0 and first.prefill_s > 0
    assert len(list(engine.generate(requests))) == 3
    second = engine.timing
    assert second.compile_s == pytest.approx(first.compile_s, abs=0.005)
    assert second.decode_s > first.decode_s and second.prefill_s > first.prefill_s
