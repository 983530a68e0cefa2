"""Grain pipeline: batch contract, packing, exact resume, sharding, epochs, over-long, skips, sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import corpus_lines, make_session, write_jsonl

from ditto_jax.data import corpus
from ditto_jax.data.pipeline import BATCH_KEYS, DataConfig, encode_session, make_pipeline, reason_counts
from ditto_jax.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    return write_jsonl(path, corpus_lines(60))


def cfg(path, **over) -> DataConfig:
    base = dict(paths=[str(path)], seq_len=256, global_batch_size=4, seed=3)
    return DataConfig(**(base | over))


def _segments(batch: dict, row: int):
    seg = batch["segment_ids"][row]
    for s in sorted(set(seg[seg > 0].tolist())):
        idx = np.nonzero(seg == s)[0]
        yield idx


@pytest.mark.parametrize("packing", ["first_fit", "best_fit", "none"])
def test_batches_follow_the_contract(tok, jsonl, packing):
    sessions, _ = corpus.read_sessions(jsonl)
    expected = {}
    for s in sessions:  # what each session becomes (long ones truncated at a turn boundary)
        ex = encode_session(s, tok, 256, "truncate")
        expected[tuple(ex["tokens"].tolist()) + (int(ex["targets"][-1]),)] = [0.0] + ex["loss_mask"].tolist()
    pipe = make_pipeline(cfg(jsonl, packing=packing), tok, 0, 1)
    it = pipe.iterator()
    seen = 0
    for _ in range(6):
        b = next(it)
        assert set(b) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert b[k].shape == (4, 256)
        assert b["loss_mask"].dtype == np.float32 and all(b[k].dtype == np.int32 for k in BATCH_KEYS if k != "loss_mask")
        pad = b["segment_ids"] == 0
        assert not b["loss_mask"][pad].any() and (b["positions"][pad] == 0).all()
        for row in range(4):
            for idx in _segments(b, row):
                assert (np.diff(idx) == 1).all()  # a segment is contiguous
                assert (b["positions"][row, idx] == np.arange(len(idx))).all()
                full = tuple(b["tokens"][row, idx].tolist() + [int(b["targets"][row, idx[-1]])])
                assert full in expected, "segment is not a whole tokenized session"
                assert (b["targets"][row, idx[:-1]] == b["tokens"][row, idx[1:]]).all()
                assert b["loss_mask"][row, idx].tolist() == expected[full][1:]
                seen += 1
    assert seen >= 24
    if packing != "none":
        assert it.packing_efficiency > 0.6
        assert seen > 24  # more than one session per row


@pytest.mark.parametrize("packing", ["first_fit", "none"])
def test_state_restores_exactly(tok, jsonl, packing):
    pipe = make_pipeline(cfg(jsonl, packing=packing, num_epochs=None), tok, 0, 1)
    it = pipe.iterator()
    for _ in range(7):  # crosses an epoch boundary (60 sessions)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    after = [next(it) for _ in range(3)]
    fresh = pipe.iterator()
    fresh.set_state(state)
    for want in after:
        got = next(fresh)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    assert fresh.stats() == it.stats()
    restored = make_pipeline(cfg(jsonl, packing=packing), tok, 0, 1).iterator()
    restored.set_state(it.state_bytes())
    np.testing.assert_array_equal(next(restored)["tokens"], next(it)["tokens"])


def test_epochs_reshuffle_and_cover_everything_once(tok, jsonl):
    c = cfg(jsonl, packing="none", global_batch_size=1, num_epochs=2)
    it = make_pipeline(c, tok, 0, 1).iterator()
    firsts = [tuple(b["tokens"][0].tolist()) for b in it]
    assert len(firsts) == 120
    e1, e2 = firsts[:60], firsts[60:]
    assert sorted(e1) == sorted(e2) and e1 != e2 and len(set(e1)) == 60


def test_process_shards_are_disjoint_and_cover(tok, jsonl):
    c = cfg(jsonl, packing="none", global_batch_size=2, num_epochs=1, shuffle=False)
    rows = []
    for p in range(2):
        pipe = make_pipeline(c, tok, p, 2)
        assert pipe.batch_size == 1 and pipe.summary.sessions_in_shard == 30
        rows.append({tuple(b["tokens"][0].tolist()) for b in pipe.iterator()})
    assert len(rows[0]) == len(rows[1]) == 30 and not rows[0] & rows[1]
    with pytest.raises(ValueError, match="not divisible"):
        make_pipeline(cfg(jsonl, global_batch_size=3), tok, 0, 2)


def test_over_long_truncate_or_drop_counted(tok, tmp_path):
    long = make_session(1, exchanges=6, words=30)
    path = write_jsonl(tmp_path / "l.jsonl", [long, make_session(2, exchanges=1, words=3)])
    s = corpus.parse_session(long)
    full = len(tok.encode_chat(s.messages())[0])
    two = len(tok.encode_chat(s.messages()[:5])[0])
    seq_len = two + 5
    assert full > seq_len + 1
    pipe = make_pipeline(cfg(path, seq_len=seq_len, global_batch_size=1, packing="none", num_epochs=1), tok, 0, 1)
    assert (pipe.summary.over_long_truncated, pipe.summary.turns_truncated, pipe.summary.examples) == (1, 4, 2)
    lengths = sorted(int((b["segment_ids"] > 0).sum()) for b in pipe.iterator())
    assert lengths[-1] == two - 1
    pipe = make_pipeline(cfg(path, seq_len=seq_len, over_long="drop", global_batch_size=1, num_epochs=1), tok, 0, 1)
    assert pipe.summary.over_long_dropped == 1 and pipe.summary.examples == 1
    assert reason_counts(pipe.summary) == {"over_long_dropped": 1}
    ex = encode_session(s, tok, 10, "truncate")
    assert ex is None  # not even one exchange fits


def test_bad_input_counted_in_summary(tok, tmp_path):
    bad_role = make_session(5)
    bad_role["turns"][0]["role"] = "bot"
    lines = corpus_lines(8) + ["{", b"\xff", bad_role, {"id": "x"}, make_session(0)]
    path = write_jsonl(tmp_path / "b.jsonl", lines)
    pipe = make_pipeline(cfg(path), tok, 0, 1)
    counts = reason_counts(pipe.summary)
    assert counts == {"duplicate": 1, "invalid_utf8": 1, "malformed_json": 1, "missing_field": 1,
                      "unknown_role": 1}
    assert pipe.summary.to_dict()["read"]["kept"] == 8
    with pytest.raises(Exception, match="b.jsonl:9: malformed JSON"):
        make_pipeline(cfg(path, on_error="fail"), tok, 0, 1)


def test_tfds_and_array_record_sources_match_jsonl(tok, jsonl, tmp_path):
    corpus.build_corpus(jsonl, tmp_path / "built", validation_fraction=0.0)
    sessions, _ = corpus.read_sessions(jsonl)
    corpus.write_array_record(sessions, tmp_path / "ar" / "c.array_record")

    def all_rows(c):
        return sorted(tuple(b["tokens"][0].tolist()) for b in make_pipeline(c, tok, 0, 1).iterator())

    common = dict(packing="none", global_batch_size=1, num_epochs=1)
    want = all_rows(cfg(jsonl, **common))
    assert all_rows(cfg(tmp_path / "built", **common)) == want
    assert all_rows(cfg(tmp_path / "ar", **common)) == want


def test_worker_processes_give_the_same_batches(tok, jsonl):
    c = cfg(jsonl, num_epochs=1)
    ref = [b["tokens"] for b in make_pipeline(c, tok, 0, 1).iterator()]
    got = [b["tokens"] for b in make_pipeline(c.model_copy(update={"workers": 1}), tok, 0, 1).iterator()]
    assert len(got) == len(ref) > 0
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
