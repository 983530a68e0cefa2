"""Test-set loaders: both WikiRoleEval layouts and MT-Bench question.jsonl; malformed records name file:line:field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditto_jax.data.records import RecordFileError
from ditto_jax.eval.testsets import load_mtbench, load_wikiroleeval, parse_wikiroleeval, session_to_json


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


OURS = {"id": "s1", "system": "You are Ada Lovelace, a mathematician.", "prompts": ["Q1?", "Q2?"],
        "meta": {"label": "Ada Lovelace", "character": "en-ada", "lang": "en",
                 "role_consist_cands": ["Napoleon", "Ada Lovelace", "Zhang Heng", "Sherlock Holmes"],
                 "rejection_labels": [0, 1], "evidence": [["She wrote notes on the Analytical Engine."], []],
                 "summary": "English mathematician."}}

# The Ditto release: no id, scoring fields at top level, "rejection labels" with a space, markdown evidence,
# extra wiki metadata, language spelled out.
DITTO = {"system": "你是张衡。", "prompts": ["地动仪怎么工作？", "你用过手机吗？"], "type": "x", "source": "wiki",
         "role_consist_cands": ["武松", "张衡", "华佗", "林黛玉"], "rejection labels": [0, 1],
         "evidence": ["- 公元132年制成地动仪\n- 八条龙各衔铜珠", ""], "ref_messages": [],
         "meta": {"label": "张衡", "description": "东汉天文学家", "aliases": [], "lang": "zh", "summary": "张衡……",
                  "claims": [["职业", "天文学家"]], "wiki": {"idx": "1", "title": "张衡", "content": "..."}}}


def test_shipped_tiny_sets_load():
    sessions, report = load_wikiroleeval()
    assert len(sessions) == 11 and report.kept == 11
    assert {s.lang for s in sessions} == {"en", "zh"}
    for s in sessions:
        assert s.candidates[s.answer_index] == s.label and len(s.candidates) == 4
        assert all(t.reject in (0, 1) for t in s.turns) and any(t.reject for t in s.turns)
    questions, report = load_mtbench()
    assert [q.question_id for q in questions] == list(range(91, 101))
    assert all(q.category == "roleplay" and len(q.turns) == 2 for q in questions)


def test_both_wikiroleeval_layouts(tmp_path):
    path = write_jsonl(tmp_path / "wre.jsonl", [OURS, DITTO])
    sessions, _ = load_wikiroleeval(path)
    ours, ditto = sessions
    assert ours.id == "s1" and ours.character == "en-ada" and ours.answer_index == 1
    assert [t.reject for t in ours.turns] == [0, 1]
    assert ours.turns[0].evidence == ("She wrote notes on the Analytical Engine.",)
    assert ditto.id == "line00002-张衡" and ditto.lang == "zh" and ditto.description == "东汉天文学家"
    assert ditto.turns[0].evidence == ("公元132年制成地动仪", "八条龙各衔铜珠") and ditto.turns[1].evidence == ()
    assert [t.reject for t in ditto.turns] == [0, 1]
    # round trip of our layout
    assert parse_wikiroleeval(session_to_json(ours)) == ours


@pytest.mark.parametrize("mutate,field,fragment", [
    (lambda r: r["meta"].update(rejection_labels=[0]), "meta.rejection_labels", "1 labels for 2 prompts"),
    (lambda r: r["meta"].update(rejection_labels=[0, 2]), "meta.rejection_labels.1", "Input should be 0 or 1"),
    (lambda r: r["meta"].pop("rejection_labels"), "meta.rejection_labels", "Field required"),
    (lambda r: r["meta"].update(role_consist_cands=["A", "B"]), "meta.role_consist_cands", "not among the candidates"),
    (lambda r: r["meta"].update(evidence=[["x"]]), "meta.evidence", "1 entries for 2 prompts"),
    (lambda r: r["meta"].update(lang="fr"), "meta.lang", "'en' or 'zh'"),
    (lambda r: r.update(prompts=["ok", ""]), "prompts.1", "at least 1 character"),
    (lambda r: r.pop("system"), "system", "Field required"),
])
def test_malformed_wikiroleeval_names_file_line_field(tmp_path, mutate, field, fragment):
    bad = json.loads(json.dumps(OURS))
    bad["id"] = "s2"
    mutate(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", [OURS, bad])
    with pytest.raises(RecordFileError) as info:
        load_wikiroleeval(path)
    err = info.value.errors[0]
    assert (err.path, err.line, err.field) == (str(path), 2, field)
    assert fragment in str(info.value) and f"{path}:2: {field}" in str(info.value)


def test_wikiroleeval_skip_mode_counts(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [OURS, "{not json", OURS, {"system": "x"}])
    sessions, report = load_wikiroleeval(path, on_error="skip")
    assert len(sessions) == 1
    assert report.read == 4 and report.duplicates == 1
    assert dict(report.skipped) == {"malformed_json": 1, "missing_field": 1}
    assert sorted({e.line for e in report.errors}) == [2, 3, 4]
    assert {e.field for e in report.errors if e.line == 4} == {"prompts", "meta"}


def test_mtbench_loader_filters_category_and_rejects_bad_turns(tmp_path):
    recs = [{"question_id": 91, "category": "roleplay", "turns": ["a", "b"], "reference": None},
            {"question_id": 81, "category": "writing", "turns": ["c", "d"]}]
    questions, report = load_mtbench(write_jsonl(tmp_path / "q.jsonl", recs))
    assert [q.question_id for q in questions] == [91]
    assert report.skipped["other_category"] == 1 and report.kept == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", recs[:1] + [{"question_id": 92, "category": "roleplay", "turns": ["x"]}])
    with pytest.raises(RecordFileError, match=r"bad.jsonl:2: turns: expected a list of 2 turns, got 1 turns"):
        load_mtbench(bad)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"question_id": "93", "category": "roleplay", "turns": ["x", "y"]}])
    with pytest.raises(RecordFileError, match=r"bad2.jsonl:1: question_id"):
        load_mtbench(bad)


def test_missing_official_test_set_names_its_origin(tmp_path):
    from ditto_jax.eval.testsets import OFFICIAL_WIKIROLEEVAL

    with pytest.raises(FileNotFoundError, match=r"OFA-Sys/Ditto repository \(data/wiki_roleplay.*git-lfs"):
        load_wikiroleeval(tmp_path / OFFICIAL_WIKIROLEEVAL)
    with pytest.raises(FileNotFoundError, match="lm-sys/FastChat"):
        load_mtbench(tmp_path / "question.jsonl")
