"""Forced identity verdicts name one of the roles listed for that sample: a random tiny local judge (which never
writes the verdict sentence itself, and forced to "any name" writes "[character name]" literally) has every
identity verdict decoded under the alternation of the listed names, in English and Chinese sessions."""

from __future__ import annotations

import json
import re

from endpoint_fixtures import scripted_server
from test_eval_protocol import KEY_ENV, SECRET, config, perfect, testset  # noqa: F401 (testset: a fixture)

from ditto_jax.config import validate
from ditto_jax.eval import judge as J
from ditto_jax.eval.config import EvalConfig
from ditto_jax.eval.pipeline import run_eval


def test_verdict_pattern_is_the_listed_names():
    names = ["Cleopatra VII", "成吉思汗", "Jean-Paul Sartre", "J. R. R. Tolkien", "Tom O'Neil (actor)", "a+b*[c]|d"]
    pattern = J.verdict_pattern("consistency", names)
    for n in names:
        assert re.fullmatch(pattern, n + "]")
    for other in ("character name]", "Cleopatra]", "Cleopatra VII", "J. R. R. Tolkien ]", "a+b*[c]]"):
        assert not re.fullmatch(pattern, other)
    assert J.verdict_pattern("consistency") == r"[^\]\n\[]{1,60}\]"  # no names listed: any bracket-free text


def test_random_judge_forced_identity_verdicts_are_listed_names(testset, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv(KEY_ENV, SECRET)
    with scripted_server(perfect) as server:
        cfg = config(testset, server.base_url, calibration={"enabled": False},
                     engine={"batch_size": 8, "max_len": 1024, "min_bucket": 512, "chunk": 32, "mesh": None})
        judge = validate(EvalConfig, {"candidates": [{"name": "x", "model": {"config": "model/tiny"}}],
                                      "judge": {"model": {"config": "model/tiny", "seed": 5}}}).judge.model
        cfg = cfg.model_copy(update={
            "judge": cfg.judge.model_copy(update={"model": judge, "samples": 2, "temperature": 1.0}),
            "testset": cfg.testset.model_copy(update={"max_turns": 1, "mtbench_enabled": False})})
        run_eval(cfg, tmp_path / "wd", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "wd" / "judgements.jsonl").read_text().splitlines()]
    ident = [r for r in rows if r["metric"] == "consistency"]
    assert len(ident) == 2 * 2 and {r["lang"] for r in ident} == {"en", "zh"}
    for r in ident:
        assert r["forced"], r  # the random judge never writes the sentence: every verdict is forced
        assert r["chosen"] in r["candidates_shown"], r  # ... and names a listed role
        lead = {"en": "The most suitable role is [", "zh": "最符合的角色为["}[r["lang"]]
        assert r["raw"].rsplit(lead, 1)[1] == r["chosen"] + "]"
