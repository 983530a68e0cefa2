"""``WORKDIR/eval/transcripts.md``: every evaluation question with the seed's and the fine-tune's answers side by
side, and the judge's verdicts on each.

Read back from what the evaluation wrote: the test set (``load_testset``), each candidate's answers
(``runs/<name>/answers/tNN``, runner shards) and every judge sample (``judgements.jsonl``). Nothing is
re-generated, so the file always shows exactly what was scored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ditto_jax.eval.config import EvalConfig
from ditto_jax.eval.pipeline import JUDGEMENTS, load_testset
from ditto_jax.eval.wikiroleeval import answer_request_id
from ditto_jax.fileio import atomic_write_text
from ditto_jax.sampling.runner import read_outputs

TRANSCRIPTS_MD = "transcripts.md"
METRIC_ORDER = ("consistency", "knowledge", "rejection")


def read_answers(eval_dir: Path, name: str) -> dict[str, str]:
    """A candidate's WikiRoleEval answers by request id (every turn stage under ``runs/<name>/answers``)."""
    out: dict[str, str] = {}
    root = eval_dir / "runs" / name / "answers"
    for stage in sorted(p for p in root.glob("t*") if p.is_dir()):
        for rid, rec in read_outputs(stage).items():
            out[rid] = (rec.get("text") or "").strip()
    return out


def read_verdicts(eval_dir: Path) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    """Judge samples by ``(candidate, item)`` then metric (WikiRoleEval rows of ``judgements.jsonl``)."""
    out: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    path = eval_dir / JUDGEMENTS
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row.get("metric") in METRIC_ORDER and "candidate" in row:
                    out.setdefault((row["candidate"], row["item"]), {}).setdefault(row["metric"], []).append(row)
    return out


def verdict_text(row: Mapping[str, Any]) -> str:
    """One judge sample in words: the role it picked, the score, refused/answered, or why it failed."""
    value = row.get("verdict")
    if value is None:
        return f"unparsable ({row.get('failure') or 'no verdict'})"
    metric = row["metric"]
    if metric == "consistency":
        chosen = row.get("chosen")
        if chosen is None:
            return "named no listed role"
        return f"{chosen} ({'right' if chosen == row.get('true_role') else 'wrong'})"
    if metric == "rejection":
        return "refused" if value == 1 else "answered"
    return f"{value}/10"


def collect(eval_cfg: EvalConfig, eval_dir: str | Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per evaluation question: role, question, should-refuse, each candidate's answer and verdicts."""
    eval_dir = Path(eval_dir)
    testset = load_testset(eval_cfg)
    answers = {name: read_answers(eval_dir, name) for name in names}
    verdicts = read_verdicts(eval_dir)
    entries = []
    for s in testset.sessions:
        for t, turn in enumerate(s.turns):
            item = answer_request_id(s.id, t)
            entries.append({
                "item": item, "session": s.id, "turn": t, "role": s.label, "lang": s.lang,
                "question": turn.prompt, "should_refuse": bool(turn.reject),
                "answers": {name: answers[name].get(item) for name in names},
                "verdicts": {name: {m: [verdict_text(r) for r in verdicts.get((name, item), {}).get(m, [])]
                                    for m in METRIC_ORDER} for name in names},
            })
    return entries


def _quote(text: str | None) -> str:
    if text is None:
        return "> *(no answer on disk)*"
    if not text:
        return "> *(empty answer)*"
    return "\n".join("> " + line if line else ">" for line in text.splitlines())


def render(entries: Sequence[Mapping[str, Any]], names: Sequence[str], title: str) -> str:
    """The markdown of ``transcripts.md``."""
    lines = [f"# {title}", "",
             f"{len(entries)} evaluation questions; for each: the role, whether the role should refuse it, "
             f"the answers of {' and '.join(f'`{n}`' for n in names)}, and the judge's verdicts "
             "(consistency: the role the judge recognised; knowledge: 1-10; rejection: refused/answered).", ""]
    for e in entries:
        lines += [f"## {e['item']} — {e['role']} ({e['lang']})", "",
                  f"**Question:** {e['question']}", "",
                  f"**Should refuse:** {'yes' if e['should_refuse'] else 'no'}", ""]
        for name in names:
            verdicts = "; ".join(f"{m}: {', '.join(v) if v else '–'}" for m, v in e["verdicts"][name].items())
            lines += [f"**{name}:**", "", _quote(e["answers"][name]), "", f"*judge:* {verdicts}", ""]
    return "\n".join(lines)


def write_transcripts(eval_cfg: EvalConfig, eval_dir: str | Path, names: Sequence[str]) -> tuple[Path, list[dict]]:
    """Write ``eval_dir/transcripts.md``; returns its path and the entries."""
    entries = collect(eval_cfg, eval_dir, names)
    path = Path(eval_dir) / TRANSCRIPTS_MD
    atomic_write_text(path, render(entries, names, "Evaluation transcripts: " + " vs ".join(names)) + "\n")
    return path, entries


def pick_quotes(entries: Sequence[Mapping[str, Any]], k: int = 2) -> list[Mapping[str, Any]]:
    """``k`` entries to quote in the summary: one the role should answer and one it should refuse when the set
    has both, preferring entries where both candidates answered something."""
    answered = [e for e in entries if all(e["answers"].values())] or list(entries)
    picks: list[Mapping[str, Any]] = []
    for refuse in (False, True):
        match = next((e for e in answered if e["should_refuse"] == refuse and e not in picks), None)
        if match is not None:
            picks.append(match)
    picks += [e for e in answered if e not in picks][: k - len(picks)]
    return picks[:k]
