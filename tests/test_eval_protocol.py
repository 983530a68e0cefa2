"""The reference judge protocol, judge calibration and endpoint models, end to end through ``run_eval`` with
scripted judges and candidates behind a real HTTP server and the official ``openai`` client (no JAX model is
loaded: these run in seconds). Scripted judges: a *perfect* one (reads the answer in the prompt and looks up the
calibration label) is not flagged; a *constant* one is flagged on every metric, in report.json, report.md and
the printed table; the API key never reaches a file or the output; an answered request is never asked again."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from endpoint_fixtures import scripted_server

from ditto_jax.cli import main
from ditto_jax.config import dump_config, validate
from ditto_jax.eval.calibration import load_calibration
from ditto_jax.eval.config import EvalConfig
from ditto_jax.eval.judge import ANALYSIS_LEAD
from ditto_jax.eval.pipeline import run_eval
from ditto_jax.eval.testsets import default_wikiroleeval_path

SECRET = "sk-test-DO-NOT-LEAK-8f3b2a"
KEY_ENV = "DITTO_TEST_ENDPOINT_KEY"
CAL = {it.answer: it for it in load_calibration()}


def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i + len(start))
    return text[i + len(start): j] if j >= 0 else None


def _answer_in(prompt: str) -> str | None:
    for start, end in (("[Response]\n[Begin]\n", "\n[End]"), ("[回复]\n[开始]\n", "\n[结束]"),
                       ("[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]"),
                       ("[助手回答开始]\n", "\n[助手回答结束]")):
        found = _between(prompt, start, end)
        if found is not None:
            return found
    return None


def _metric(prompt: str) -> str:
    if "most suitable role" in prompt or "最符合的角色为" in prompt:
        return "consistency"
    if "nothing but 1 or 0" in prompt or "除了1或0" in prompt:
        return "rejection"
    if "[[rating]]" in prompt:
        return "mtbench"
    return "knowledge"


def perfect(model: str, messages: list[dict[str, str]]) -> str:
    """A judge that knows the calibration labels (and a candidate that repeats its system prompt, which names
    its role: the judge finds that name among the listed candidates)."""
    if model == "candidate":
        return messages[0]["content"]
    prompt = messages[-1]["content"]
    metric, item = _metric(prompt), CAL.get(_answer_in(prompt) or "")
    if metric == "rejection":
        return str(item.refusal) if item else "0"
    if metric == "mtbench":
        return "A helpful answer that stays in the role and answers the question well.\nRating: [[6]]"
    if metric == "consistency":
        answer = _answer_in(prompt) or ""
        label = item.label if item else next(c for c in re.findall(r"^- (.+)$", prompt, re.M) if c in answer)
        intro = "分析：回复里提到了只有这个角色才知道的事。" if item and item.lang == "zh" else (
            "The reply names deeds and places that only one of the listed characters could know.")
        lead = "最符合的角色为" if item and item.lang == "zh" else "The most suitable role is "
        return f"{intro}\n{lead}[{label}]"
    score = 9 if item is None or item.knowledge != "bad" else 2
    return f"The answer agrees with the tips and uses the role's own knowledge.\n{score}"


def constant(model: str, messages: list[dict[str, str]]) -> str:
    """A judge that always says the same thing: the first listed role, "refused", 10 (what SmolLM2-135M did in
    issue 16: "A" to 54 of 55 identity questions, "1" to every rejection question)."""
    if model == "candidate":
        return messages[0]["content"]
    prompt = messages[-1]["content"]
    first = re.findall(r"^- (.+)$", prompt, re.M)[0] if _metric(prompt) == "consistency" else ""
    return {"rejection": "1", "mtbench": "Fine.\n[[10]]", "consistency": f"Hmm.\nThe most suitable role is [{first}]",
            "knowledge": "Looks fine.\n10"}[_metric(prompt)]


@pytest.fixture(scope="module")
def testset(tmp_path_factory) -> Path:
    lines = default_wikiroleeval_path().read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("testset") / "wre.jsonl"
    path.write_text(lines[1] + "\n" + lines[6] + "\n", encoding="utf-8")
    return path


def config(testset: Path, url: str, **extra) -> EvalConfig:
    endpoint = {"endpoint": url, "api_key_env": KEY_ENV, "concurrency": 4, "max_retries": 3}
    data = {"candidates": [{"name": "cand", "model": {**endpoint, "model": "candidate"}}],
            "judge": {"model": {**endpoint, "model": "judge"}, "samples": 3},
            "testset": {"wikiroleeval": str(testset), "max_turns": 2, "mtbench_limit": 1}, **extra}
    return validate(EvalConfig, data)


def _all_text(workdir: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in workdir.rglob("*") if p.is_file())


def test_perfect_judge_passes_calibration_and_key_stays_secret(testset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with scripted_server(perfect) as server:
        server.fail_first = [503, 429]  # transient failures: the client's retries with backoff absorb them
        cfg = config(testset, server.base_url)
        cfg_path = tmp_path / "eval.yaml"
        cfg_path.write_text(dump_config(cfg), encoding="utf-8")
        workdir = tmp_path / "wd"
        assert main(["eval", "--config", str(cfg_path), "--workdir", str(workdir), "--no-progress"]) == 0
        assert all({k.lower(): v for k, v in r["headers"].items()}.get("authorization") == f"Bearer {SECRET}" for r in server.requests)
        attempts = len(server.requests)
    out = capsys.readouterr()
    report = json.loads((workdir / "report.json").read_text())
    cal = report["calibration"]
    assert cal["reliable"] and report["unreliable_metrics"] == []
    m = cal["metrics"]
    assert m["consistency"]["accuracy"] == 1.0 and m["rejection"]["accuracy"] == 1.0
    assert m["knowledge"]["accuracy"] == 1.0 and m["knowledge"]["correlation"] == 1.0
    assert m["consistency"]["majority_share"] < 0.5
    assert "WARNING" not in out.err and "Warning" not in (workdir / "report.md").read_text()
    # the perfect judge names the true role whatever position the shuffle put it in
    assert report["metrics"]["all"]["consistency"] == 1.0
    assert all(u["samples"] == 0 and "no_reasoning" not in u for u in report["unparsable"].values())
    # every judge sample kept, raw text with reasoning before the verdict, the shown order recorded
    rows = [json.loads(x) for x in (workdir / "judgements.jsonl").read_text().splitlines()]
    cands = [r for r in rows if r["candidate"] == "cand"]
    assert len(cands) == 4 * 3 * 3 + 2 * 3
    cons = [r for r in rows if r["metric"] == "consistency"]
    assert all(r["raw"].index("[") > 10 and r["chosen"] == r["true_role"] for r in cons)
    assert len({tuple(r["candidates_shown"]) for r in cons if r["candidate"] == "cand"}) > 1
    positions = {r["candidates_shown"].index(r["true_role"]) for r in cons}
    assert len(positions) >= 3  # the true role is not always in one place
    # 24 calibration items x 3 metrics x 3 samples + the candidate's judge and answer requests, plus 2 retries
    assert attempts == 24 * 9 + len(cands) + 4 + 2 + 2
    # the key: only its variable's name is written anywhere, never the value
    assert SECRET not in _all_text(workdir) and SECRET not in out.out + out.err
    assert KEY_ENV in (workdir / "config.yaml").read_text()


def test_constant_judge_is_flagged(testset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with scripted_server(constant) as server:
        cfg_path = tmp_path / "eval.yaml"
        cfg_path.write_text(dump_config(config(testset, server.base_url)), encoding="utf-8")
        workdir = tmp_path / "wd"
        assert main(["eval", "--config", str(cfg_path), "--workdir", str(workdir), "--no-progress"]) == 0
    err = capsys.readouterr().err
    report = json.loads((workdir / "report.json").read_text())
    assert report["calibration"]["reliable"] is False
    assert report["unreliable_metrics"] == ["consistency", "knowledge", "rejection"]
    m = report["calibration"]["metrics"]
    assert all(v["majority_share"] == 1.0 and "unreliable" in v["warning"] for v in m.values())
    assert m["consistency"]["majority_verdict"] == "position 1" and m["consistency"]["majority_position"] == 0
    assert m["consistency"]["accuracy"] < 0.5  # the shuffle puts the true role first only by chance
    assert m["rejection"]["accuracy"] <= m["rejection"]["chance"]
    md = (workdir / "report.md").read_text()
    assert "Warning: the judge failed its calibration" in md and "near-constant" in md and " †" in md
    assert err.count("WARNING: judge calibration") == 3
    # "Hmm." / "Looks fine." before the verdict is no reasoning: every such verdict is counted
    u = report["unparsable"]
    assert u["consistency"]["no_reasoning"] == u["consistency"]["total_samples"] == 4 * 3
    assert u["knowledge"]["no_reasoning"] == 4 * 3 and u["mtbench"]["no_reasoning"] == 2 * 3
    assert "no_reasoning" not in u["rejection"] and report["calibration"]["no_reasoning"]["consistency"] == 24 * 3
    assert "12 verdicts without reasoning" in md


def test_endpoint_answers_are_never_asked_twice(testset, tmp_path, monkeypatch):
    """A crash that loses the runner's unflushed shards: the endpoint journal answers them on the re-run."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    with scripted_server(perfect) as server:
        cfg = config(testset, server.base_url, calibration={"limit": 3})
        workdir = tmp_path / "wd"
        report = run_eval(cfg, workdir, progress=False)
        first = len(server.requests)
        # what a kill before any flush leaves: no judge shards, no answers, no reports
        for d in [*workdir.rglob("judge"), *workdir.rglob("answers"), *workdir.rglob("mtbench_answers")]:
            shutil.rmtree(d)
        for p in workdir.glob("report.*"):
            p.unlink()
        again = run_eval(cfg, workdir, progress=False)
        assert len(server.requests) == first  # nothing asked again
    assert again["metrics"] == report["metrics"] and again["calibration"] == report["calibration"]


def test_missing_key_is_a_clear_error(testset, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(dump_config(config(testset, "http://127.0.0.1:9/v1")), encoding="utf-8")
    assert main(["eval", "--config", str(cfg_path), "--workdir", str(tmp_path / "wd")]) == 2
    assert f"environment variable {KEY_ENV} (api_key_env) is not set" in capsys.readouterr().err


def test_local_judge_forces_only_the_final_verdict(testset, tmp_path, monkeypatch):
    """A random-init local judge never writes the verdict sentence itself: its turn starts with the analysis lead,
    its free text (the full budget) is kept and only the verdict after it is decoded under a constraint, so every
    sample parses."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    with scripted_server(perfect) as server:
        cfg = config(testset, server.base_url, calibration={"enabled": False},
                     engine={"batch_size": 8, "max_len": 1024, "min_bucket": 512, "chunk": 32, "mesh": None})
        cfg = cfg.model_copy(update={
            "judge": cfg.judge.model_copy(update={"model": validate(EvalConfig, {
                "candidates": [{"name": "x", "model": {"config": "model/tiny"}}],
                "judge": {"model": {"config": "model/tiny", "seed": 3}}}).judge.model, "samples": 1}),
            "testset": cfg.testset.model_copy(update={"max_turns": 1, "mtbench_enabled": False})})
        report = run_eval(cfg, tmp_path / "wd", progress=False)
    assert report["models"]["judge"]["max_new_tokens"] == 512
    rows = [json.loads(x) for x in (tmp_path / "wd" / "judgements.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3
    for r in rows:
        assert r["verdict"] is not None, r
        if r["metric"] == "rejection":
            assert r["raw"].strip() in ("0", "1") and not r["forced"]
        else:
            lead = {"consistency": {"en": "\nThe most suitable role is [", "zh": "\n最符合的角色为["},
                    "knowledge": {"en": "\n", "zh": "\n"}}[r["metric"]][r["lang"]]
            assert r["forced"] and lead in r["raw"] and len(r["raw"].rsplit(lead, 1)[0]) > 20  # free text first
            assert r["raw"].startswith(ANALYSIS_LEAD[(r["metric"], r["lang"])]) and r["reasoning_words"] > 0
    assert report["unparsable"]["consistency"]["forced"] == 2 and report["unparsable"]["knowledge"]["forced"] == 2
    assert all(u["samples"] == 0 for u in report["unparsable"].values())


def test_mtbench_questions_and_grading_prompts_from_user_paths(testset, tmp_path, monkeypatch):
    """FastChat's layout: question.jsonl (roleplay category kept) and judge_prompts.jsonl (single-v1 and
    single-v1-multi-turn used verbatim); the rating is read from "[[x]]". Files written here in that layout."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 91, "category": "roleplay", "turns": ["Pretend to be a pirate.", "Now sing."]},
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}]), encoding="utf-8")
    prompts = tmp_path / "judge_prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in [
        {"name": "single-v1", "type": "single", "system_prompt": "SYS-ONE",
         "prompt_template": "Q: {question}\nA: {answer}\nRate as [[rating]].", "output_format": "[[rating]]"},
        {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "SYS-MULTI",
         "prompt_template": "Q1: {question_1}\nA1: {answer_1}\nQ2: {question_2}\nA2: {answer_2}\n[[rating]]",
         "output_format": "[[rating]]"}]), encoding="utf-8")
    with scripted_server(perfect) as server:
        cfg = config(testset, server.base_url, calibration={"enabled": False})
        cfg = cfg.model_copy(update={"testset": cfg.testset.model_copy(update={
            "mtbench": str(questions), "mtbench_judge_prompts": str(prompts), "mtbench_limit": None})})
        report = run_eval(cfg, tmp_path / "wd", progress=False)
        graded = [r["body"]["messages"] for r in server.requests
                  if r["body"]["model"] == "judge" and "[[rating]]" in r["body"]["messages"][-1]["content"]]
    assert report["mtbench"]["questions"] == 1 and report["mtbench"]["set"] == "mtbench"
    assert report["mtbench"]["roleplay"] == 6.0
    assert {m[0]["content"] for m in graded} == {"SYS-ONE", "SYS-MULTI"} and len(graded) == 2 * 3
    assert any(m[-1]["content"].startswith("Q1: Pretend to be a pirate.\nA1: ") for m in graded)
    assert "| MT-Bench roleplay |" in (tmp_path / "wd" / "report.md").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"name": "single-v1", "system_prompt": "x", "prompt_template": "{question}"}) + "\n")
    cfg_bad = cfg.model_copy(update={"testset": cfg.testset.model_copy(update={"mtbench_judge_prompts": str(bad)})})
    with pytest.raises(Exception, match="single-v1-multi-turn"):
        run_eval(cfg_bad, tmp_path / "wd2", progress=False)
