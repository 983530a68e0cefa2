"""``ditto-jax bench data``: runs end to end and reports throughput beside the SFT consumption."""

from __future__ import annotations

import json

from ditto_jax.cli import main as cli_main


def test_bench_data_json(capsys, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert cli_main(["bench", "data", "--json", "--repeat", "2", "--seq-len", "1024", "--consumption", "300"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_per_s"] > 0 and result["sft_consumption_tokens_per_s"] == 300
    assert result["ratio_to_consumption"] == round(result["tokens_per_s"] / 300, 1)
    assert 0 < result["packing_efficiency"] <= 1 and result["batches"] > 0
    assert result["summary"]["read"]["kept"] == result["sessions"]
    assert result["glibc_tunables"] == "glibc.malloc.arena_max=2"  # the allocator settings it ran with
