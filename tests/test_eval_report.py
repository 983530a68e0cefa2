"""Reports: the paper's table with runs side by side, unparsable counts, the PNG chart, ``eval report``."""

from __future__ import annotations

import json

import pytest

from ditto_jax.cli import main
from ditto_jax.eval.report import load_runs, render_markdown, results_table, write_comparison


def fake_report(name: str, cons: float, know: float | None, rej: float, mt: float | None) -> dict:
    split = {"consistency": cons, "knowledge": know, "rejection": rej}
    return {"name": name, "metrics": {"all": split, "en": split, "zh": {"consistency": None, "knowledge": None,
                                                                        "rejection": None}},
            "mtbench": None if mt is None else {"roleplay": mt, "turn1": mt, "turn2": mt, "questions": 10,
                                                "answers": 20, "set": "mtbench"},
            "unparsable": {"consistency": {"samples": 2, "turns": 1, "total_samples": 30, "reasons": {"length": 2}},
                           "knowledge": {"samples": 0, "turns": 0, "total_samples": 30, "reasons": {}},
                           "rejection": {"samples": 0, "turns": 0, "total_samples": 30, "reasons": {}}},
            "counts": {"sessions": 2, "turns": 10, "turns_by_lang": {"en": 10, "zh": 0}},
            "models": {"candidate": {"source": f"checkpoint /ckpt/{name}"}, "judge": {"source": "judge", "samples": 3}}}


def test_results_table_layout():
    table = results_table([("seed", fake_report("seed", 0.5, 6.25, 0.8, 5.0)),
                           ("ditto", fake_report("ditto", 0.9, None, 0.75, None))])
    lines = table.splitlines()
    assert lines[0] == ("| Model | All Cons. | All Know. | All Rej. | En Cons. | En Know. | En Rej. | Zh Cons. | "
                        "Zh Know. | Zh Rej. | MT-Bench roleplay |")
    assert lines[2] == "| seed | 0.50 | 6.25 | 0.80 | 0.50 | 6.25 | 0.80 | – | – | – | 5.00 |"
    assert lines[3] == "| ditto | 0.90 | – | 0.75 | 0.90 | – | 0.75 | – | – | – | – |"
    # the shipped project-written questions are not called MT-Bench
    project = fake_report("seed", 0.5, 6.25, 0.8, 5.0)
    project["mtbench"]["set"] = "project"
    assert results_table([("seed", project)]).splitlines()[0].endswith("| Roleplay (project set) |")


def test_markdown_lists_unparsable_counts_and_models():
    md = render_markdown([("seed", fake_report("seed", 0.5, 6.0, 0.8, 5.0))])
    assert "2/30 samples, 1 turns (length 2)" in md
    assert "checkpoint /ckpt/seed" in md and "![results](report.png)" in md


def test_write_comparison_and_cli_report(tmp_path):
    for name, cons in (("seed", 0.4), ("ditto", 0.9)):
        d = tmp_path / name
        d.mkdir()
        (d / "report.json").write_text(json.dumps(fake_report(name, cons, 5.0, 0.5, 6.0)))
    out = tmp_path / "cmp"
    assert main(["eval", "report", "--runs", str(tmp_path / "seed"), str(tmp_path / "ditto"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| seed | 0.40 |" in md and "| ditto | 0.90 |" in md
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # name clash across dirs: disambiguated by the dir name
    runs = load_runs([tmp_path / "seed", tmp_path / "seed" / "report.json"])
    assert [n for n, _ in runs] == ["seed@seed", "seed@seed"]


def test_load_runs_rejects_non_reports(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="not an evaluation report"):
        load_runs([tmp_path])
    with pytest.raises(FileNotFoundError):
        load_runs([tmp_path / "missing"])
    paths = write_comparison(tmp_path / "one", [("x", fake_report("x", 0.1, 1.0, 0.2, None))])
    assert paths["png"].exists() and paths["md"].exists()
