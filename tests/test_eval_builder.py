"""Test-set builder: simulated corpus sessions -> WikiRoleEval records (labels, evidence, candidates), loadable."""

from __future__ import annotations

import json

import pytest

from ditto_jax.config import ConfigError, load_config
from ditto_jax.data.characters import default_characters
from ditto_jax.data.corpus import read_sessions
from ditto_jax.eval.builder import BuildTestSetConfig, build_testset, convert_corpus, pick_candidates
from ditto_jax.eval.testsets import load_wikiroleeval, session_to_json
from ditto_jax.fileio import atomic_write_jsonl
from ditto_jax.tokenizer import default_tokenizer_path


def sample_sessions():
    from pathlib import Path

    return read_sessions(Path(default_tokenizer_path()).parent / "sample_corpus.jsonl")[0]


def test_convert_keeps_labels_evidence_and_system(tmp_path):
    sessions = sample_sessions()
    characters = default_characters()
    cfg = BuildTestSetConfig(simulation={}, num_candidates=4, min_turns=2, max_turns=5)
    evals, stats = convert_corpus(sessions, characters, cfg)
    by_id = {c.id: c for c in characters}
    assert stats["sessions"] == len(evals) and len(evals) + sum(stats["dropped"].values()) == len(sessions)
    for ev, src in zip(evals, [s for s in sessions if len([t for t in s.turns if t.role == "user"]) >= 2]):
        users = [t for t in src.turns if t.role == "user"][:5]
        assert ev.id == f"wre-{src.id}" and ev.system == src.system and ev.lang == src.lang
        assert [t.prompt for t in ev.turns] == [t.content for t in users]
        assert [t.reject for t in ev.turns] == [int(bool(t.reject)) for t in users]
        assert [list(t.evidence) for t in ev.turns] == [t.evidence or [] for t in users]
        char = by_id[src.character]
        assert ev.label == char.label and ev.summary == char.summary and ev.character == char.id
        assert len(ev.candidates) == 4 and len(set(ev.candidates)) == 4 and ev.label in ev.candidates
    assert stats["reject_turns"] == sum(t.reject for e in evals for t in e.turns) > 0
    # written in our WikiRoleEval layout and read back identically
    path = tmp_path / "wre.jsonl"
    atomic_write_jsonl(path, [session_to_json(e) for e in evals])
    assert load_wikiroleeval(path)[0] == evals


def test_candidates_are_seeded_same_language_distractors():
    chars = default_characters()
    zh = next(c for c in chars if c.lang == "zh")
    a = pick_candidates(zh, chars, 4, 0, "s1")
    assert a == pick_candidates(zh, chars, 4, 0, "s1")
    assert zh.label in a and len(set(a)) == 4
    labels = {c.label: c.lang for c in chars}
    assert all(labels[x] == "zh" for x in a)
    positions = {pick_candidates(zh, chars, 4, 0, f"s{i}").index(zh.label) for i in range(40)}
    assert positions == {0, 1, 2, 3}  # the true role is not always in the same slot
    with pytest.raises(ValueError, match="distractors are needed"):
        pick_candidates(zh, chars[:2], 4, 0, "s1")


def test_too_few_turns_and_unknown_characters_are_counted():
    sessions = sample_sessions()
    cfg = BuildTestSetConfig(simulation={}, min_turns=99)
    evals, stats = convert_corpus(sessions, default_characters(), cfg)
    assert evals == [] and stats["dropped"] == {"too_few_turns": len(sessions)}
    evals, stats = convert_corpus(sessions, [c for c in default_characters() if c.id != sessions[0].character],
                                  BuildTestSetConfig(simulation={}))
    assert stats["dropped"]["unknown_character"] >= 1


def test_builder_refuses_training_characters(tmp_path):
    cfg = load_config(BuildTestSetConfig, "eval/testset-tiny", ["simulation.characters.split=train"])
    with pytest.raises(ConfigError, match="must be 'heldout'"):
        build_testset(cfg, tmp_path)
    assert json.dumps(cfg.simulation)  # the config stays plain data
