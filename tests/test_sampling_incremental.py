"""The engine's incremental API (what a server drives): submit while the loop runs, per-token callbacks,
cancel; results equal ``generate``'s."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ditto_jax.model import ModelConfig, create_model
from ditto_jax.sampling import Request, SamplingEngine, SamplingParams

PARAMS = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=12, ignore_eos=True, seed=1)
ENGINE = dict(batch_size=2, max_len=64, chunk=4, min_bucket=64, prefill_batch=1)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128)
    return create_model(cfg, seed=5)


def _requests(n=5):
    rng = np.random.RandomState(0)
    return [Request(f"r{i}", rng.randint(3, 96, 10 + 3 * i).tolist(), PARAMS) for i in range(n)]


def test_submit_step_stream_and_cancel(model):
    want = {r.id: r.output_ids for r in SamplingEngine(model, None, **ENGINE).generate(_requests())}
    engine = SamplingEngine(model, None, **ENGINE)
    streamed: dict[str, list[int]] = {}

    def on_token(rid, ids):
        streamed.setdefault(rid, []).extend(ids)

    reqs = _requests()
    for r in reqs[:3]:
        engine.submit(r, on_token=on_token)
    with pytest.raises(ValueError, match="same id"):
        engine.submit(reqs[0])
    results = {}
    results.update({r.id: r for r in engine.step()})  # admits r0, r1 (2 slots); r2 queued
    assert engine.busy() and not results
    # submitted from another thread while the loop runs
    t = threading.Thread(target=lambda: [engine.submit(r, on_token=on_token) for r in reqs[3:]])
    t.start()
    t.join()
    assert engine.cancel("r1") and not engine.cancel("nope")
    while engine.busy():
        results.update({r.id: r for r in engine.step()})
    assert sorted(results) == [r.id for r in reqs]
    assert results["r1"].finish_reason == "cancelled" and len(results["r1"].output_ids) < 12
    for rid, res in results.items():
        assert streamed.get(rid, []) == res.output_ids  # the stream is exactly the result's tokens
        if rid != "r1":
            assert res.output_ids == want[rid] and res.finish_reason == "length"
    assert not engine.cancel("r0")  # finished: unknown now
    # a cancelled queued request never takes a slot
    engine.submit(reqs[0])
    assert engine.cancel("r0")
    (only,) = engine.step()
    assert only.id == "r0" and only.finish_reason == "cancelled" and only.output_ids == []
    assert not engine.busy()
