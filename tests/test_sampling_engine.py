"""The sampling engine: greedy equals transformers' generate, cached decoding equals full recompute, results
independent of batching, stops, bucketed compilations, sharded equals unsharded."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import make_hf_model, save_hf

from ditto_jax import hf
from ditto_jax.mesh import MeshConfig, make_mesh
from ditto_jax.sampling import Request, SamplingEngine, SamplingParams

PROMPT_LENS = [3, 9, 14, 21, 5, 30]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
NUCLEUS = SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.1, max_new_tokens=10, seed=7)


class _LetterTokenizer:
    """Decodes token t as chr(ord('a') + t % 26): enough to test stop strings exactly."""

    eos_id = 2
    vocab_size = 128

    def decode(self, ids, skip_special=True):
        return "".join(chr(97 + t % 26) for t in ids)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random-init transformers Qwen2 (fp32) and the same weights imported with ``hf.load_pretrained``."""
    hf_model = make_hf_model("qwen2", seed=3)
    path = save_hf(hf_model, tmp_path_factory.mktemp("qwen2"))
    model, _ = hf.load_pretrained(path)
    return hf_model, model


@pytest.fixture(scope="module")
def engine(hf_pair):
    # prefill_batch=1: one prefill compilation per bucket (16, 32) for the whole module
    return SamplingEngine(hf_pair[1], _LetterTokenizer(), batch_size=4, max_len=48, chunk=4, prefill_batch=1)


def _prompts(n=len(PROMPT_LENS), seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 128, PROMPT_LENS[i % len(PROMPT_LENS)]).tolist() for i in range(n)]


def _run(engine, prompts, params, tag="p"):
    out = {r.id: r for r in engine.generate(Request(f"{tag}{i}", p, params) for i, p in enumerate(prompts))}
    assert sorted(out) == sorted(f"{tag}{i}" for i in range(len(prompts)))
    return [out[f"{tag}{i}"] for i in range(len(prompts))]


def test_greedy_equals_transformers_generate(hf_pair, engine):
    hf_model, _ = hf_pair
    prompts = _prompts()  # 6 prompts of different lengths through 4 slots: slots are reused mid-run
    results = _run(engine, prompts, GREEDY)
    for prompt, res in zip(prompts, results):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                     eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        assert res.output_ids == want
        assert res.finish_reason == ("stop" if want[-1] == 2 else "length")


def test_the_cache_is_aligned_but_a_request_still_ends_at_max_len(hf_pair, engine):
    """``max_len`` 48 allocates 64 positions a slot (a multiple of ``CACHE_ALIGN``); a 40-token prompt still stops at
    48 ("length" after 9 tokens: the last one needs no position), with transformers' greedy tokens up to there."""
    hf_model, _ = hf_pair
    assert engine.cfg.cache_len == 64 and engine.sampler.state.cache.max_len == 64
    prompt = np.random.RandomState(5).randint(3, 128, 40).tolist()
    [res] = _run(engine, [prompt], SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=[]), tag="long")
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    if 2 in want[:9]:  # the engine stops at the end-of-sequence id 2 (the config's); compare up to it
        n = want.index(2) + 1
        assert res.output_ids == want[:n] and res.finish_reason == "stop"
    else:
        assert res.output_ids == want[:9] and res.finish_reason == "length"


def test_decode_reads_a_narrow_cache_width_while_the_rows_are_short(hf_pair):
    """With a 256-position cache the fused decode reads 128 positions while every running row is below that,
    then all 256 (two executables): greedy outputs crossing the boundary still equal transformers'."""
    hf_model, model = hf_pair
    eng = SamplingEngine(model, None, batch_size=2, max_len=256, chunk=4, prefill_batch=1, share_compiled=False)
    assert eng.sampler.read_width(100) == 128 and eng.sampler.read_width(129) == 256
    rng = np.random.RandomState(4)
    prompts = [rng.randint(3, 128, n).tolist() for n in (100, 118)]  # their decodes cross position 128
    params = GREEDY.model_copy(update={"max_new_tokens": 24, "ignore_eos": True})
    results = _run(eng, prompts, params)
    for prompt, res in zip(prompts, results):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                     eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        assert res.output_ids == want
    assert eng.sampler._steps.decode._cache_size() == 2


def test_cached_decoding_equals_full_recompute(hf_pair, engine):
    model = hf_pair[1]
    prompts = _prompts(seed=1)
    results = _run(engine, prompts, GREEDY)
    width = max(len(p) + len(r.output_ids) for p, r in zip(prompts, results))
    seqs = np.zeros((len(prompts), width), np.int32)  # right padding never changes earlier positions
    for i, (p, r) in enumerate(zip(prompts, results)):
        seqs[i, :len(p) + len(r.output_ids)] = p + r.output_ids
    logp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, ids: m(ids))(model, seqs)))
    for i, (prompt, res) in enumerate(zip(prompts, results)):
        positions = np.arange(len(prompt) - 1, len(prompt) - 1 + len(res.output_ids))
        np.testing.assert_array_equal(logp[i, positions].argmax(-1), res.output_ids)
        np.testing.assert_allclose(logp[i, positions, res.output_ids], res.logprobs, atol=2e-5)


def test_sampling_is_independent_of_batch_composition_and_order(engine):
    prompts = _prompts()
    together = _run(engine, prompts, NUCLEUS)
    reordered = {r.id: r for r in engine.generate(
        Request(f"p{i}", prompts[i], NUCLEUS) for i in (5, 2, 0))}  # other slots, other neighbours
    for i in (5, 2, 0):
        assert reordered[f"p{i}"].output_ids == together[i].output_ids
    other_seed = _run(engine, prompts, NUCLEUS.model_copy(update={"seed": 8}))
    assert [r.output_ids for r in other_seed] != [r.output_ids for r in together]
    assert len({tuple(r.output_ids) for r in together}) == len(prompts)


def test_stop_token_ids_and_max_new_tokens(engine):
    prompts = _prompts()
    base = _run(engine, prompts, GREEDY)
    target = base[0].output_ids[4]
    stopped = _run(engine, prompts[:1], GREEDY.model_copy(update={"stop_token_ids": [target]}))[0]
    cut = base[0].output_ids.index(target) + 1
    assert stopped.output_ids == base[0].output_ids[:cut] and stopped.finish_reason == "stop"
    short = _run(engine, prompts, GREEDY.model_copy(update={"max_new_tokens": 1}))
    assert [r.output_ids for r in short] == [r.output_ids[:1] for r in base]


def test_stop_strings_cut_the_text_exactly(engine):
    prompts = _prompts()
    base = _run(engine, prompts, GREEDY)
    text = base[1].text
    stop = text[5:7]  # a two-character stop string that first completes at some token
    res = _run(engine, prompts[1:2], GREEDY.model_copy(update={"stop_strings": [stop]}))[0]
    first = text.find(stop)
    assert res.text == text[:first] and res.finish_reason == "stop"
    assert res.output_ids == base[1].output_ids[:first + len(stop)]


def test_compilations_stay_constant_after_warm_up(hf_pair, engine):
    # The model's own decode forward here (the module engine uses the fused CPU layout): same greedy tokens.
    model_path = SamplingEngine(hf_pair[1], None, batch_size=4, max_len=48, chunk=4, prefill_batch=1,
                                decode_path="model")
    assert [r.output_ids for r in _run(model_path, _prompts(), GREEDY)] == [
        r.output_ids for r in _run(engine, _prompts(), GREEDY)]
    engine = model_path
    rng = np.random.RandomState(5)

    def stream(n, tag):
        for i in range(n):
            length = int(rng.choice([3, 15, 17, 30]))  # buckets 16 and 32
            params = GREEDY.model_copy(update={"max_new_tokens": int(rng.randint(1, 9))})
            yield Request(f"{tag}{i}", rng.randint(3, 128, length).tolist(), params)

    assert len(list(engine.generate(stream(6, "w")))) == 6
    warm = engine.compile_count()
    assert warm <= 3  # one decode + one prefill per bucket
    assert len(list(engine.generate(stream(25, "s")))) == 25
    assert engine.compile_count() == warm


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_sharded_sampling_equals_unsharded(hf_pair, engine, tmp_path):
    shape = (2, 2, 2)  # rows over data x fsdp, kv heads over tensor
    prompts = _prompts(8, seed=2)
    want = _run(engine, prompts, NUCLEUS)
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    model, _ = hf.load_pretrained(save_hf(hf_pair[0], tmp_path / "m"), mesh=mesh)
    sharded = SamplingEngine(model, _LetterTokenizer(), batch_size=8, max_len=48, chunk=4, mesh=mesh)
    got = _run(sharded, prompts, NUCLEUS)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    np.testing.assert_allclose(np.concatenate([r.logprobs for r in got]),
                               np.concatenate([r.logprobs for r in want]), atol=1e-4)
    cache = sharded.sampler.state.cache  # per layer, heads first on the CPU path: k [B, Hkv, D, S], v [B, Hkv, S, D]
    assert cache.heads_first
    for arr in (cache.k[0], cache.v[0]):
        spec = arr.sharding.spec
        assert spec[0] == ("data", "fsdp") and spec[1] == "tensor"
