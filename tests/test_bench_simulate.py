"""``ditto-jax bench simulate``: the real workload's shape (characters x questions sharing a profile prefix),
both sides as whole processes on the same folder and prompts, the JSON's split and prefix-cache counters."""

from __future__ import annotations

import json

from ditto_jax import cli
from ditto_jax.malloc import MALLOC_MARK, MALLOC_TUNABLES


def test_bench_simulate_tiny_against_transformers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DITTO_JAX_COMPILATION_CACHE", str(tmp_path / "jax-cache"))
    monkeypatch.setenv("XLA_FLAGS", "")
    # as in a `ditto-jax` process, restarted with its allocator settings: ours keep them, transformers runs
    # in the environment its user started the benchmark with
    monkeypatch.setenv("GLIBC_TUNABLES", MALLOC_TUNABLES)
    monkeypatch.setenv(MALLOC_MARK, "1")
    work = tmp_path / "work"
    code = cli.main(["bench", "simulate", "--config", "model/tiny", "--characters", "2", "--questions", "2",
                     "--new-tokens", "3", "--batch", "2", "--repeats", "2", "--compare-hf", "--json",
                     "--profile-intro-chars", "0", "--profile-claims", "1", "--workdir", str(work),
                     "--out", str(tmp_path / "result.json")])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "result.json").read_text())
    # the runs-so-far sidecar kept while it ran is gone once the result is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jax-cache", "result.json", "work"]
    prompts = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    assert [p["id"] for p in prompts] == ["en-socrates/q0", "en-socrates/q1", "en-julius-caesar/q0",
                                          "en-julius-caesar/q1"]
    # a character's prompts share its profile: identical up to the question
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0]["input_ids"], prompts[1]["input_ids"])) if a != b)
    assert shared > 100 and result["prompts"] == 4
    ours, again = result["ours_runs"]
    # the first run compiled into the empty cache, the second loaded everything: the warm figures are its own
    assert (ours["compilation_cache"], again["compilation_cache"]) == ("cold", "warm")
    assert again["compile"]["cache_misses"] == 0 and again["compile"]["cache_hits"] > 0
    assert result["ours_cold_runs"] == 1 and result["ours_warm_wall_s"] == again["wall_s"] and "note" in result
    assert abs(result["speedup_vs_hf_warm"] - result["hf_wall_s"] / again["wall_s"]) < 0.01  # both rounded
    assert ours["generated"] == 4 and ours["cpu_s"] > 0 and ours["wall_s"] >= ours["total_s"]
    assert ours["engine"]["prompt_tokens"] == result["prompt_tokens"]
    # each character's two prompts arrive together: its profile is computed once and reused by the other prompt
    assert ours["prefix_cache"]["inserted"] == 2 and ours["prefix_cache"]["hits"] == 2
    assert ours["engine"]["prompt_tokens_computed"] == result["prompt_tokens"] - ours["prefix_cache"]["tokens_saved"]
    assert ours["compile"]["cache_dir"] == str(tmp_path / "jax-cache") and ours["compile"]["compile_s"] > 0
    theirs = result["hf_runs"][0]
    assert theirs["generated_tokens"] > 0 and result["speedup_vs_hf"] > 0 and result["speedup_vs_hf_cpu_time"] > 0
    hf_ids = [json.loads(line)["id"] for line in (work / "hf-0.jsonl").read_text().splitlines()]
    assert hf_ids == [p["id"] for p in prompts]
    # the markdown table on stderr quotes the same figures, one row per run of ours with its phases
    assert f"| **{result['speedup_vs_hf']:.2f}x** |" in captured.err
    assert f"| {result['ours_warm_wall_s']:.1f} | {result['hf_wall_s']:.1f} | {result['speedup_vs_hf_warm']:.2f}x |" in captured.err
    rows = [line for line in captured.err.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert [r.split(" | ")[1] for r in rows] == ["cold", "warm"]
    assert rows[1].split(" | ")[6].startswith(f"{again['engine']['decode_s']:.1f} ({again['engine']['decode_steps']},")
    assert result["glibc_tunables"] == {"ours": MALLOC_TUNABLES, "hf": None}
    assert f"(`GLIBC_TUNABLES`): ours `{MALLOC_TUNABLES}`, transformers the system's" in captured.err
    assert f"| generated tokens (runs) | {ours['generated_tokens']}, {again['generated_tokens']} |" in captured.err
