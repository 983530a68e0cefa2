"""``ditto-jax serve`` as a real server process, driven by the official ``openai`` client (no mocks): greedy chat
completions equal ``ditto-jax sample`` on the same messages, streamed deltas concatenate to the same text,
8 concurrent clients all finish, bad requests get a 400 naming the field, a client that disconnects frees its
slot, and an eval whose judge is this server matches the same judge run locally. Also ``ditto-jax chat``
(streamed greedy replies equal ``sample``'s, /reset, /character)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package uses
import openai
import pytest

from ditto_jax.config import validate
from ditto_jax.data.characters import default_characters
from ditto_jax.eval.config import EvalConfig
from ditto_jax.eval.pipeline import run_eval
from ditto_jax.eval.testsets import default_wikiroleeval_path

SEED = 3  # random-init seed of the served tiny model
MAX_NEW = 12
MESSAGES = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "system", "content": "You are Marco Polo, a Venetian merchant."},
     {"role": "user", "content": "What did you see in Cathay?"}],
    [{"role": "user", "content": "你好，你是谁？"}],
]


def subprocess_env(**extra: str) -> dict[str, str]:
    """A served or CLI process's environment, read when it starts (so the run's compilation cache folder, set by
    conftest once the session begins, is passed on): one CPU device, the 8 simulated ones only add overhead."""
    return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ditto_jax.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-init tiny model saved as a model checkpoint (weights + tokenizer): serve, sample and the local
    judge all load the same weights from it."""
    from ditto_jax.checkpoints import ModelSource, load_model_source, save_model_checkpoint

    # a larger init scale than the preset's 0.02: the preset's greedy output is "\n" for every prompt
    model, cfg, tokenizer = load_model_source(ModelSource(config="model/tiny", seed=SEED,
                                                          overrides=["initializer_range=0.2"]))
    return save_model_checkpoint(model, cfg, tmp_path_factory.mktemp("model") / "tiny", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def server(model_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ditto_jax.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--max-len", "2048", "--batch-size", "8", "--chunk", "4", "--name", "tiny"],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()[-2000:]}")
        time.sleep(0.5)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="EMPTY", max_retries=0)


def napoleon_intro() -> str:
    return next(c for c in default_characters() if c.label == "Napoleon Bonaparte").brief_intro()


@pytest.fixture(scope="module")
def sampled(model_dir, tmp_path_factory) -> dict[str, str]:
    """``ditto-jax sample`` greedy texts of MESSAGES and of the chat test's first turn."""
    tmp = tmp_path_factory.mktemp("sample")
    prompts = [{"id": f"m{i}", "messages": m} for i, m in enumerate(MESSAGES)]
    prompts.append({"id": "chat", "messages": [{"role": "system", "content": napoleon_intro()},
                                               {"role": "user", "content": "Who are you?"}]})
    (tmp / "p.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    proc = _cli("sample", "--model", str(model_dir), "--prompts", str(tmp / "p.jsonl"), "--out", str(tmp / "out"),
                "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--no-progress", "--compile-cache", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {}
    for path in sorted((tmp / "out").glob("part-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            out[rec["id"]] = rec["text"]
    assert len(set(out.values())) > 1  # the model says different things to different prompts
    return out


def test_greedy_chat_equals_sample_and_streaming_concatenates(client, sampled):
    for i, messages in enumerate(MESSAGES):
        resp = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_NEW)
        assert resp.choices[0].message.content == sampled[f"m{i}"]
        assert resp.usage.completion_tokens <= MAX_NEW
        stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_NEW,
                                                stream=True)
        deltas, finish = [], None
        for chunk in stream:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        assert "".join(deltas) == sampled[f"m{i}"] and finish in ("stop", "length")
        assert sum(1 for d in deltas if d) >= 1
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completions_and_stop_strings(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=MAX_NEW)
    text = full.choices[0].text
    assert text
    stop = text[len(text) // 2:][:3].strip() or text[-1]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=MAX_NEW,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=MAX_NEW,
                                         stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_eight_concurrent_clients_finish(client):
    def ask(i: int) -> tuple[str, str]:
        resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"question {i}"}],
                                              temperature=0.8, top_p=0.9, seed=i, max_tokens=MAX_NEW)
        return resp.choices[0].message.content, resp.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert len(results) == 8 and all(r[1] in ("stop", "length") for r in results)
    again = ask(3)  # seeded sampling: the same answer alone as among 7 others
    assert again == results[3]


def test_bad_requests_get_400_naming_the_field(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=10_000)
    assert err.value.body["param"] == "max_tokens"
    raw = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages"
    raw = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert raw.status_code == 400 and raw.json()["error"]["param"].startswith("messages.0.role")


def test_disconnect_frees_the_slot(server):
    before = httpx.get(f"{server}/health").json()["cancelled"]
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "go on"}], "max_tokens": 480, "stream": True,
                            "temperature": 1.0}) as resp:
        next(resp.iter_lines())  # the first event, then the client goes away
    deadline = time.time() + 60
    while time.time() < deadline:
        health = httpx.get(f"{server}/health").json()
        if health["cancelled"] > before and health["in_flight"] == 0:
            break
        time.sleep(0.2)
    assert health["cancelled"] > before and health["in_flight"] == 0


def test_endpoint_judge_matches_local_judge(server, model_dir, tmp_path):
    """The same model as judge, once through this server (OpenAI client) and once loaded locally: greedy,
    unconstrained terse judging gives the same raw outputs and the same report."""
    lines = default_wikiroleeval_path().read_text(encoding="utf-8").splitlines()
    testset = tmp_path / "wre.jsonl"
    testset.write_text(lines[1] + "\n" + lines[6] + "\n", encoding="utf-8")
    endpoint = {"endpoint": f"{server}/v1", "model": "tiny", "concurrency": 4}

    def config(judge_model: dict) -> EvalConfig:
        return validate(EvalConfig, {
            "candidates": [{"name": "cand", "model": endpoint}],
            "judge": {"model": judge_model, "protocol": "terse", "constrained": False, "temperature": 0.0,
                      "samples": 1, "max_answer_chars": 200},
            "testset": {"wikiroleeval": str(testset), "max_turns": 2, "mtbench_enabled": False},
            "calibration": {"limit": 1}, "answer": {"temperature": 0.0, "max_new_tokens": 8},
            "engine": {"batch_size": 8, "max_len": 2048, "min_bucket": 512, "chunk": 4, "mesh": None}})

    remote = run_eval(config(endpoint), tmp_path / "remote", progress=False)
    local = run_eval(config({"path": str(model_dir)}), tmp_path / "local", progress=False)
    rows = {}
    for name in ("remote", "local"):
        rows[name] = [{k: r[k] for k in ("candidate", "id", "raw", "verdict")}
                      for r in map(json.loads, (tmp_path / name / "judgements.jsonl").read_text().splitlines())]
    assert rows["remote"] == rows["local"] and len(rows["local"]) == 4 * 3 + 2 * 3
    assert remote["metrics"] == local["metrics"] and remote["calibration"] == local["calibration"]


def test_chat_streams_greedy_replies_with_commands(model_dir, sampled):
    script = "Who are you?\n/character nobody-at-all\n/reset\n/character zh-zhang-heng\n你好\n/quit\n"
    proc = _cli("chat", "--model", str(model_dir), "--character", "napoleon bonaparte", "--temperature", "0",
                "--max-new-tokens", str(MAX_NEW), "--max-len", "512", input=script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith(f"[Napoleon Bonaparte] {napoleon_intro()}")
    assert f"Napoleon Bonaparte> {sampled['chat']}\n" in out  # streamed greedy reply == sample's
    assert "error: no character 'nobody-at-all'" in out and "[conversation reset]" in out
    assert "[张衡] 你是张衡" in out and "张衡> " in out
