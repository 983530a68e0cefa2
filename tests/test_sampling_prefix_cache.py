"""The prefix cache: outputs with it equal those without (greedy and seeded sampling), shared prefixes are
computed once (counters), eviction under a small pool, hits verified token by token; the index on its own."""

from __future__ import annotations

import numpy as np
import pytest

from ditto_jax.model import ModelConfig, create_model
from ditto_jax.sampling import Request, SamplingEngine, SamplingParams
from ditto_jax.sampling.engine import _pack
from ditto_jax.sampling.prefix_cache import PrefixIndex

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)
NUCLEUS = SamplingParams(temperature=0.8, top_p=0.8, repetition_penalty=1.1, max_new_tokens=6, seed=3)
FEW = dict(min_bucket=64, prefill_batch=1)  # few compilations: one suffix bucket, groups of one


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128)
    return create_model(cfg, seed=5)


def _workload(characters=3, questions=3, seed=0):
    """Prompts sharing a per-character "profile" (37 + 3c tokens) followed by a 3..9-token question."""
    rng = np.random.RandomState(seed)
    out = []
    for c in range(characters):
        profile = rng.randint(3, 96, 37 + 3 * c).tolist()
        for q in range(questions):
            out.append((f"c{c}/q{q}", profile + rng.randint(3, 96, 3 + 3 * q).tolist()))
    return out


def _run(engine, prompts, params):
    return {r.id: r.output_ids for r in engine.generate(Request(i, p, params) for i, p in prompts)}


def test_outputs_equal_with_and_without_prefix_cache(model):
    prompts = _workload()
    off = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=0)
    on = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=4)
    assert off.prefix is None
    want = _run(off, prompts, GREEDY)
    assert _run(on, prompts, GREEDY) == want
    stats = on.prefix.stats
    # 3 characters x 3 questions: each profile's 32 shared tokens (whole 16-token blocks) computed once, with
    # the character's first prompt (its later prompts are queued: the lookahead sees them), reused by the others
    assert stats.lookups == 9 and stats.inserted == 3 and stats.hits == 6
    assert stats.tokens_saved == 32 * stats.hits
    assert on.timing.prompt_tokens_computed == on.timing.prompt_tokens - stats.tokens_saved
    # without the lookahead a character's first prompt, admitted alone, runs whole and its profile is computed
    # again when the second arrives: same outputs, more tokens computed
    blind = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=4, lookahead=0)
    assert _run(blind, prompts, GREEDY) == want
    assert blind.prefix.stats.hits < stats.hits
    assert blind.timing.prompt_tokens_computed > on.timing.prompt_tokens_computed
    # seeded sampling (repetition penalty over the whole prompt, prefix included) is unchanged too
    assert _run(on, prompts, NUCLEUS) == _run(off, prompts, NUCLEUS)
    # same prompts again: every prompt now hits the pool, greedy outputs unchanged
    hits = stats.hits
    again = _run(on, [(i + "-again", p) for i, p in prompts], GREEDY)
    assert on.prefix.stats.hits > hits
    assert [again[i + "-again"] for i, _ in prompts] == [want[i] for i, _ in prompts]


def test_decode_reads_shared_prefixes_once_with_the_same_outputs(model):
    """Running slots whose caches begin with one fill of a pool row are passed to the decode as sharing it (the
    CPU decode attention reads it once for all of them): same outputs as without the prefix cache, greedy and
    seeded, with rows refilled from an evicted-and-refilled pool row kept apart."""
    prompts = _workload(characters=6, questions=3, seed=4)
    off = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=0)
    on = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=2)
    seen = []
    decode = on.sampler.decode

    def spy(tables, keep, width=None, shared=None):
        seen.append((keep.copy(), *(np.array(a) for a in shared)))
        return decode(tables, keep, width, shared)

    on.sampler.decode = spy
    for params in (GREEDY, NUCLEUS):
        assert _run(on, prompts, params) == _run(off, prompts, params)
    shared = [(keep, lead, length) for keep, lead, length in seen if (lead != np.arange(4)).any()]
    assert shared, "no decode chunk saw slots sharing a prefix"
    for keep, lead, length in shared:
        followers = lead != np.arange(4)
        assert (lead[followers] < np.arange(4)[followers]).all() and keep[followers].all()
        assert keep[lead[followers]].all()
        assert set(length[followers]) <= {32, 48} and (length[~followers] == 0).all()
    assert on.prefix.stats.evicted > 0


def test_unshared_prompts_do_not_use_the_pool(model):
    rng = np.random.RandomState(1)
    prompts = [(f"r{i}", rng.randint(3, 96, 40).tolist()) for i in range(5)]
    on = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=4)
    off = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=0)
    assert _run(on, prompts, GREEDY) == _run(off, prompts, GREEDY)
    assert on.prefix.stats.inserted == 0 and on.prefix.stats.hits == 0
    assert on.timing.prompt_tokens_computed == on.timing.prompt_tokens == 200


def test_small_pool_evicts_and_stays_exact(model):
    prompts = _workload(characters=6, questions=2, seed=2)  # 6 shared profiles through a pool of 4 rows
    off = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=0)
    on = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=4)
    assert _run(on, prompts, GREEDY) == _run(off, prompts, GREEDY)
    assert on.prefix.stats.inserted == 6 and on.prefix.stats.evicted == 2


def test_pack_fills_a_groups_padding_rows_with_narrower_rows():
    rows = [(448, 32, f"a{i}") for i in range(7)] + [(448, 16, "b0"), (0, 16, "c0"), (512, 16, "d0")]
    # seven 32-token rows run as eight: the eighth is the 16-token row under the same prefix width (the wider
    # prefix d0 cannot ride there); the row without a prefix could, but the group is full; it joins d0's group
    # (same bucket, narrower prefix: one call, not two)
    assert _pack(rows, 8) == [(448, 32, [f"a{i}" for i in range(7)] + ["b0"]), (512, 16, ["d0", "c0"])]
    # rows of one bucket under two prefix widths: one group at the wider width
    assert _pack([(384, 32, "x"), (320, 32, "y"), (320, 32, "z"), (384, 32, "w")], 8) == [
        (384, 32, ["x", "w", "y", "z"])]
    # three rows run as four: the fourth carries the prefix-less row; groups never exceed the limit
    assert _pack([(64, 32, "x"), (64, 32, "y"), (64, 32, "z"), (0, 16, "c"), (64, 64, "w")], 4) == [
        (64, 64, ["w"]), (64, 32, ["x", "y", "z", "c"])]
    five = [(0, 16, i) for i in range(5)]
    assert _pack(five, 4) == [(0, 16, [0, 1, 2, 3]), (0, 16, [4])]
    assert _pack(five, 3) == [(0, 16, [0, 1, 2]), (0, 16, [3, 4])]


def test_packed_prefill_groups_equal_groups_of_one(model):
    """An admission mixing pooled and unpooled prompts with remainders in two buckets: prefilled in packed groups
    (narrower rows in wider groups' padding rows) it gives the greedy and seeded outputs of one prompt per call,
    in fewer calls."""
    rng = np.random.RandomState(4)
    prompts = _workload(characters=2, questions=3, seed=4) + [(f"u{i}", rng.randint(3, 96, n).tolist())
                                                              for i, n in enumerate((10, 25, 12))]
    single = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, prefill_batch=1, prefix_cache_rows=4)
    packed = SamplingEngine(model, None, batch_size=4, max_len=64, chunk=4, prefill_batch=4, prefix_cache_rows=4)
    for params in (GREEDY, NUCLEUS):
        assert _run(packed, prompts, params) == _run(single, prompts, params)
    assert packed.timing.prefill_calls < single.timing.prefill_calls
    assert packed.timing.prompt_tokens_computed == single.timing.prompt_tokens_computed


def test_wide_prefixes_are_filled_one_per_call():
    """Prefixes of ``FILL_TOKENS`` positions or more are computed one per call (fewer compiled variants, the same
    compute); narrow ones still share a call. Outputs equal those without the prefix cache."""
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=512)
    wide_model = create_model(cfg, seed=6)
    rng = np.random.RandomState(6)
    prompts = []
    for c, n in enumerate((270, 270, 40, 40)):  # two wide profiles, then two narrow ones
        profile = rng.randint(3, 96, n).tolist()
        prompts += [(f"c{c}/q{q}", profile + rng.randint(3, 96, 3 + 3 * q).tolist()) for q in range(2)]
    kw = dict(batch_size=4, max_len=300, chunk=4, min_bucket=64, prefill_batch=4)
    on = SamplingEngine(wide_model, None, **kw, prefix_cache_rows=4)
    off = SamplingEngine(wide_model, None, **kw, prefix_cache_rows=0)
    assert _run(on, prompts, GREEDY) == _run(off, prompts, GREEDY)
    assert on.prefix.stats.inserted == 4
    # the first admission fills both wide profiles (two calls), the second both narrow ones (one call)
    assert on.timing.prefix_fill_calls == 3


def test_index_verifies_tokens_and_evicts_least_recently_used():
    index = PrefixIndex(rows=2, row_tokens=64, block=4)
    a = list(range(10, 30))  # 20 tokens
    names = index.names(a)
    assert len(names) == 4  # (20 - 1) // 4 full blocks leave one token out
    assert index.lookup(a, names) == (-1, 0)
    row_a = index.allocate(a[:12], pinned=set())
    assert index.lookup(a, names) == (row_a, 12)
    b = a[:8] + [99] * 12  # shares two blocks with a
    assert index.lookup(b, index.names(b)) == (row_a, 8)
    row_c = index.allocate(list(range(50, 58)), pinned=set())
    index.touch(row_a)
    row_d = index.allocate(list(range(70, 78)), pinned=set())  # evicts c, the least recently used
    assert row_d == row_c and index.stats.evicted == 1
    assert index.allocate(list(range(80, 88)), pinned={row_a, row_d}) == -1
    # a hash hit whose tokens differ is not served
    index._names[index.names(b)[-1]] = (row_a, 12)
    assert index.lookup(b, index.names(b)) == (row_a, 8)


@pytest.mark.parametrize("prefix_rows, decode_path", [(0, "fused"), (4, "fused"), (4, "model")])
def test_chunked_prefill_equals_whole_prompt_prefill(model, prefix_rows, decode_path):
    """Prompts of 40-58 tokens prefilled in 16-token chunks (with and without pooled prefixes: a chunk then
    continues after the pooled part) give the same greedy and seeded outputs and log-probabilities as whole-prompt
    prefill, and the running slots keep decoding between a long prompt's chunks; both cache layouts of the slots
    (the fused path's per-layer heads-first cache, the model path's stacked one)."""
    prompts = _workload()
    kw = dict(batch_size=4, max_len=64, chunk=4, **FEW, prefix_cache_rows=prefix_rows, decode_path=decode_path)
    whole = SamplingEngine(model, None, **kw, prefill_chunk=None)
    chunked = SamplingEngine(model, None, **kw, prefill_chunk=16)
    for params in (GREEDY, NUCLEUS):
        want = {r.id: (r.output_ids, r.logprobs) for r in whole.generate(Request(i, p, params) for i, p in prompts)}
        got = {r.id: (r.output_ids, r.logprobs) for r in chunked.generate(Request(i, p, params) for i, p in prompts)}
        assert got.keys() == want.keys()
        for rid in want:
            assert got[rid][0] == want[rid][0], rid
            np.testing.assert_allclose(got[rid][1], want[rid][1], atol=1e-5)
    assert chunked.timing.prefill_chunks > 0 and whole.timing.prefill_chunks == 0
    assert chunked.timing.prompt_tokens == whole.timing.prompt_tokens

    # incremental API: a short request admitted next to a long one produces tokens while the long one is still
    # being prefilled chunk by chunk
    fresh = np.random.RandomState(9).randint(3, 96, 58).tolist()  # shares no prefix with anything cached
    long_ids, short_ids = fresh, prompts[0][1][:10]
    chunked.submit(Request("long", long_ids, GREEDY))
    chunked.submit(Request("short", short_ids, GREEDY))
    seen_short_tokens_while_long_prefills = False
    finished = {}
    while chunked.busy():
        for r in chunked.step():
            finished[r.id] = r.output_ids
        live = {rec.request.id: rec for rec in chunked._live if rec is not None}
        if "long" in live and live["long"].prefilled is not None and "short" in live and live["short"].output_ids:
            seen_short_tokens_while_long_prefills = True
    assert seen_short_tokens_while_long_prefills
    assert finished["long"] == want_greedy_for(whole, long_ids) and finished["short"] == want_greedy_for(whole, short_ids)


def want_greedy_for(engine, ids):
    return next(iter(engine.generate([Request("ref", ids, GREEDY)]))).output_ids
