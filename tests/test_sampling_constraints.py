"""Constrained decoding: the compressed tables equal outlines-core's automaton; constrained outputs always parse."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ditto_jax.model import create_model, load_model_config
from ditto_jax.sampling import (
    Request,
    SamplingEngine,
    SamplingParams,
    choice_constraint,
    integer_constraint,
    json_schema_constraint,
    json_schema_regex,
    regex_constraint,
    vocab_constraint,
)
from ditto_jax.sampling.constraints import _byte_vocabulary
from ditto_jax.tokenizer import default_tokenizer

QUERY_SCHEMA = {  # Ditto's query simulation output: three {"question": ...} objects
    "type": "array", "minItems": 3, "maxItems": 3,
    "items": {"type": "object", "properties": {"question": {"type": "string", "minLength": 1, "maxLength": 24}},
              "required": ["question"]},
}


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    cfg = load_model_config("model/tiny")
    assert cfg.vocab_size >= tokenizer.vocab_size
    return SamplingEngine(create_model(cfg, seed=11), tokenizer, batch_size=8, max_len=192, chunk=16,
                          prefill_batch=8, min_bucket=16)


def test_compressed_tables_equal_the_outlines_automaton(tokenizer):
    from outlines_core import Index, Vocabulary

    vocab = load_model_config("model/tiny").vocab_size
    pattern = json_schema_regex(QUERY_SCHEMA)
    c = regex_constraint(pattern, tokenizer, vocab_size=vocab)
    index = Index(pattern, Vocabulary(tokenizer.eos_id, _byte_vocabulary(tokenizer, vocab)))
    transitions = index.get_transitions()
    states = sorted(set(transitions) | {index.get_initial_state()})
    number = {s: i for i, s in enumerate(states)}
    assert number[index.get_initial_state()] == c.initial_state and c.num_classes < 200
    for s in states:
        row = transitions.get(s, {})
        assert set(np.nonzero(c.allowed(number[s]))[0].tolist()) == set(row)
        for tok, nxt in row.items():
            assert c.advance(number[s], tok) == number[nxt]
    assert c.num_classes * 20 < vocab  # the class compression does its job (60 classes for 2048 tokens)


def _generate(engine, constraint, n, seed, max_new_tokens):
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    rng = np.random.RandomState(seed)
    reqs = [Request(f"c{i}", rng.randint(10, 1000, 3 + i).tolist(), params, constraint) for i in range(n)]
    return list(engine.generate(reqs))


def test_constrained_outputs_always_parse(engine, tokenizer):
    vocab = engine.vocab_size
    query = json_schema_constraint(QUERY_SCHEMA, tokenizer, vocab_size=vocab)
    results = _generate(engine, query, 8, seed=1, max_new_tokens=170)
    for r in results:
        assert r.finish_reason == "stop", r.text
        items = json.loads(r.text)
        assert len(items) == 3 and all(set(x) == {"question"} and 1 <= len(x["question"]) <= 24 for x in items)
    letters = choice_constraint(["A", "B", "C", "D"], tokenizer, vocab_size=vocab)
    score = integer_constraint(1, 10, tokenizer, vocab_size=vocab)
    binary = integer_constraint(0, 1, tokenizer, vocab_size=vocab)
    for constraint, valid in ((letters, {"A", "B", "C", "D"}), (score, {str(i) for i in range(1, 11)}),
                              (binary, {"0", "1"})):
        outs = _generate(engine, constraint, 8, seed=2, max_new_tokens=8)
        assert all(r.text in valid and r.finish_reason == "stop" for r in outs), [r.text for r in outs]
    # mixed in one batch with unconstrained rows: each row follows its own automaton (or none)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    mixed = [Request(f"m{i}", [10 + i, 20, 30], params, [letters, None, binary][i % 3]) for i in range(6)]
    out = {r.id: r for r in engine.generate(mixed)}
    assert out["m0"].text in {"A", "B", "C", "D"} and out["m2"].text in {"0", "1"}
    assert out["m1"].finish_reason == "length" and len(out["m1"].output_ids) == 8


def test_regex_errors_name_the_pattern(tokenizer):
    with pytest.raises(ValueError, match=re.escape("'(unclosed'")):
        regex_constraint("(unclosed", tokenizer)


def test_vocab_constraint_keeps_a_random_model_to_the_tokenizer_ids(tokenizer):
    cfg = load_model_config("model/tiny", [f"vocab_size={tokenizer.vocab_size + 256}"])  # rows no token maps to
    engine = SamplingEngine(create_model(cfg, seed=3), tokenizer, batch_size=8, max_len=64, chunk=8,
                            prefill_batch=8, min_bucket=16)
    c = vocab_constraint(tokenizer, cfg.vocab_size)
    assert c.allowed(0)[: tokenizer.vocab_size].all() and not c.allowed(0)[tokenizer.vocab_size:].any()
    params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=3, ignore_eos=True)
    out = list(engine.generate(Request(f"v{i}", [10 + i, 20], params, c) for i in range(8)))
    assert all(len(r.output_ids) == 24 and max(r.output_ids) < tokenizer.vocab_size for r in out)
    free = list(engine.generate(Request(f"f{i}", [10 + i, 20], params) for i in range(8)))
    assert any(max(r.output_ids) >= tokenizer.vocab_size for r in free)  # without it, a random model leaves them
