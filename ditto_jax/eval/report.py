"""Evaluation reports: ``report.json`` (DESIGN.md's contract), ``report.md`` in the paper's table layout with
several runs side by side, and a bar chart (``report.png``).

One run's ``report.json``::

    {"name": str, "metrics": {"all"|"en"|"zh": {"consistency", "knowledge", "rejection"}},
     "mtbench": {"roleplay", "turn1", "turn2", "questions", "answers"} | null,
     "unparsable": {"consistency"|"knowledge"|"rejection"|"mtbench": {"samples", "turns", "total_samples", "reasons",
                                                                      "forced", "no_reasoning"}},
     "calibration": {"items", "source", "reliable", "metrics": {metric: {"accuracy", "chance", "majority_verdict",
                     "majority_share", "samples", "unparsable", "reliable", "warning"?}}} | null,
     "unreliable_metrics": [metric], "counts": {...}, "models": {"candidate": {...}, "judge": {...}}, "config": {...}}

Consistency and rejection are fractions in [0, 1], knowledge and MT-Bench are 1-10; ``null`` = no scored turn.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

from ditto_jax.eval.judge import MIN_REASONING_WORDS
from ditto_jax.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
SPLIT_NAMES = (("all", "All"), ("en", "En"), ("zh", "Zh"))
METRIC_NAMES = (("consistency", "Cons."), ("knowledge", "Know."), ("rejection", "Rej."))
Run = tuple[str, dict[str, Any]]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _metric(report: dict[str, Any], split: str, metric: str) -> float | None:
    return ((report.get("metrics") or {}).get(split) or {}).get(metric)


def _mtbench(report: dict[str, Any]) -> float | None:
    return (report.get("mtbench") or {}).get("roleplay")


def roleplay_column(runs: Sequence[Run]) -> str:
    """The last column's name: "MT-Bench roleplay" only when every run used FastChat's questions
    (``mtbench.set == "mtbench"``); the shipped project-written questions are not MT-Bench."""
    sets = {(rep.get("mtbench") or {}).get("set") for _, rep in runs if rep.get("mtbench")}
    return "MT-Bench roleplay" if sets == {"mtbench"} else "Roleplay (project set)"


def results_table(runs: Sequence[Run]) -> str:
    """The paper's table: one row per run; Cons./Know./Rej. for All, En, Zh, then the roleplay grade (MT-Bench
    roleplay when FastChat's questions were used)."""
    head = ["Model"] + [f"{s} {m}" for _, s in SPLIT_NAMES for _, m in METRIC_NAMES] + [roleplay_column(runs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, rep in runs:
        cells = [name]
        unreliable = set(rep.get("unreliable_metrics") or ())
        for split, _ in SPLIT_NAMES:
            for metric, _ in METRIC_NAMES:
                cells.append(_fmt(_metric(rep, split, metric)) + (" †" if metric in unreliable else ""))
        cells.append(_fmt(_mtbench(rep)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unparsable_table(runs: Sequence[Run]) -> str:
    """Unparsable judge samples (and turns left without any parsable sample) per metric and run."""
    metrics = ("consistency", "knowledge", "rejection", "mtbench")
    lines = ["| Model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, rep in runs:
        cells = []
        for m in metrics:
            u = (rep.get("unparsable") or {}).get(m)
            if not u:
                cells.append("–")
                continue
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(u.get("reasons", {}).items()))
            forced = f"; {u['forced']} verdicts forced" if u.get("forced") else ""
            bare = f"; {u['no_reasoning']} verdicts without reasoning" if u.get("no_reasoning") else ""
            cells.append(f"{u['samples']}/{u['total_samples']} samples, {u['turns']} turns"
                         + (f" ({reasons})" if reasons else "") + forced + bare)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_warnings(runs: Sequence[Run]) -> list[str]:
    """Plain warnings of the judges' calibration (one per flagged metric and distinct judge)."""
    out: list[str] = []
    for _, rep in runs:
        for m in ((rep.get("calibration") or {}).get("metrics") or {}).values():
            if m.get("warning") and m["warning"] not in out:
                out.append(m["warning"])
    return out


def calibration_table(runs: Sequence[Run]) -> str:
    """The judge's calibration per metric (the first run that has one; one judge scores every run)."""
    cal = next((rep.get("calibration") for _, rep in runs if rep.get("calibration")), None)
    if not cal:
        return "The judge was not calibrated (calibration.enabled=false)."
    lines = [f"{cal['items']} labelled items ({cal['source']}).", "",
             "| Metric | Judge accuracy | Chance | Most frequent verdict | Share | Unparsable | Reliable |",
             "|---|---:|---:|---|---:|---:|---|"]
    for metric, m in cal["metrics"].items():
        acc = f"{m['accuracy']:.2f}" + (f" (r={m['correlation']:.2f})" if m.get("correlation") is not None else "")
        lines.append(f"| {metric} | {acc} | {m['chance']:.2f} | {m['majority_verdict']!s} | {m['majority_share']:.0%} "
                     f"| {m['unparsable']}/{m['samples']} | {'yes' if m['reliable'] else '**NO**'} |")
    return "\n".join(lines)


def render_markdown(runs: Sequence[Run], chart: str | None = REPORT_PNG) -> str:
    """``report.md``: calibration warnings, the results table, unparsable counts, calibration, test set and
    models of each run."""
    out = ["# WikiRoleEval results", ""]
    warns = calibration_warnings(runs)
    if warns:
        out += ["> **Warning: the judge failed its calibration.** Scores of the flagged metrics measure the judge, "
                "not the models:", ">"] + [f"> - {w}" for w in warns] + [""]
    out += [
           "Cons. = consistent role identity (fraction of judge picks naming the true role, 0-1); "
           "Know. = accurate role-related knowledge (1-10); Rej. = unknown-question rejection accuracy (0-1); "
           "MT-Bench roleplay = single-answer grade (1-10) of FastChat's roleplay questions 91-100; "
           "Roleplay (project set) = the same grading of the project-written questions shipped with ditto-jax "
           "(not MT-Bench). Each is judged per turn and averaged over turns.", "",
           results_table(runs), ""]
    unreliable = sorted({m for _, rep in runs for m in rep.get("unreliable_metrics") or []})
    if unreliable:
        out += [f"† unreliable: the judge failed its calibration for {', '.join(unreliable)}.", ""]
    if chart:
        out += [f"![results]({chart})", ""]
    out += ["## Unparsable judge outputs", "", "Counted, never dropped silently. As the reference scoring: a turn "
            "with no parsable identity verdict scores 0; a turn with no parsable knowledge score or rejection vote "
            "is left out of that metric's mean. \"Forced\": samples whose free text ended without a verdict, "
            "completed under a constraint (only the final sentence/line). \"Without reasoning\": parsed verdicts "
            f"with fewer than {MIN_REASONING_WORDS} words written before them (the reference protocol asks for the "
            "analysis first).", "", unparsable_table(runs), "",
            "## Judge calibration", "", calibration_table(runs), "", "## Runs", ""]
    for name, rep in runs:
        counts = rep.get("counts", {})
        models = rep.get("models", {})
        out.append(f"- **{name}**: candidate {models.get('candidate', {}).get('source', '?')}; judge "
                   f"{models.get('judge', {}).get('source', '?')} ({models.get('judge', {}).get('protocol', 'terse')} protocol, "
                   f"{models.get('judge', {}).get('samples', '?')} samples/turn); {counts.get('sessions', '?')} sessions, {counts.get('turns', '?')} turns "
                   f"({json.dumps(counts.get('turns_by_lang', {}))}), MT-Bench answers "
                   f"{(rep.get('mtbench') or {}).get('answers', 0)}.")
    return "\n".join(out) + "\n"


def render_chart(runs: Sequence[Run]) -> bytes:
    """A grouped bar chart (PNG bytes): every metric on a 0-1 scale (Know. and MT-Bench divided by 10)."""

    import matplotlib  # noqa: PLC0415 (slow to import; only when a plot is written)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after the Agg backend is selected)

    labels = [f"{s}\n{m}" for _, s in SPLIT_NAMES for _, m in METRIC_NAMES] + ["MT-Bench\nroleplay"]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.0 * len(labels) + 0.4 * len(runs)), 4.2), dpi=110)
    width = 0.8 / max(len(runs), 1)
    for i, (name, rep) in enumerate(runs):
        values = []
        for split, _ in SPLIT_NAMES:
            for metric, _ in METRIC_NAMES:
                v = _metric(rep, split, metric)
                values.append(None if v is None else (v / 10 if metric == "knowledge" else v))
        mt = _mtbench(rep)
        values.append(None if mt is None else mt / 10)
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [0.0 if v is None else v for v in values], width, label=name)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (Know. and MT-Bench / 10)")
    ax.set_title("WikiRoleEval and MT-Bench roleplay")
    for x in (2.5, 5.5, 8.5):
        ax.axvline(x, color="0.8", lw=0.8)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_comparison(out_dir: str | Path, runs: Sequence[Run]) -> dict[str, Path]:
    """Write ``report.md`` and ``report.png`` for ``runs`` into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    png = out_dir / REPORT_PNG
    atomic_write_bytes(png, render_chart(runs))
    md = out_dir / REPORT_MD
    atomic_write_text(md, render_markdown(runs, REPORT_PNG))
    return {"md": md, "png": png}


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Runs from evaluation work dirs (or ``report.json`` files): a work dir with several candidates contributes
    each of them (``runs/<name>/report.json``). Names clashing across dirs get ``@<dir name>`` appended."""
    found: list[tuple[str, dict[str, Any], Path]] = []
    for d in dirs:
        path = Path(d)
        path = path / REPORT_JSON if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"{path}: no evaluation report (run `ditto-jax eval` first)")
        rep = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rep, dict) or "metrics" not in rep:
            raise ValueError(f"{path}: not an evaluation report (no 'metrics')")
        names = list(rep.get("runs") or [])
        if len(names) > 1:
            for name in names:
                sub = path.parent / "runs" / name / REPORT_JSON
                found.append((name, json.loads(sub.read_text(encoding="utf-8")), path.parent))
        else:
            found.append((rep.get("name") or path.parent.name, rep, path.parent))
    counts: dict[str, int] = {}
    for name, _, _ in found:
        counts[name] = counts.get(name, 0) + 1
    return [(f"{name}@{owner.name}" if counts[name] > 1 else name, rep) for name, rep, owner in found]


def write_run_report(path: str | Path, report: dict[str, Any]) -> None:
    """Write one run's ``report.json`` atomically."""
    atomic_write_json(path, report)
