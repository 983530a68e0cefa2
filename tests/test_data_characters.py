"""Character knowledge base: schema, Ditto layout, validation errors with lines, dedupe, CLI."""

from __future__ import annotations

import json

import pytest
from data_fixtures import write_jsonl

from ditto_jax.cli import main as cli_main
from ditto_jax.data import characters as ch
from ditto_jax.data.records import RecordFileError


def make_character(i: int, lang: str = "en", split: str = "train", **over) -> dict:
    """A valid record in our schema."""
    rec = {
        "id": f"c{i}",
        "label": f"Person {i}" if lang == "en" else f"人物{i}",
        "description": "a scholar of the old kingdom" if lang == "en" else "古代学者",
        "aliases": [f"P{i}"],
        "claims": {"occupation": "scholar", "country": "Old Kingdom", "born": "1100", "died": "1170", "sex": "male"},
        "category": "real" if i % 2 else "fictional",
        "lang": lang,
        "summary": "A scholar who wrote about rivers.",
        "wiki": "Person was a scholar. " * 20,
        "era": {"start": 1100, "end": 1170, "period": "Middle Ages"},
        "domain": "scholarship",
        "split": split,
    }
    rec.update(over)
    return rec


def test_load_valid_file_and_splits(tmp_path):
    path = tmp_path / "kb.jsonl"
    write_jsonl(path, [make_character(1), make_character(2, "zh"), make_character(3, split="heldout")])
    chars = ch.load_characters(path)
    assert [c.id for c in chars] == ["c1", "c2", "c3"]
    assert chars[0].era == ch.Era(start=1100, end=1170, period="Middle Ages")
    assert [c.id for c in ch.held_out(chars)] == ["c3"] and len(ch.train_split(chars)) == 2
    stats = ch.character_stats(chars)
    assert stats["by_lang"] == {"en": 2, "zh": 1} and stats["by_split"] == {"heldout": 1, "train": 2}
    assert chars[1].brief_intro() == "你是人物2，古代学者。"
    assert chars[0].brief_intro() == "You are Person 1, a scholar of the old kingdom."


def test_every_problem_reported_with_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    missing = make_character(4)
    del missing["summary"]
    write_jsonl(path, [
        make_character(1),                                   # 1 ok
        "{not json",                                         # 2 malformed
        make_character(2, category="robot"),                 # 3 bad literal
        missing,                                             # 4 missing field
        make_character(5, aliases="x"),                      # 5 wrong type
        b"\xff\xfe{}",                                       # 6 invalid utf-8
        make_character(1),                                   # 7 duplicate id
        make_character(8, label=""),                         # 8 empty
        make_character(9, era={"start": 1200, "end": 1100}),  # 9 bad era
        make_character(10, extra=1),                         # 10 unknown field
        "[1, 2]",                                            # 11 not an object
    ])
    errors, report = ch.validate_characters(path)
    by_line = {e.line: e for e in errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert by_line[3].field == "category" and by_line[4].field == "summary" and by_line[5].field == "aliases"
    assert by_line[8].field == "label" and by_line[10].field == "extra"
    assert str(by_line[2]).startswith(f"{path}:2: malformed JSON")
    assert report.skipped == {"malformed_json": 1, "bad_value": 2, "missing_field": 1, "wrong_type": 2,
                              "invalid_utf8": 1, "empty_field": 1, "unknown_field": 1}
    assert report.duplicates == 1 and report.kept == 1
    with pytest.raises(RecordFileError, match=r"bad.jsonl:2: malformed JSON"):
        ch.load_characters(path)
    assert [c.id for c in ch.load_characters(path, on_error="skip")] == ["c1"]


def test_ditto_release_layout_normalised(tmp_path):
    path = tmp_path / "ditto.jsonl"
    write_jsonl(path, [
        {"role_meta_info": {
            "label": "Edward III of England", "description": "King of England", "aliases": "Edward of Windsor, Edward III",
            "claims": [{"property": "occupation", "value": ["monarch", "military leader"]},
                       {"property": "date of birth", "value": {"label": "1312"}}],
            "category": "Human", "lang": "English", "wiki": {"title": "Edward III", "content": "Edward III was king.\n\nMore."},
        }},
        {"label": "孙悟空", "description": "西游记人物", "aliases": ["齐天大圣"], "claims": {"作品": ["西游记"]},
         "category": "fictional human", "lang": "zh", "wiki": {"content": "孙悟空是……"}, "summary": "猴王",
         "split": "test"},
    ])
    a, b = ch.load_characters(path)
    assert a.id == "edward_iii_of_england" and a.aliases == ["Edward of Windsor", "Edward III"]
    assert a.claims == {"occupation": "monarch; military leader", "date of birth": "1312"}
    assert (a.category, a.lang, a.wiki, a.summary) == ("real", "en", "Edward III was king.\n\nMore.", "Edward III was king.")
    assert (b.category, b.lang, b.split, b.claims) == ("fictional", "zh", "heldout", {"作品": "西游记"})


def test_cli_validate_and_stats(tmp_path, capsys):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_jsonl(good, [make_character(1), make_character(2, "zh", split="heldout")])
    write_jsonl(bad, [make_character(1), "{oops", make_character(3, lang="fr")])
    assert cli_main(["characters", "validate", str(good)]) == 0
    assert cli_main(["characters", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: malformed JSON" in out and f"{bad}:3: lang:" in out
    assert cli_main(["characters", "stats", str(good), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["by_lang"] == {"en": 1, "zh": 1} and stats["by_split"] == {"heldout": 1, "train": 1}
    assert stats["by_category"] == {"fictional": 1, "real": 1}


def test_embedded_default_when_present():
    files = ch.default_character_files()
    if not files:
        pytest.skip("embedded knowledge base not committed yet")
    chars = ch.default_characters()
    assert len(chars) >= 60 and {c.lang for c in chars} == {"en", "zh"}
    assert len(ch.held_out(chars)) >= 10
    assert cli_main(["characters", "validate", *map(str, files)]) == 0


def test_tfds_roundtrip(tmp_path):
    path = tmp_path / "kb.jsonl"
    write_jsonl(path, [make_character(1), make_character(2, "zh", split="heldout")])
    chars = ch.load_characters(path)
    ch.build_characters_tfds(chars, tmp_path / "tfds")
    assert sorted(ch.load_characters(tmp_path / "tfds"), key=lambda c: c.id) == chars
