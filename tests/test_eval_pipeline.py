"""End-to-end evaluation on tiny random-init models: report contract, wiring checked against raw judge outputs,
resume after a kill (no finished turn judged again), config mismatch, the CLI, unparsable outputs counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ditto_jax.cli import main
from ditto_jax.config import ConfigError, dump_config, pin_config, validate
from ditto_jax.eval import judge as J
from ditto_jax.eval import wikiroleeval as W
from ditto_jax.eval.config import EvalConfig
from ditto_jax.eval.metrics import aggregate
from ditto_jax.eval.pipeline import run_eval
from ditto_jax.eval.report import load_runs
from ditto_jax.eval.stages import DONE, LOG, read_outputs
from ditto_jax.eval.testsets import default_wikiroleeval_path, load_wikiroleeval

TINY = {"config": "model/tiny", "seed": 0}


def config(testset: Path, **judge) -> EvalConfig:
    data = {
        # two candidates side by side; the second is the same model, so its answers and scores must be identical
        "candidates": [{"name": "seed", "model": TINY}, {"name": "again", "model": TINY}],
        # the judge is the candidate's model: loaded and compiled once (tests stay fast)
        # the terse protocol keeps these wiring tests fast; the reference protocol: tests/test_eval_protocol.py
        "judge": {"model": TINY, "protocol": "terse", "samples": 3, "max_answer_chars": 120, "max_summary_chars": 80,
                  "max_evidence_chars": 80, **judge},
        "calibration": {"enabled": False},
        "testset": {"wikiroleeval": str(testset), "max_turns": 2, "mtbench_limit": 1},
        "answer": {"max_new_tokens": 6},
        "engine": {"batch_size": 8, "max_len": 512, "min_bucket": 256, "chunk": 8, "mesh": None},
    }
    return validate(EvalConfig, data)


@pytest.fixture(scope="module")
def testset(tmp_path_factory) -> Path:
    """One Chinese and one English session of the shipped set."""
    lines = default_wikiroleeval_path().read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("testset") / "wre.jsonl"
    path.write_text(lines[1] + "\n" + lines[6] + "\n", encoding="utf-8")
    return path


# loaded models (compiled engines) shared by the runs of this module, as a caller evaluating several work dirs would
MODELS: dict = {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, testset) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("eval")
    return workdir, run_eval(config(testset), workdir, MODELS)


def test_report_contract(finished):
    workdir, report = finished
    on_disk = json.loads((workdir / "report.json").read_text())
    assert on_disk == report and report["runs"] == ["seed", "again"]
    assert set(report["metrics"]) == {"all", "en", "zh"}
    for split in ("all", "en", "zh"):
        m = report["metrics"][split]
        assert set(m) == {"consistency", "knowledge", "rejection"}
        assert 0 <= m["consistency"] <= 1 and 1 <= m["knowledge"] <= 10 and 0 <= m["rejection"] <= 1
    assert report["counts"]["turns"] == 4 and report["counts"]["turns_by_lang"] == {"en": 2, "zh": 2}
    assert report["counts"]["judge_requests"] == 4 * 3 * 3 + 2 * 3
    # constrained decoding: every judge output parsed
    assert all(u["samples"] == 0 and u["turns"] == 0 for u in report["unparsable"].values())
    assert report["unparsable"]["consistency"]["total_samples"] == 12
    assert report["mtbench"]["answers"] == 2 and 1 <= report["mtbench"]["roleplay"] <= 10
    assert report["models"]["judge"]["samples"] == 3
    md = (workdir / "report.md").read_text()
    assert "| seed |" in md and "MT-Bench roleplay" in md
    assert (workdir / "report.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((workdir / "runs" / "seed" / "report.json").read_text())["metrics"] == report["metrics"]
    again = json.loads((workdir / "runs" / "again" / "report.json").read_text())
    assert again["name"] == "again" and again["metrics"] == report["metrics"] and again["mtbench"] == report["mtbench"]
    assert "| again |" in md
    # `eval report` expands a multi-candidate work dir into its runs
    assert [name for name, _ in load_runs([workdir])] == ["seed", "again"]


def test_metrics_match_raw_judge_outputs(finished, testset):
    """Recompute consistency and rejection straight from the judge's output file."""
    workdir, report = finished
    sessions = {s.id: s for s in load_wikiroleeval(testset)[0]}
    outputs = read_outputs(workdir / "runs" / "seed" / "judge")
    correct, votes = [], {}
    for rid, rec in outputs.items():
        if rid.startswith("mtbench/"):
            continue
        sid, turn, metric, sample = rid.rsplit("/", 3)
        t = int(turn[1:])
        if metric == "consistency":  # the letter indexes this sample's shuffled order
            order = W.sample_order(sessions[sid], t, int(sample[1:]), 0)
            correct.append(order[J.LETTERS.index(rec["text"].strip())] == sessions[sid].answer_index)
        if metric == "rejection":
            votes.setdefault((sid, t), []).append(int(rec["text"]))
    assert report["metrics"]["all"]["consistency"] == pytest.approx(round(sum(correct) / len(correct), 4))
    right = [int(sum(v) * 2 > len(v)) == sessions[sid].turns[t].reject for (sid, t), v in votes.items()]
    assert report["metrics"]["all"]["rejection"] == pytest.approx(round(sum(right) / len(right), 4))
    # multi-turn answering: turn 1's prompt carried the candidate's own turn-0 answer
    answers = read_outputs(workdir / "runs" / "seed" / "answers" / "t00")
    assert len(answers) == 2 and all(r["output_ids"] for r in answers.values())


def test_resume_after_kill_does_not_rejudge(finished, testset, tmp_path):
    workdir, report = finished
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    judge_dir = resumed / "runs" / "seed" / "judge"
    before = read_outputs(judge_dir)
    shards = sorted(judge_dir.glob("part-*.jsonl"))
    # what a kill leaves: the shards flushed so far (whole: they are written atomically), a stale temp file,
    # an incomplete manifest, no DONE marker and no reports
    records = [json.loads(x) for s in shards for x in s.read_text().splitlines()]
    keep = 17
    for s in shards:
        s.unlink()
    (judge_dir / "part-p00000-000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:keep]))
    (judge_dir / ".part-p00000-000001.jsonl.tmp").write_text('{"id": "torn')
    manifest = judge_dir / "manifest-p00000.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))
    (judge_dir / DONE).unlink()
    for path in (resumed / "report.json", resumed / "report.md", resumed / "report.png",
                 resumed / "runs" / "seed" / "report.json", resumed / "runs" / "again" / "report.json"):
        path.unlink()
    again = run_eval(config(testset), resumed, MODELS)
    assert again == report
    after = read_outputs(judge_dir)  # raises on a duplicated id
    assert after == before  # same judgements (per-request seeds), each exactly once
    first = [json.loads(x) for x in (judge_dir / "part-p00000-000000.jsonl").read_text().splitlines()]
    assert first == records[:keep]  # finished judgements untouched
    log = [json.loads(x) for x in (judge_dir / LOG).read_text().splitlines()]
    assert (log[-1]["resumed"], log[-1]["sent"], log[-1]["expected"]) == (keep, len(records) - keep, len(records))
    # answers were complete: no answer stage ran again
    for stage in (resumed / "runs" / "seed" / "answers").iterdir():
        assert len((stage / LOG).read_text().splitlines()) == 1


def test_finished_workdir_resumes_without_loading_and_rejects_other_config(finished, testset, tmp_path):
    workdir, report = finished
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(dump_config(config(testset)), encoding="utf-8")
    assert main(["eval", "--config", str(cfg_path), "--workdir", str(workdir)]) == 0
    assert json.loads((workdir / "report.json").read_text()) == report
    for log in workdir.rglob(LOG):
        assert len(log.read_text().splitlines()) == 1  # nothing ran a second time
    with pytest.raises(ConfigError, match="different config"):
        run_eval(config(testset, samples=2), workdir)
    assert main(["eval", "--config", str(cfg_path), "--workdir", str(workdir), "judge.samples=2"]) == 2


def test_unparsable_judge_outputs_are_counted(testset):
    """Free-text, truncated and never-sent judge samples: each counted with its reason, none dropped."""
    sessions = load_wikiroleeval(testset)[0]
    answers = {W.answer_request_id(s.id, t): "an answer" for s in sessions for t in range(len(s.turns))}
    tasks = W.judge_tasks(sessions, answers, {}, lambda msgs: [1] * 10, 2, W.JudgeLimits(), 100, protocol="terse")
    tasks[0] = W.JudgeTask(**{**tasks[0].__dict__, "input_ids": None, "messages": None})  # could not fit
    outputs = {}
    for i, task in enumerate(tasks[1:], start=1):
        text = {"consistency": "B", "knowledge": "7", "rejection": "1"}[task.metric]
        if i % 5 == 0:
            outputs[task.id] = {"id": task.id, "text": "I think so", "finish_reason": "stop"}
        elif i % 7 == 0:
            outputs[task.id] = {"id": task.id, "text": "", "finish_reason": "length"}
        else:
            outputs[task.id] = {"id": task.id, "text": text, "finish_reason": "stop"}
    turns = W.collect_judgements(sessions, tasks, outputs, "terse")
    rep = aggregate(turns)
    total_bad = 1 + sum(1 for i in range(1, len(tasks)) if i % 5 == 0 or i % 7 == 0)
    assert sum(u["samples"] for u in rep["unparsable"].values()) == total_bad
    reasons = {}
    for u in rep["unparsable"].values():
        for k, v in u["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons["too_long"] == 1 and sum(reasons.values()) == total_bad
    assert set(reasons) <= {"too_long", "length", "no_match"}
    assert sum(u["total_samples"] for u in rep["unparsable"].values()) == len(tasks)


def test_pinned_config_from_before_new_engine_fields_still_resumes(testset, tmp_path):
    """A work dir pinned before ``engine`` gained fields with defaults resumes; a changed value does not."""
    cfg = config(testset)
    data = yaml.safe_load(dump_config(cfg))
    for key in ("prefix_cache_rows", "prefix_block", "compile_cache", "shard_size", "flush_seconds"):
        del data["engine"][key]  # as an older version wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    pin_config(tmp_path, "config.yaml", cfg, "an evaluation")  # same config: accepted
    assert cfg.engine.shard_size == 64 and cfg.engine.flush_seconds == 10.0  # eval's own defaults
    with pytest.raises(ConfigError, match="different config"):
        pin_config(tmp_path, "config.yaml", config(testset, samples=2), "an evaluation")
