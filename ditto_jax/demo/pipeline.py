"""``ditto-jax demo``: the whole Ditto pipeline in one process, each stage through its library entry point.

    simulate  ``Simulation.run``   queries -> responses -> sessions -> corpus (JSONL + TFDS)
    corpus    ``read_sessions`` / ``load_corpus``: the corpus read back, and what SFT trains on
    train     ``run_training``     SFT with Orbax checkpoints
    export    ``load_model`` (training step) + ``hf.save_pretrained``; transformers loads it and gives the same logits
    eval      ``run_eval``         the seed model and the fine-tuned export, judged by the same judge

Layout of ``WORKDIR``::

    demo_config.yaml     the resolved config (a re-run must match it)
    simulate/            the simulation workdir: corpus/*.jsonl, tfds/, simulation_report.json, stages/
    train/               the SFT workdir: checkpoints/, metrics.jsonl, tensorboard/, train_summary.json
    export/hf/           the Hugging Face export of the newest checkpoint; export/export.json: step and logit check
    eval/                the evaluation workdir: runs/{seed,finetuned}/report.json, report.json, report.md/png,
                         transcripts.md (every question: both models' answers and the judge's verdicts)
    demo_summary.json    counts, losses, the evaluation side by side, where everything is

Every stage resumes: simulation and evaluation skip finished requests themselves (exactly-once outputs on disk),
a finished training run is not restarted, an export of the same checkpoint is not redone.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pydantic
import yaml

from ditto_jax import hf
from ditto_jax.checkpoints import CHECKPOINT_DIR, load_model, source_tokenizer
from ditto_jax.config import ConfigError, dump_config
from ditto_jax.data.corpus import load_corpus, read_sessions
from ditto_jax.demo.config import FINETUNED_NAME, SEED_NAME, DemoConfig, StageDirs
from ditto_jax.demo.parity import check_token_ids, transformers_available, transformers_logit_diff
from ditto_jax.demo.summary import RANDOM_INIT_NOTE, build_summary
from ditto_jax.demo.transcripts import write_transcripts
from ditto_jax.eval.pipeline import run_eval
from ditto_jax.eval.report import REPORT_JSON
from ditto_jax.fileio import atomic_write_json, atomic_write_text
from ditto_jax.simulation.stages import Simulation
from ditto_jax.train.checkpoint import latest_step_dir
from ditto_jax.train.config import resolve_asset_paths
from ditto_jax.train.loop import run_training

Log = Callable[[str], None]
STAGES = ("simulate", "corpus", "train", "export", "eval")


class DemoError(RuntimeError):
    """A demo stage failed a check (training did not complete, exported logits differ, ...)."""


class Demo:
    """One demo run over ``WORKDIR`` (re-running resumes). ``run()`` returns the summary."""

    def __init__(self, cfg: DemoConfig, workdir: str | Path, *, log: Log = print, progress: bool = True):
        self.cfg = cfg
        self.dirs = StageDirs(workdir)
        self.log = log
        self.progress = progress
        self.timings: dict[str, dict[str, Any]] = {}

    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage, write ``demo_summary.json`` and return the summary."""
        start = time.perf_counter()
        self.dirs.root.mkdir(parents=True, exist_ok=True)
        self._check_workdir()
        if self.cfg.model.config is not None:
            self.log(f"note: {RANDOM_INIT_NOTE}")
        results: dict[str, Any] = {}
        for i, name in enumerate(STAGES, 1):
            self.log(f"\n[{i}/{len(STAGES)}] {name}")
            t0 = time.perf_counter()
            results[name] = getattr(self, f"stage_{name}")(results)
            self.timings[name] = {"seconds": round(time.perf_counter() - t0, 1),
                                  "resumed": bool(results[name].get("resumed"))}
            self.log(f"[{i}/{len(STAGES)}] {name} done in {self.timings[name]['seconds']}s")
        summary = self._summary(results, time.perf_counter() - start)
        atomic_write_json(self.dirs.summary, summary)
        return summary

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def _check_workdir(self) -> None:
        """Record the config on the first run; refuse a re-run with another one (stale stage outputs)."""
        text = dump_config(self.cfg)
        if self.dirs.config.exists():
            stored = yaml.safe_load(self.dirs.config.read_text(encoding="utf-8")) or {}
            try:  # read with today's schema: a run pinned before a defaulted field or a key rename still matches
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    stored = yaml.safe_load(dump_config(DemoConfig.model_validate(stored)))
            except pydantic.ValidationError:
                pass
            current = yaml.safe_load(text)
            differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            if differ:
                raise ConfigError(f"{self.dirs.root} holds a demo run with a different config (sections {differ} "
                                  f"differ from {self.dirs.config}); re-run with the same overrides, or use a new "
                                  "--workdir")
        else:
            atomic_write_text(self.dirs.config, text)

    # ---- stages --------------------------------------------------------------------------------------------------
    def stage_simulate(self, _: dict[str, Any]) -> dict[str, Any]:
        """Query simulation, response simulation, sessions, corpus (JSONL + TFDS); resumes on its own."""

        resumed = (self.dirs.simulate / "simulation_report.json").exists()
        report = Simulation(self.cfg.simulate, self.dirs.simulate, log=self.log, progress=self.progress).run()
        corpus = report["corpus"]
        self.log(f"simulated {corpus['sessions']} sessions, {corpus['turns']} turns; "
                 f"dropped by filters: {report['dropped_by_reason'] or 'nothing'}")
        return {"report": report, "resumed": resumed}

    def stage_corpus(self, _: dict[str, Any]) -> dict[str, Any]:
        """Read the corpus back (JSONL and TFDS); decide what SFT trains on."""

        sessions, read = read_sessions(self.dirs.corpus)
        tfds_train = len(load_corpus(self.dirs.tfds, split="train")) if sessions else 0
        paths = [str(self.dirs.corpus)]
        mixed: list[str] = []
        mixed_sessions = 0
        if len(sessions) < self.cfg.corpus.min_sessions:
            mixed = resolve_asset_paths(self.cfg.corpus.mix_in)
            mixed_sessions = len(read_sessions(mixed)[0])
            self.log(f"only {len(sessions)} simulated sessions (< corpus.min_sessions={self.cfg.corpus.min_sessions}):"
                     f" SFT also trains on {mixed_sessions} sessions of {', '.join(self.cfg.corpus.mix_in)}")
        else:
            self.log(f"SFT trains on the simulated corpus only ({len(sessions)} sessions)")
        return {"sessions": len(sessions), "turns": sum(len(s.turns) // 2 for s in sessions),
                "read": read.to_dict(), "tfds_train": tfds_train, "sft_paths": paths + mixed,
                "mixed_in": mixed, "mixed_in_sessions": mixed_sessions, "resumed": False}

    def stage_train(self, results: dict[str, Any]) -> dict[str, Any]:
        """SFT with checkpoints (a completed run in ``train/`` is not restarted)."""

        sft = self.cfg.sft
        sft = sft.model_copy(update={"data": sft.data.model_copy(update={"paths": results["corpus"]["sft_paths"]}),
                                     "log": sft.log.model_copy(update={"progress": self.progress})})
        done = _read_json(self.dirs.train / "train_summary.json")
        resumed = bool(done and done.get("status") == "completed" and done.get("step") == sft.train.steps)
        if resumed:
            self.log(f"training already completed (step {done['step']}); not restarted")
        else:
            result = run_training(sft, self.dirs.train)
            if result.status != "completed":
                raise DemoError(f"training ended with status {result.status!r} at step {result.step}; "
                                "re-run the demo to resume")
        return {"resumed": resumed, **training_figures(self.dirs.train)}

    def stage_export(self, _: dict[str, Any]) -> dict[str, Any]:
        """The newest checkpoint as a Hugging Face folder, and the transformers logit check."""

        step_dir = latest_step_dir(self.dirs.train)
        marker = self.dirs.export / "export.json"
        previous = _read_json(marker)
        if (previous and previous.get("checkpoint") == str(step_dir) and (self.dirs.export_hf / "config.json").exists()
                and previous["transformers_check"].get("passed") is not False):
            self.log(f"{self.dirs.export_hf} already holds checkpoint {step_dir}; not redone")
            return {**previous, "resumed": True}

        model, model_cfg = load_model(step_dir)
        hf.save_pretrained(model, model_cfg, self.dirs.export_hf, tokenizer=source_tokenizer(self.cfg.sft.model))
        self.log(f"exported {step_dir} to {self.dirs.export_hf}")
        check = self._transformers_check(model, model_cfg.vocab_size)
        out = {"dir": str(self.dirs.export_hf), "checkpoint": str(step_dir), "step": int(step_dir.name),
               "transformers_check": check}
        atomic_write_json(marker, out)
        if check.get("passed") is False:
            raise DemoError(f"transformers loads {self.dirs.export_hf} but its logits differ from ours by "
                            f"{check['max_abs_diff']:.3g} (> export.atol={self.cfg.export.atol})")
        return {**out, "resumed": False}

    def _transformers_check(self, model: Any, vocab_size: int) -> dict[str, Any]:
        ec = self.cfg.export
        if ec.check_transformers == "never":
            self.log("transformers check skipped (export.check_transformers=never)")
            return {"passed": None, "skipped": "export.check_transformers=never"}
        if not transformers_available():
            if ec.check_transformers == "always":
                raise DemoError("export.check_transformers=always but transformers/torch cannot be imported")
            self.log("transformers check skipped: transformers/torch not installed")
            return {"passed": None, "skipped": "transformers/torch not installed"}
        ids = check_token_ids(vocab_size, ec.check_batch, ec.check_length)
        if not self.progress:  # transformers' own "Loading weights" bar
            import transformers  # noqa: PLC0415 (optional reference)

            transformers.utils.logging.disable_progress_bar()
        diff = transformers_logit_diff(self.dirs.export_hf, model, ids)
        passed = diff["max_abs_diff"] <= ec.atol
        self.log(f"transformers {diff['architecture']} loads the export: max |logit diff| = "
                 f"{diff['max_abs_diff']:.3g} over {diff['tokens']} tokens ({'ok' if passed else 'FAILED'}, "
                 f"atol {ec.atol})")
        return {"passed": passed, "atol": ec.atol, **diff}

    def stage_eval(self, _: dict[str, Any]) -> dict[str, Any]:
        """The seed model and the fine-tuned export answer the same test set; one judge scores both."""

        resumed = (self.dirs.eval / REPORT_JSON).exists()
        run_eval(self.cfg.eval, self.dirs.eval, progress=self.progress)
        reports = {name: json.loads((self.dirs.eval / "runs" / name / REPORT_JSON).read_text(encoding="utf-8"))
                   for name in (SEED_NAME, FINETUNED_NAME)}
        path, entries = write_transcripts(self.cfg.eval, self.dirs.eval, (SEED_NAME, FINETUNED_NAME))
        self.log(f"transcripts of {len(entries)} questions: {path}")
        return {"reports": reports, "transcripts": entries, "resumed": resumed}

    # ---- summary -------------------------------------------------------------------------------------------------
    def _summary(self, results: dict[str, Any], seconds: float) -> dict[str, Any]:
        return build_summary(self.cfg, self.dirs, results, self.timings, seconds)


def training_figures(train_dir: Path) -> dict[str, Any]:
    """Steps, first and last loss (``metrics.jsonl``), checkpoints and status of a training workdir."""

    by_step: dict[int, dict[str, Any]] = {}
    with open(train_dir / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec  # a resumed run rewrites steps after its checkpoint: last wins
    if not by_step:
        raise DemoError(f"{train_dir / 'metrics.jsonl'}: no training steps recorded")
    first, last = by_step[min(by_step)], by_step[max(by_step)]
    ckpt_root = train_dir / CHECKPOINT_DIR
    checkpoints = sorted(int(p.name) for p in ckpt_root.glob("*") if p.name.isdigit() and p.is_dir())
    summary = _read_json(train_dir / "train_summary.json") or {}
    return {"steps": max(by_step), "loss_first": first["loss"], "loss_last": last["loss"],
            "eval_loss_last": last.get("eval_loss"), "checkpoints": checkpoints, "status": summary.get("status"),
            "trained_tokens": sum(int(r.get("trained_tokens", 0)) for r in by_step.values())}


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def run_demo(cfg: DemoConfig, workdir: str | Path, *, log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the demo in ``workdir``; returns the summary (also ``WORKDIR/demo_summary.json``)."""
    return Demo(cfg, workdir, log=log, progress=progress).run()
