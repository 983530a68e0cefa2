"""Resumable sharded runs: exactly-once output across re-runs, process shares, and a real ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ditto_jax.model import ModelConfig, create_model
from ditto_jax.sampling import Request, SamplingEngine, SamplingParams
from ditto_jax.sampling.inputs import read_prompt_file
from ditto_jax.sampling.runner import read_outputs, run_complete, run_sampling

PARAMS = SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def engine():
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      eos_token_id=2)
    return SamplingEngine(create_model(cfg, seed=4), None, batch_size=4, max_len=32, chunk=4, prefill_batch=1)


def _requests(n):
    rng = np.random.RandomState(0)
    return [Request(f"r{i:03d}", rng.randint(3, 128, 5 + i % 7).tolist(), PARAMS) for i in range(n)]


def test_rerun_skips_finished_ids_and_output_is_exactly_once(engine, tmp_path):
    first = run_sampling(engine, _requests(7), tmp_path, shard_size=3, progress=False)
    assert (first.generated, first.shards_written) == (7, 3) and run_complete(tmp_path)
    before = read_outputs(tmp_path)
    second = run_sampling(engine, _requests(11), tmp_path, shard_size=3, progress=False)
    assert (second.assigned, second.already_done, second.generated) == (11, 7, 4)
    after = read_outputs(tmp_path)
    assert sorted(after) == [f"r{i:03d}" for i in range(11)]
    assert all(after[k] == v for k, v in before.items())
    assert all(set(rec) == {"id", "output_ids", "text", "finish_reason"} for rec in after.values())


def test_process_shares_cover_every_request_once(engine, tmp_path):
    reqs = _requests(9)
    with pytest.raises(ValueError, match="partition"):
        run_sampling(engine, reqs, tmp_path, process_index=0, process_count=2, progress=False)
    for p in (1, 0):
        s = run_sampling(engine, reqs, tmp_path, partition=True, process_index=p, process_count=2, progress=False)
        assert s.generated == (4 if p else 5)
    out = read_outputs(tmp_path)
    assert sorted(out) == sorted(r.id for r in reqs)
    single = run_sampling(engine, reqs, tmp_path / "single", shard_size=100, progress=False)
    assert single.generated == 9 and read_outputs(tmp_path / "single") == out  # independent of who ran what


def test_duplicate_ids_are_refused(engine, tmp_path):
    reqs = _requests(2) + _requests(1)
    with pytest.raises(ValueError, match="duplicate request id 'r000'"):
        run_sampling(engine, reqs, tmp_path, progress=False)


def test_prompt_file_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    cases = {
        '{"id": "a", "input_ids": [1, 2]}\n{"id": "a", "input_ids": [3]}\n': "p.jsonl:2: id 'a' already used on line 1",
        '{"id": "a", "input_ids": [1, "x"]}\n': "p.jsonl:1: field \"input_ids\" must be a list of integers",
        '{"input_ids": [1]}\n': "p.jsonl:1: field \"id\"",
        '{"id": "a", "prompt": "hi"}\n': "p.jsonl:1: field \"prompt\" needs a tokenizer",
        '{"id": "a"\n': "p.jsonl:1: not valid JSON",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            read_prompt_file(path, None)


def test_killed_run_resumes_exactly_once(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(24):
            f.write(json.dumps({"id": f"q{i:02d}", "prompt": f"Tell me about item {i}."}) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ditto_jax.cli", "sample", "--config", "model/tiny", "--prompts", str(prompts),
           "--out", str(out), "--max-new-tokens", "24", "--batch-size", "4", "--chunk", "4", "--top-p", "0.8",
           "--shard-size", "2", "--no-progress"]
    # a fresh persistent compilation cache: the resumed run loads what the killed one compiled
    env = dict(os.environ, XLA_FLAGS="", DITTO_JAX_COMPILATION_CACHE=str(tmp_path / "jax-cache"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(out.glob("part-*.jsonl")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = {p.name: p.read_bytes() for p in out.glob("part-*.jsonl")}
    assert killed and not run_complete(out), "the run was expected to be killed mid-way"
    partial = read_outputs(out)
    assert 0 < len(partial) < 24
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["already_done"] == len(partial) and summary["generated"] == 24 - len(partial)
    assert summary["compile"]["cache_hits"] + summary["compile"]["saved_hits"] >= 1
    assert summary["compile"]["cache_dir"] == str(tmp_path / "jax-cache")
    assert set(summary["engine"]) >= {"prefill_s", "decode_s", "prefix_fill_s"} and summary["total_s"] > 0
    final = read_outputs(out)  # raises on a duplicate id
    assert sorted(final) == [f"q{i:02d}" for i in range(24)] and run_complete(out)
    assert all((out / name).read_bytes() == data for name, data in killed.items())  # finished shards untouched
    assert not list(Path(out).glob(".*.tmp"))


def test_model_without_tokenizer_samples_token_ids_only(tmp_path, monkeypatch, capsys):
    """A model folder without tokenizer files: ``input_ids`` prompts sample (text null); a text prompt is an
    error naming the missing files (never the bundled tokenizer, whose ids would not match the model)."""
    from ditto_jax import cli, hf
    from ditto_jax.model import ModelConfig, create_model

    monkeypatch.setenv("DITTO_JAX_COMPILATION_CACHE", "off")
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64)
    folder = tmp_path / "model"
    hf.save_pretrained(create_model(cfg, seed=0), cfg, folder)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "input_ids": [5, 6, 7]}\n{"id": "b", "input_ids": [9]}\n')
    base = ["sample", "--model", str(folder), "--prompts", str(prompts), "--max-new-tokens", "3",
            "--batch-size", "2", "--no-progress", "--ignore-eos"]
    assert cli.main(base + ["--out", str(tmp_path / "out")]) == 0
    out = read_outputs(tmp_path / "out")
    assert sorted(out) == ["a", "b"] and all(r["text"] is None and len(r["output_ids"]) == 3 for r in out.values())
    capsys.readouterr()
    prompts.write_text('{"id": "a", "prompt": "hello"}\n')
    assert cli.main(base + ["--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:1" in err and "needs a tokenizer" in err and "tokenizer.json" in err
