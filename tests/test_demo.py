"""``ditto-jax demo`` end to end on a still smaller setting (same code path as the default), then resumed.

The demo runs as a subprocess of the real CLI on one CPU device (the tests' 8 simulated devices would only add
overhead on 2 cores). Its outputs are checked with the project's own readers and with transformers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ditto_jax.config import ConfigError
from ditto_jax.demo.config import FINETUNED_NAME, SEED_NAME, load_demo_config

# Fewer characters, fewer steps, shorter generations, a smaller test set: the same stages and code path.
SMALL = [
    "simulate.characters.limit_per_lang=1",
    "simulate.queries.num_questions=2",
    "simulate.queries.sampling.max_new_tokens=96",
    "simulate.responses.sampling.max_new_tokens=12",
    "sft.train.steps=4",
    "sft.checkpoint.every=2",
    "sft.data.seq_len=256",
    "sft.data.global_batch_size=2",
    "eval.testset.limit=2",
    "eval.testset.mtbench_limit=1",
    "eval.answer.max_new_tokens=4",
    "eval.judge.samples=1",
    "corpus.min_sessions=1",
]


def run_demo_cli(workdir: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """``ditto-jax demo --model tiny --workdir WORKDIR --json`` in a subprocess on one CPU device; returns
    (process, seconds)."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ditto_jax.cli", "demo", "--model", "tiny", "--workdir", str(workdir),
                           "--json",
                           "--no-progress", *SMALL, *overrides], capture_output=True, text=True, env=env, timeout=900)
    return proc, time.perf_counter() - start


def corpus_bytes(workdir: Path) -> dict[str, bytes]:
    """Every corpus shard's bytes by file name."""
    return {p.name: p.read_bytes() for p in sorted((workdir / "simulate" / "corpus").glob("*.jsonl"))}


def test_demo_end_to_end_then_resumed(tmp_path: Path) -> None:
    """One test (not a module fixture shared by several): under pytest-xdist the demo then runs exactly once."""
    workdir = tmp_path / "demo"
    first, first_s = run_demo_cli(workdir)
    assert first.returncode == 0, first.stderr[-4000:]
    assert not re.search(r"[\d.]+ ?(it|req)/s", first.stderr), "--no-progress still drew a progress bar"
    snapshot = {
        "corpus": corpus_bytes(workdir),
        "metrics": (workdir / "train" / "metrics.jsonl").read_bytes(),
        "export_mtime": (workdir / "export" / "hf" / "model.safetensors").stat().st_mtime_ns,
        "report": (workdir / "eval" / "report.json").read_bytes(),
        "summary": json.loads(first.stdout),
    }
    runs = {"workdir": workdir, "first": snapshot, "first_s": first_s}
    check_corpus(runs)
    check_training_checkpoints_and_export(runs)
    check_evaluation_report(runs)
    second, second_s = run_demo_cli(workdir)
    assert second.returncode == 0, second.stderr[-4000:]
    check_second_run_resumed(dict(runs, second=second, second_s=second_s))


def check_corpus(demo_runs: dict) -> None:
    """The corpus is non-empty, well-formed (the corpus reader), the same in JSONL and TFDS, and what SFT read."""
    from ditto_jax.data.corpus import load_corpus, read_sessions

    workdir = demo_runs["workdir"]
    sessions, report = read_sessions(workdir / "simulate" / "corpus")
    assert sessions and report.to_dict()["kept"] == len(sessions)
    for s in sessions:
        assert s.turns[0].role == "user" and s.turns[-1].role == "assistant"
        assert all(t.kind in ("role_specific", "contrastive") for t in s.turns[::2])
        assert "profile" not in s.system.lower()
    tfds_ids = sorted(s.id for s in load_corpus(workdir / "simulate" / "tfds", split="train"))
    assert tfds_ids == sorted(s.id for s in sessions)
    summary = demo_runs["first"]["summary"]
    assert summary["corpus"]["sessions"] == len(sessions)
    assert summary["corpus"]["sft_paths"][0] == str(workdir / "simulate" / "corpus")
    assert summary["corpus"]["mixed_in"] == []  # corpus.min_sessions=1: the simulated corpus alone


def check_training_checkpoints_and_export(demo_runs: dict) -> None:
    """The newest checkpoint restores; the export holds the same model, for us and for transformers."""
    import torch
    import transformers

    from ditto_jax import hf
    from ditto_jax.checkpoints import load_model

    workdir = demo_runs["workdir"]
    summary = demo_runs["first"]["summary"]
    assert summary["train"]["steps"] == 4 and summary["train"]["checkpoints"] == [2, 4]
    assert np.isfinite(summary["train"]["loss_first"]) and np.isfinite(summary["train"]["loss_last"])
    trained, cfg = load_model(workdir / "train")  # the training workdir: its newest checkpoint
    exported, _ = hf.load_pretrained(workdir / "export" / "hf")
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24), dtype=np.int32)
    ours = np.asarray(trained(ids))
    np.testing.assert_array_equal(ours, np.asarray(exported(ids)))
    reference = transformers.AutoModelForCausalLM.from_pretrained(workdir / "export" / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = reference(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    check = summary["export"]["transformers_check"]
    assert check["passed"] is True and check["max_abs_diff"] <= 1e-4


def check_evaluation_report(demo_runs: dict) -> None:
    """report.json has DESIGN.md's keys; both models are in the side-by-side table."""
    workdir = demo_runs["workdir"]
    report = json.loads((workdir / "eval" / "report.json").read_text())
    assert {"metrics", "unparsable"} <= set(report)
    assert set(report["metrics"]) == {"all", "en", "zh"}
    for split in report["metrics"].values():
        assert set(split) == {"consistency", "knowledge", "rejection"}
    assert report["runs"] == [SEED_NAME, FINETUNED_NAME]
    runs = demo_runs["first"]["summary"]["eval"]["runs"]
    assert runs[FINETUNED_NAME]["source"] == f"checkpoint {workdir / 'export' / 'hf'}"
    assert runs[SEED_NAME]["metrics"]["all"]["consistency"] is not None
    table = demo_runs["first"]["summary"]["eval"]["table"]
    assert f"| {SEED_NAME} |" in table and f"| {FINETUNED_NAME} |" in table
    on_disk = json.loads((workdir / "demo_summary.json").read_text())
    assert on_disk["eval"]["table"] == table and on_disk["model_is_random_init"] is True
    check_transcripts(demo_runs)


def check_transcripts(demo_runs: dict) -> None:
    """transcripts.md has every evaluated question with both models' answers (as on disk) and the judge's verdicts;
    the summary quotes two of them and states the comparison."""
    from ditto_jax.eval.pipeline import load_testset
    from ditto_jax.sampling.runner import read_outputs

    workdir = demo_runs["workdir"]
    summary = demo_runs["first"]["summary"]
    cfg = load_demo_config("demo-tiny", SMALL, workdir)
    text = (workdir / "eval" / "transcripts.md").read_text()
    questions = [(s, t, turn) for s in load_testset(cfg.eval).sessions for t, turn in enumerate(s.turns)]
    assert questions and text.count("\n## ") == len(questions)
    for s, t, turn in questions:
        item = f"{s.id}/t{t:02d}"
        block = text.split(f"## {item} — {s.label}")[1].split("\n## ")[0]
        assert turn.prompt in block and f"**Should refuse:** {'yes' if turn.reject else 'no'}" in block
        for name in (SEED_NAME, FINETUNED_NAME):
            answer = read_outputs(workdir / "eval" / "runs" / name / "answers" / f"t{t:02d}")[item]["text"].strip()
            assert f"**{name}:**" in block and (answer.splitlines() or [""])[0] in block
        assert block.count("*judge:* consistency: ") == 2
    quotes = summary["eval"]["quotes"]
    assert len(quotes) == 2 and all(q["item"] in text for q in quotes)
    comparison = summary["eval"]["comparison"]
    assert set(comparison["metrics"]) == {"consistency", "knowledge", "rejection"}
    assert comparison["text"].startswith("the fine-tune ")


def check_second_run_resumed(demo_runs: dict) -> None:
    """The second run skips every finished stage, changes no output, and is much faster."""
    workdir, first = demo_runs["workdir"], demo_runs["first"]
    summary = json.loads(demo_runs["second"].stdout)
    assert {name: t["resumed"] for name, t in summary["stages"].items()} == {
        "simulate": True, "corpus": False, "train": True, "export": True, "eval": True}
    assert corpus_bytes(workdir) == first["corpus"]
    assert (workdir / "train" / "metrics.jsonl").read_bytes() == first["metrics"]
    assert (workdir / "export" / "hf" / "model.safetensors").stat().st_mtime_ns == first["export_mtime"]
    assert (workdir / "eval" / "report.json").read_bytes() == first["report"]
    assert summary["eval"]["table"] == first["summary"]["eval"]["table"]
    assert demo_runs["second_s"] < demo_runs["first_s"] / 2, (demo_runs["first_s"], demo_runs["second_s"])


def test_config_overrides_reach_the_stages(tmp_path: Path) -> None:
    cfg = load_demo_config("demo-tiny", ["model.seed=3", "sft.train.steps=7", "simulate.characters.limit_per_lang=1"],
                           tmp_path)
    assert cfg.sft.train.steps == 7 and cfg.simulate.characters.limit_per_lang == 1
    assert cfg.simulate.queries.num_questions == 3  # from the simulate/tiny base preset
    assert {cfg.simulate.supervision_model.seed, cfg.simulate.seed_model.seed, cfg.sft.model.seed,
            cfg.eval.candidates[0].model.seed} == {3}
    assert cfg.sft.data.paths == [str(tmp_path.absolute() / "simulate" / "corpus")]
    assert cfg.eval.candidates[1].model.path == str(tmp_path.absolute() / "export" / "hf")


def test_default_demo_is_the_real_model_and_model_replaces_it(tmp_path: Path) -> None:
    """The default demo runs SmolLM2-135M-Instruct on English characters with real-weight presets (nothing loaded
    here); ``--model SRC`` replaces the model everywhere, the judge included; the CLI's ``--model tiny`` preset is
    the random-init one."""
    from ditto_jax.commands.demo import TINY_CONFIG

    cfg = load_demo_config("demo", [], tmp_path)
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.model.config is None
    assert cfg.simulate.characters.langs == ["en"] and cfg.eval.testset.langs == ["en"]
    assert cfg.sft.optim.peak_lr <= 1e-4 and cfg.sft.data.global_batch_size <= 4
    assert cfg.eval.judge.protocol == "terse" and cfg.eval.judge.samples == 1
    assert cfg.eval.judge.model == cfg.model == cfg.eval.candidates[0].model == cfg.sft.model
    other = load_demo_config("demo", ["sft.train.steps=3"], tmp_path, model={"path": "/x/other.gguf"})
    assert {other.model.path, other.eval.judge.model.path, other.sft.model.path,
            other.simulate.supervision_model.path, other.eval.candidates[0].model.path} == {"/x/other.gguf"}
    assert other.sft.train.steps == 3
    assert load_demo_config(TINY_CONFIG, [], tmp_path).model.config == "model/tiny"


def test_summary_says_plainly_when_the_finetune_is_not_better() -> None:
    from ditto_jax.demo.summary import compare

    def report(c, k, r, unreliable=()):
        return {"metrics": {"all": {"consistency": c, "knowledge": k, "rejection": r}},
                "unreliable_metrics": list(unreliable)}

    worse = compare({SEED_NAME: report(0.5, 6.0, 0.6), FINETUNED_NAME: report(0.4, 6.5, 0.6, ["knowledge"])})
    assert not worse["finetune_better"] and worse["metrics"]["consistency"]["delta"] == -0.1
    assert worse["text"].startswith("the fine-tune does NOT score better than the seed (better on knowledge; "
                                    "worse on consistency)") and "unreliable" in worse["text"]
    better = compare({SEED_NAME: report(0.5, 6.0, 0.6), FINETUNED_NAME: report(0.7, 6.0, 0.8)})
    assert better["finetune_better"] and "better than the seed on consistency, rejection" in better["text"]
    untrusted = compare({SEED_NAME: report(0.5, 6.0, 0.6), FINETUNED_NAME: report(0.7, 6.0, 0.6, ["consistency"])})
    assert not untrusted["finetune_better"] and untrusted["text"].startswith(
        "the fine-tune does NOT score measurably better than the seed: it scores higher on consistency, but")
    same = compare({SEED_NAME: report(0.5, 6.0, 0.6), FINETUNED_NAME: report(0.5, 6.0, 0.6)})
    assert not same["finetune_better"] and "does NOT score better" in same["text"]


@pytest.mark.parametrize("override, message", [
    ("sft.model.seed=1", "sft.model is set by the demo"),
    ("eval.candidates=[]", "eval.candidates is set by the demo"),
    ("sft.train.stepz=3", "sft.train.stepz: Extra inputs are not permitted"),
    ("simulate.base=simulate/nope", "config not found: simulate/nope"),
])
def test_bad_config_is_refused_before_any_work(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_demo_config("demo", [override], tmp_path)


def test_cli_exits_2_on_a_bad_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ditto_jax.cli import main

    assert main(["demo", "--workdir", str(tmp_path / "w"), "sft.optim.peak_lr=-1"]) == 2
    assert "sft.optim.peak_lr" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_logit_check_tells_the_exported_model_from_another(tmp_path: Path) -> None:
    """The export check passes for the exported model and fails (a large difference) for a different one."""
    from ditto_jax import hf
    from ditto_jax.checkpoints import ModelSource, load_model_source
    from ditto_jax.demo.parity import check_token_ids, transformers_logit_diff

    model, cfg, tokenizer = load_model_source(ModelSource(config="model/tiny", seed=0))
    other, _, _ = load_model_source(ModelSource(config="model/tiny", seed=1))
    hf.save_pretrained(model, cfg, tmp_path / "hf", tokenizer=tokenizer)
    ids = check_token_ids(cfg.vocab_size, 2, 16)
    same = transformers_logit_diff(tmp_path / "hf", model, ids)
    assert same["max_abs_diff"] <= 1e-4 and same["architecture"] == "LlamaForCausalLM" and same["tokens"] == 32
    assert transformers_logit_diff(tmp_path / "hf", other, ids)["max_abs_diff"] > 1e-2
