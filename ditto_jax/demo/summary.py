"""The demo's summary: ``WORKDIR/demo_summary.json`` and the text printed at the end of ``ditto-jax demo``."""

from __future__ import annotations

from typing import Any

from ditto_jax.demo.config import FINETUNED_NAME, SEED_NAME, DemoConfig, StageDirs
from ditto_jax.demo.transcripts import TRANSCRIPTS_MD, pick_quotes
from ditto_jax.eval.report import results_table

RANDOM_INIT_NOTE = ("the demo model is randomly initialised: every generated text (queries, answers, judge "
                    "verdicts) is noise and the scores are meaningless; the run shows the pipeline, not the "
                    "method. The default demo (without --model tiny) runs the real SmolLM2-135M-Instruct.")

SPLITS = ("all", "en", "zh")
METRICS = ("consistency", "knowledge", "rejection")
SCALE_NOTE = ("a 135M-parameter model is far below the paper's 1.8B-72B seed models: it writes weak role-play data "
              "and is a weak judge, so a small or negative difference is expected")


def compare(reports: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune vs seed on each overall metric (all higher-is-better) and a plain verdict."""
    seed, tuned = reports[SEED_NAME]["metrics"]["all"], reports[FINETUNED_NAME]["metrics"]["all"]
    rows = {}
    for m in METRICS:
        a, b = seed.get(m), tuned.get(m)
        rows[m] = {"seed": a, "finetuned": b, "delta": None if a is None or b is None else round(b - a, 4)}
    deltas = [r["delta"] for r in rows.values() if r["delta"] is not None]
    better = [m for m, r in rows.items() if r["delta"] is not None and r["delta"] > 0]
    worse = [m for m, r in rows.items() if r["delta"] is not None and r["delta"] < 0]
    unreliable = sorted(set(reports[SEED_NAME].get("unreliable_metrics") or [])
                        | set(reports[FINETUNED_NAME].get("unreliable_metrics") or []))
    trusted_gain = [m for m in better if m not in unreliable]
    improved = bool(deltas) and not worse and bool(trusted_gain)
    if improved:
        text = f"the fine-tune scores better than the seed on {', '.join(better)} and no worse on the rest"
    elif better and not worse:
        text = (f"the fine-tune does NOT score measurably better than the seed: it scores higher on "
                f"{', '.join(better)}, but the judge's calibration marks {', '.join(better)} unreliable")
    else:
        text = ("the fine-tune does NOT score better than the seed"
                + (f" (better on {', '.join(better)}" if better else " (better on no metric")
                + (f"; worse on {', '.join(worse)})" if worse else ")"))
    if unreliable:
        text += f"; unreliable judge metrics (calibration): {', '.join(unreliable)}"
    return {"metrics": rows, "finetune_better": improved, "unreliable_metrics": unreliable, "text": text}


def build_summary(cfg: DemoConfig, dirs: StageDirs, results: dict[str, Any], timings: dict[str, Any],
                  seconds: float) -> dict[str, Any]:
    """Counts, losses, the evaluation side by side and every output path, as one JSON-able dict."""

    sim = results["simulate"]["report"]
    corpus, train, export = results["corpus"], results["train"], results["export"]
    reports = results["eval"]["reports"]
    random_init = cfg.model.config is not None
    comparison = compare(reports)
    if not random_init and not comparison["finetune_better"]:
        comparison["text"] += f"; {SCALE_NOTE}"
    return {
        "model": cfg.model.describe(),
        "model_is_random_init": random_init,
        "note": RANDOM_INIT_NOTE if random_init else None,
        "seconds": round(seconds, 1),
        "stages": timings,
        "simulation": {
            "characters": sim["characters"],
            "planned": sim["planned"],
            "filters": sim["filters"],
            "dropped_by_reason": sim["dropped_by_reason"],
            "corpus": {k: sim["corpus"][k] for k in ("sessions", "turns", "mean_turns", "characters", "by_lang",
                                                     "by_kind")},
        },
        "corpus": {k: corpus[k] for k in ("sessions", "turns", "tfds_train", "sft_paths", "mixed_in",
                                          "mixed_in_sessions")},
        "train": {k: v for k, v in train.items() if k != "resumed"},
        "export": {k: v for k, v in export.items() if k != "resumed"},
        "eval": {
            "judge": cfg.eval.judge.model.describe(),
            "judge_samples": cfg.eval.judge.samples,
            "sessions": reports[SEED_NAME]["counts"]["sessions"],
            "turns": reports[SEED_NAME]["counts"]["turns"],
            "runs": {name: {"source": rep["models"]["candidate"]["source"], "metrics": rep["metrics"],
                            "mtbench": rep["mtbench"],
                            "unparsable": {m: u["samples"] for m, u in rep["unparsable"].items()}}
                     for name, rep in reports.items()},
            "table": results_table([(name, reports[name]) for name in (SEED_NAME, FINETUNED_NAME)]),
            "comparison": comparison,
            "quotes": pick_quotes(results["eval"]["transcripts"]),
        },
        "paths": {
            "workdir": str(dirs.root),
            "config": str(dirs.config),
            "corpus_jsonl": str(dirs.corpus),
            "corpus_tfds": str(dirs.tfds),
            "simulation_report": str(dirs.simulate / "simulation_report.json"),
            "checkpoints": str(dirs.train / "checkpoints"),
            "metrics": str(dirs.train / "metrics.jsonl"),
            "tensorboard": str(dirs.train / "tensorboard"),
            "export_hf": str(dirs.export_hf),
            "eval_report": str(dirs.eval / "report.md"),
            "eval_chart": str(dirs.eval / "report.png"),
            "transcripts": str(dirs.eval / TRANSCRIPTS_MD),
            "summary": str(dirs.summary),
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end of ``ditto-jax demo``."""
    sim, corpus, train, export, ev = (summary[k] for k in ("simulation", "corpus", "train", "export", "eval"))
    paths = summary["paths"]
    lines = ["", "== ditto-jax demo: summary ==", f"model: {summary['model']}"]
    if summary["note"]:
        lines.append(f"NOTE: {summary['note']}")
    timing = ", ".join(f"{name} {t['seconds']}s" + (" (resumed)" if t["resumed"] else "")
                       for name, t in summary["stages"].items())
    lines.append(f"time: {summary['seconds']}s ({timing})")
    sc = sim["corpus"]
    lines.append(f"simulation: {sim['characters']['total']} characters {sim['characters']['by_lang']}; planned "
                 f"{sim['planned']['sessions']} sessions / {sim['planned']['turns']} turns; kept {sc['sessions']} "
                 f"sessions / {sc['turns']} turns {sc['by_kind']}; dropped by filters: "
                 f"{sim['dropped_by_reason'] or 'nothing'}")
    lines.append(f"corpus: {corpus['sessions']} sessions, {corpus['turns']} turns read back from the JSONL; "
                 f"TFDS train split: {corpus['tfds_train']} sessions")
    if corpus["mixed_in"]:
        lines.append(f"  SFT data: the simulated corpus is below corpus.min_sessions, so {corpus['mixed_in_sessions']} "
                     f"sessions of the shipped sample corpus were mixed in ({', '.join(corpus['mixed_in'])})")
    else:
        lines.append("  SFT data: the simulated corpus only")
    lines.append(f"train: {train['steps']} steps, loss {train['loss_first']:.4f} (step 1) -> {train['loss_last']:.4f} "
                 f"(step {train['steps']}), {train['trained_tokens']} trained tokens; checkpoints at steps "
                 f"{train['checkpoints']}")
    check = export["transformers_check"]
    if check.get("passed") is None:
        verdict = f"transformers check skipped ({check.get('skipped')})"
    else:
        verdict = (f"transformers {check['architecture']} loads it, max |logit diff| = {check['max_abs_diff']:.3g} "
                   f"({'ok' if check['passed'] else 'FAILED'}, atol {check['atol']})")
    lines.append(f"export: step {export['step']} -> {export['dir']}; {verdict}")
    lines.append(f"evaluation: {ev['sessions']} sessions / {ev['turns']} turns, judge {ev['judge']} "
                 f"({ev['judge_samples']} samples per turn and metric), same judge for both models")
    lines.append(ev["table"])
    lines.append(f"verdict: {ev['comparison']['text']}.")
    for q in ev["quotes"]:
        lines.append(f"example ({q['item']}, {q['role']}, should refuse: {'yes' if q['should_refuse'] else 'no'}):")
        lines.append(f"  user: {_clip(q['question'])}")
        for name, answer in q["answers"].items():
            verdicts = "; ".join(f"{m} {', '.join(v)}" for m, v in q["verdicts"][name].items() if v)
            lines.append(f"  {name}: {_clip(answer if answer is not None else '(no answer)')}")
            lines.append(f"    judge: {verdicts or '-'}")
    lines.append("written:")
    for key, path in paths.items():
        lines.append(f"  {key}: {path}")
    return "\n".join(lines)


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
