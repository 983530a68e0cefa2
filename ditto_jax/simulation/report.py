"""The simulation report: counts per stage and filter, sessions/turns by language and kind, sample sessions."""

from __future__ import annotations

import collections
import json as _json
from typing import Any, Sequence

from ditto_jax.simulation.filters import REASONS


def corpus_counts(sessions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sessions and turns (user/assistant exchanges) overall, by language, by query kind and by language x kind."""
    by_lang: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_kind: collections.Counter = collections.Counter()
    for s in sessions:
        users = [t for t in s["turns"] if t["role"] == "user"]
        by_lang[s["lang"]]["sessions"] += 1
        by_lang[s["lang"]]["turns"] += len(users)
        for t in users:
            by_lang[s["lang"]][t["kind"]] += 1
            by_kind[t["kind"]] += 1
    turns = sum(c["turns"] for c in by_lang.values())
    return {
        "sessions": len(sessions),
        "turns": turns,
        "mean_turns": round(turns / len(sessions), 2) if sessions else 0.0,
        "characters": len({s["character"] for s in sessions}),
        "by_lang": {lang: dict(sorted(c.items())) for lang, c in sorted(by_lang.items())},
        "by_kind": dict(sorted(by_kind.items())),
    }


def sample_sessions(sessions: Sequence[dict[str, Any]], k: int = 3) -> list[dict[str, Any]]:
    """Up to ``k`` sessions to show: the first of each language, then the longest of the rest (deterministic)."""
    picked: list[dict[str, Any]] = []
    for lang in ("en", "zh"):
        first = next((s for s in sessions if s["lang"] == lang), None)
        if first is not None:
            picked.append(first)
    rest = sorted((s for s in sessions if s not in picked), key=lambda s: (-len(s["turns"]), s["id"]))
    return (picked + rest)[:k]


def sft_overrides(seed_model: Any, corpus_dir: str) -> list[str]:
    """Dotted ``ditto-jax train`` overrides that fine-tune ``seed_model`` on the simulated corpus.

    Every ``ModelSource`` field is set (``null`` clears a field the SFT config had), so the SFT run trains
    exactly the seed model named in the simulate config, whatever its ``model:`` entry said.
    """

    out = [f"data.paths=[{corpus_dir}]"]
    for key, value in seed_model.model_dump(mode="json").items():
        out.append(f"model.{key}={'null' if value is None else _json.dumps(value) if not isinstance(value, str) else value}")
    return out


def build_report(sim: Any, characters: Sequence[Any], pairings: Sequence[Any], plans: Sequence[Any],
                 sessions: Sequence[dict[str, Any]], corpus: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of a ``Simulation`` run."""
    cfg = sim.cfg
    filters = sim.counts.as_dict()
    dropped = collections.Counter()
    for stage in filters.values():
        dropped.update({r: stage[r] for r in REASONS if stage[r]})
    report = {
        "supervision_model": cfg.supervision_model.describe(),
        "seed_model": cfg.seed_model.model_dump(mode="json"),
        "seed_model_config": str(sim.workdir / "seed_model.yaml"),
        "sft_overrides": sft_overrides(cfg.seed_model, str(sim.workdir / "corpus")),
        "seed": cfg.seed,
        "processes": sim.process_count,
        "characters": {"total": len(characters),
                       "by_lang": dict(sorted(collections.Counter(c.lang for c in characters).items()))},
        "partners": {"strategy": cfg.partners.strategy, "rounds": cfg.partners.rounds,
                     "cross_language": sum(p.cross_language for p in pairings)},
        "planned": {"sessions": len(plans), "turns": sum(len(p.turns) for p in plans)},
        "stages": sim.stage_stats,
        "filters": filters,
        "dropped_by_reason": dict(sorted(dropped.items())),
        "corpus": {**corpus_counts(sessions), **corpus},
        "samples": sample_sessions(sessions),
    }
    requests = endpoint_requests(sim.stage_stats)
    if requests is not None:
        report["endpoint_requests"] = requests
    return report


def endpoint_requests(stage_stats: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """This run's requests to an endpoint supervision model over all stages (``None``: no endpoint stage ran
    here): sent (``asked``), answered from the journal, failed after retries (by error type)."""
    stages = [st["endpoint"] for st in stage_stats.values() if "endpoint" in st]
    if not stages:
        return None
    errors: collections.Counter = collections.Counter()
    for st in stages:
        errors.update(st["errors"])
    return {k: sum(st[k] for st in stages) for k in ("asked", "journal_hits", "failed", "generated_tokens")} | {
        "errors": dict(sorted(errors.items()))}


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary of the report (printed at the end of ``ditto-jax simulate``)."""
    lines = ["", "== simulation report ==",
             f"supervision model: {report['supervision_model']}",
             f"characters: {report['characters']['total']} {report['characters']['by_lang']}, "
             f"partners: {report['partners']}"]
    if report.get("endpoint_requests"):
        r = report["endpoint_requests"]
        lines.append(f"endpoint requests: {r['asked']} sent, {r['journal_hits']} answered from the journal, "
                     f"{r['failed']} failed after retries {r['errors'] or ''}".rstrip())
    lines.append("stages:")
    for name, st in report["stages"].items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in st.items()))
    lines.append("filters (kept / dropped by reason):")
    for stage, c in report["filters"].items():
        drops = ", ".join(f"{r}={c[r]}" for r in REASONS if c[r]) or "none dropped"
        lines.append(f"  {stage}: kept {c['kept']}/{c['total']}; {drops}")
    corpus = report["corpus"]
    lines.append(f"corpus: {corpus['sessions']} sessions, {corpus['turns']} turns (mean {corpus['mean_turns']}), "
                 f"{corpus['characters']} characters")
    for lang, c in corpus["by_lang"].items():
        lines.append(f"  {lang}: " + ", ".join(f"{k}={v}" for k, v in c.items()))
    if corpus.get("jsonl"):
        lines.append(f"  jsonl: {', '.join(corpus['jsonl'])}")
    if corpus.get("tfds"):
        lines.append(f"  tfds: {corpus['tfds']['dataset']} {corpus['tfds']['splits']}")
    lines.append("fine-tune the seed model on it: ditto-jax train --config configs/sft/... --workdir RUN "
                 + " ".join(report["sft_overrides"]))
    for i, s in enumerate(report["samples"], 1):
        lines.append(f"sample {i}: {s['id']} ({s['lang']}) system: {s['system']}")
        for t in s["turns"]:
            tag = f" [{t['kind']}, reject={t['reject']}]" if t["role"] == "user" else ""
            text = t["content"].replace("\n", " ")
            lines.append(f"  {t['role']}{tag}: {text[:160]}{'…' if len(text) > 160 else ''}")
    return "\n".join(lines)
