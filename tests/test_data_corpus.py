"""Corpus: session validation with lines/reasons, shards, TFDS array_record build, CLI build/stats."""

from __future__ import annotations

import json

import pytest
from data_fixtures import corpus_lines, make_session, write_jsonl

from ditto_jax.cli import main as cli_main
from ditto_jax.data import corpus
from ditto_jax.data.records import RecordFileError


def test_session_validation_reasons(tmp_path):
    no_system = make_session(3)
    del no_system["system"]
    bad_role = make_session(4)
    bad_role["turns"][1]["role"] = "narrator"
    order = make_session(5)
    order["turns"] = order["turns"][1:] + order["turns"][:1]
    empty = make_session(6)
    empty["turns"][1]["content"] = ""
    wrong = make_session(7)
    wrong["turns"][0]["reject"] = "yes"
    path = write_jsonl(tmp_path / "c.jsonl", [
        make_session(1), "{", no_system, bad_role, order, empty, wrong, b"\xc3\x28", make_session(1), make_session(2),
    ])
    sessions, report = corpus.read_sessions(path, on_error="skip")
    assert [s.id for s in sessions] == ["s00001", "s00002"]
    assert report.skipped == {"malformed_json": 1, "missing_field": 1, "unknown_role": 1, "bad_value": 1,
                              "empty_field": 1, "wrong_type": 1, "invalid_utf8": 1}
    assert report.duplicates == 1
    by_line = {e.line: e for e in report.errors}
    assert by_line[4].field == "turns.1.role" and by_line[6].field == "turns.1.content"
    assert "user/assistant alternate" in by_line[5].message
    with pytest.raises(RecordFileError, match=r"c.jsonl:2: malformed JSON"):
        corpus.read_sessions(path)
    s = sessions[0]
    assert s.messages()[0] == {"role": "system", "content": "You are Person, a king."}
    assert s.to_json()["source"] == {"model": "test"}  # provenance kept
    assert s.turns[0].kind == "role_specific" and s.turns[0].reject is False


def test_shards_roundtrip(tmp_path):
    sessions = [corpus.parse_session(r) for r in corpus_lines(25)]
    paths = corpus.write_shards(sessions, tmp_path / "shards", shard_size=10)
    assert [p.name for p in paths] == [f"sessions-0000{k}-of-00003.jsonl" for k in range(3)]
    back, report = corpus.read_sessions(tmp_path / "shards")
    assert back == sessions and report.kept == 25


def test_build_tfds_and_stats_cli(tmp_path, capsys):
    lines = corpus_lines(40) + ["not json"]
    write_jsonl(tmp_path / "a.jsonl", lines[:20])
    write_jsonl(tmp_path / "b.jsonl", lines[20:])
    out = tmp_path / "built"
    assert cli_main(["corpus", "build", "--input", str(tmp_path / "*.jsonl"), "--out", str(out),
                     "--validation-fraction", "0.25"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["read"]["skipped"] == {"malformed_json": 1}
    assert sum(summary["splits"].values()) == 40 and summary["splits"]["validation"] > 0
    assert list(out.glob("role_play_corpus/1.0.0/*.array_record-*"))
    train = corpus.load_corpus(out, "train")
    val = corpus.load_corpus(out, "validation")
    assert len(train) == summary["splits"]["train"] and not {s.id for s in train} & {s.id for s in val}
    assert {s.id for s in train} | {s.id for s in val} == {r["id"] for r in lines[:40]}
    for s in val:
        assert corpus.assign_split(s.id, 0.25) == "validation"

    assert cli_main(["corpus", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    expected_turns = sum(len(r["turns"]) // 2 for r in lines[:40])
    assert stats["sessions"] == 40 and stats["turns"] == expected_turns
    assert stats["by_lang"]["en"]["sessions"] + stats["by_lang"]["zh"]["sessions"] == 40
    assert stats["by_kind"]["role_specific"] + stats["by_kind"]["contrastive"] == expected_turns
    assert stats["by_kind"]["contrastive"] == stats["by_reject"]["true"]
    assert 0 < stats["trained_tokens"] < stats["tokens"]
    # stats of JSONL input agree with the built corpus
    assert cli_main(["corpus", "stats", str(tmp_path / "*.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == stats["tokens"]


def test_validate_cli(tmp_path, capsys):
    good = write_jsonl(tmp_path / "g.jsonl", corpus_lines(3))
    bad = write_jsonl(tmp_path / "b.jsonl", corpus_lines(2) + ['{"id": "x"}'])
    assert cli_main(["corpus", "validate", str(good)]) == 0
    assert cli_main(["corpus", "validate", str(bad)]) == 1
    assert f"{bad}:3: character: Field required" in capsys.readouterr().out
