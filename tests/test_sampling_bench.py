"""``ditto-jax bench sample`` runs end to end on a tiny random-init model (with the transformers comparison)."""

from __future__ import annotations

import json

from ditto_jax.cli import main


def test_bench_sample_reports_throughput_roofline_and_hf_ratio(capsys):
    code = main(["bench", "sample", "--config", "model/tiny", "--batch", "2", "--prompt-len", "24", "--new-tokens", "4",
                 "--chunk", "4", "--repeats", "1", "--top-p", "0.8", "--compare-hf", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["tokens_per_s"] > 0 and out["hf_tokens_per_s"] > 0 and out["speedup_vs_hf"] > 0
    assert 0 < out["pct_of_roofline"] and out["roofline_bound"] in ("memory", "compute")
    assert out["sampling"]["top_p"] == 0.8 and out["new_tokens"] == 4
    # the timed runs neither compile (the warm-up did) nor reuse a prompt prefix (each run has fresh prompts)
    assert out["timed_runs_compile_s"] == [0.0] and out["timed_runs_prefix_tokens_saved"] == [0] and "warning" not in out
    # the markdown table on stderr quotes the same figures
    assert f"| {out['tokens_per_s']:.1f} | {out['hf_tokens_per_s']:.1f} | **{out['speedup_vs_hf']:.2f}x** |" in captured.err
    assert "WARNING" not in captured.err
