"""``ditto-jax simulate`` with the supervision model behind an OpenAI-compatible endpoint: a real ``ditto-jax serve``
process on a tiny random model (test_serve's fixtures), the official ``openai`` client inside the simulation, the
CLI in a subprocess. The run writes a corpus and counts its requests; after a crash that lost the response stage's
outputs, a re-run is answered by the journal alone (the server serves nothing more) and ends with the same corpus;
the API key's value appears in no file and no output; an unreachable endpoint's failures are counted by reason,
nothing dropped silently. Two processes (threads over one workdir, a scripted endpoint) each ask only for their
own characters, each journalling its own answers."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import yaml
from endpoint_fixtures import scripted_server
from test_serve import client, model_dir, server, subprocess_env  # noqa: F401 (fixtures: the served tiny model, reused)

from ditto_jax.config import load_config, validate
from ditto_jax.simulation.config import SimulateConfig
from ditto_jax.simulation.prompts import QUERY_SYSTEM
from ditto_jax.simulation.stages import Simulation

KEY_VAR = "DITTO_TEST_SUPERVISION_KEY"
KEY = "sk-test-9f3c1e7a-never-written-anywhere"


def _config(tmp: Path, endpoint: dict) -> Path:
    """configs/simulate/tiny.yaml (4 characters, loosened filters) with the supervision model at ``endpoint``."""
    data = load_config(SimulateConfig, "simulate/tiny", []).model_dump(mode="json")
    data["supervision_model"] = endpoint
    data["queries"]["response_format"] = "json_schema"  # ditto-jax serve decodes under the schema
    data["corpus"]["tfds"] = False
    path = tmp / "simulate.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _simulate(config: Path, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ditto_jax.cli", "simulate", "--config", str(config), "--workdir",
                           str(workdir), "--no-progress"], capture_output=True, text=True,
                          env=subprocess_env(**{KEY_VAR: KEY}), timeout=600)


def _served(base: str) -> int:
    return httpx.get(f"{base}/health", timeout=10).json()["finished"]


def _corpus(workdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((workdir / "corpus").glob("*.jsonl"))}


def test_simulate_through_served_supervision_model_resumes_from_journal(server, tmp_path):  # noqa: F811
    config = _config(tmp_path, {"endpoint": f"{server}/v1", "model": "tiny", "api_key_env": KEY_VAR,
                                "concurrency": 4})
    work = tmp_path / "work"
    served0 = _served(server)
    first = _simulate(config, work)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((work / "simulation_report.json").read_text(encoding="utf-8"))
    asked = report["endpoint_requests"]
    # 4 characters -> 2 pairs -> 4 directed query prompts, each parsed at the first attempt (server-side schema)
    assert report["filters"]["query_prompts"]["kept"] == 4
    assert report["stages"]["queries"]["attempts_used"] == {"1": 4}
    responses = report["filters"]
    n_answers = sum(c["total"] for k, c in responses.items() if k.startswith("responses."))
    assert n_answers > 0 and asked["failed"] == 0 and asked["journal_hits"] == 0
    assert asked["asked"] == 4 + n_answers == _served(server) - served0  # every request reached the server once
    assert report["corpus"]["sessions"] >= 1 and _corpus(work)
    session = json.loads(next(iter(_corpus(work).values())).decode().splitlines()[0])
    assert session["turns"][0]["role"] == "user" and session["turns"][1]["role"] == "assistant"
    corpus1 = _corpus(work)

    # a crash that lost the response stage's outputs (and everything after): the journal answers them all
    shutil.rmtree(work / "stages" / "responses")
    for name in ("corpus", "simulation_report.json", "stages/responses.jsonl", "stages/sessions.jsonl"):
        p = work / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    served1 = _served(server)
    second = _simulate(config, work)
    assert second.returncode == 0, second.stderr[-3000:]
    report2 = json.loads((work / "simulation_report.json").read_text(encoding="utf-8"))
    assert _served(server) == served1  # the server was asked nothing
    assert report2["endpoint_requests"]["asked"] == 0
    assert report2["endpoint_requests"]["journal_hits"] == n_answers
    assert _corpus(work) == corpus1

    # the key's value is nowhere: not in the workdir's files, not in the output
    for p in work.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    for proc in (first, second):
        assert KEY not in proc.stdout + proc.stderr
    assert KEY_VAR in (work / "config.yaml").read_text(encoding="utf-8")  # only the variable's name is kept


def test_unreachable_endpoint_failures_are_counted(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: every request fails at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(tmp_path, {"endpoint": f"http://127.0.0.1:{port}/v1", "model": "tiny",
                                "api_key_env": KEY_VAR, "max_retries": 0, "timeout": 5})
    proc = _simulate(config, tmp_path / "work")
    assert proc.returncode == 1 and "the corpus is empty" in proc.stderr
    report = json.loads((tmp_path / "work" / "simulation_report.json").read_text(encoding="utf-8"))
    assert report["filters"]["query_prompts"]["endpoint_error"] == 4  # every prompt, counted by reason
    assert report["stages"]["queries"]["failed_attempts"] == {"endpoint_error": 12}  # 4 prompts x 3 attempts
    assert report["endpoint_requests"]["failed"] == 12
    assert report["endpoint_requests"]["errors"] == {"APIConnectionError": 12}
    assert KEY not in proc.stdout + proc.stderr


def test_served_response_format_json_schema(client):  # noqa: F811
    schema = {"type": "array", "minItems": 2, "maxItems": 2,
              "items": {"type": "object", "properties": {"question": {"type": "string", "maxLength": 12}},
                        "required": ["question"], "additionalProperties": False}}
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Two questions as JSON."}], max_tokens=120, seed=1,
        temperature=0.7, response_format={"type": "json_schema", "json_schema": {"name": "q", "schema": schema}})
    data = json.loads(resp.choices[0].message.content)
    assert len(data) == 2 and all(set(d) == {"question"} and len(d["question"]) <= 12 for d in data)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       max_tokens=8, response_format={"type": "json_object"})
    assert err.value.body["param"] == "response_format.type"


def _scripted_supervisor(model: str, messages: list[dict[str, str]]) -> str:
    """Three distinct questions as JSON for a query prompt, a short answer in the prompt's language otherwise."""
    tag = hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:6]
    if messages[0]["content"] == QUERY_SYSTEM["en"]:
        return json.dumps([{"question": f"What happened in year {tag}-{i}?"} for i in range(3)])
    if messages[0]["content"] == QUERY_SYSTEM["zh"]:
        return json.dumps([{"question": f"那一年发生了什么事情（{tag}-{i}）？"} for i in range(3)], ensure_ascii=False)
    zh = any("\u4e00" <= ch <= "\u9fff" for ch in messages[0]["content"])
    return f"我记得那些日子，那时我还年轻（{tag}）。" if zh else f"I remember those days well, when I was young ({tag})."


def test_two_processes_ask_only_for_their_own_characters(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_VAR, KEY)
    work = tmp_path / "work"
    with scripted_server(_scripted_supervisor) as endpoint:
        data = yaml.safe_load(_config(tmp_path, {"endpoint": endpoint.base_url, "model": "sup",
                                                 "api_key_env": KEY_VAR}).read_text(encoding="utf-8"))
        data["queries"]["response_format"] = "none"  # the scripted server writes the JSON itself
        cfg = validate(SimulateConfig, data)
        reports: dict[int, dict] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                reports[i] = Simulation(cfg, work, log=lambda _: None, progress=False, process_index=i,
                                        process_count=2).run()
            except BaseException as exc:  # noqa: BLE001 (re-raised below, in the test's thread)
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        served = endpoint.answered()
    characters = sorted(json.loads(line)["character"] for line in
                        (work / "stages" / "plans.jsonl").read_text(encoding="utf-8").splitlines())
    owner = {c: i % 2 for i, c in enumerate(sorted(set(characters)))}
    journals = sorted((work / "endpoint_cache").glob("*.jsonl"))
    assert [p.name.rsplit(".", 2)[1] for p in journals] == ["p00000", "p00001"]
    asked_by = {}
    for i, path in enumerate(journals):
        ids = [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]
        assert ids
        for rid in ids:
            parts = rid.split("/")  # query ids r000/ASKER/OTHER/aK; answer ids CHARACTER/r000/tNN
            char = parts[1] if parts[0].startswith("r0") else parts[0]
            assert owner[char] == i, (rid, i)
            asked_by[rid] = i
    assert len(asked_by) == served  # every request answered once, by the process that owns its character
    report = reports[0]
    assert report["filters"]["query_prompts"]["kept"] == 4 and report["corpus"]["sessions"] == 4
    assert sum(r["endpoint_requests"]["asked"] for r in reports.values()) == served
