"""``ditto-jax eval``: answer the test sessions with each candidate, judge every turn, write the reports.

Work dir layout (every stage resumable; a re-run skips finished requests and loads no model it does not need)::

    WORKDIR/config.yaml                        the config of this run (a re-run must match it)
    WORKDIR/runs/<name>/answers/t00 ...        candidate answers, one stage per turn position
    WORKDIR/runs/<name>/mtbench_answers/t0, t1
    WORKDIR/runs/<name>/judge                  every judge sample of the candidate (WikiRoleEval + MT-Bench)
    WORKDIR/runs/<name>/judge_final            reference protocol: forced verdicts of samples whose free text
                                               did not end in one (local judge, judge.constrained)
    WORKDIR/calibration/                       the judge on the hand-labelled calibration set (same layout)
    WORKDIR/judgements.jsonl                   every judge sample: candidate, item, metric, sample, shown
                                               candidate order, raw text, verdict or why it failed
    WORKDIR/endpoint_cache/                    answers of endpoint models (never asked twice)
    WORKDIR/runs/<name>/report.json            the candidate's report
    WORKDIR/report.json                        the first candidate's report, plus "runs" (all candidates' names)
    WORKDIR/report.md, WORKDIR/report.png      all candidates side by side

Models are loaded lazily: a candidate whose answers are all on disk is not loaded again; the judge is loaded once
for all candidates, and only when some judge output is missing. The judge's calibration runs before it judges
any candidate (``ditto_jax.eval.calibration``). Any model may be an OpenAI-compatible endpoint
(``ditto_jax.sampling.endpoint``): it gets chat messages instead of token ids and cannot be constrained.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ditto_jax.checkpoints import ModelSource
from ditto_jax.config import ConfigError, pin_config
from ditto_jax.data.characters import load_characters
from ditto_jax.data.records import iter_json_lines
from ditto_jax.eval import calibration as C
from ditto_jax.eval import judge as J
from ditto_jax.eval import mtbench as M
from ditto_jax.eval import wikiroleeval as W
from ditto_jax.eval.config import CandidateConfig, EvalConfig
from ditto_jax.eval.metrics import aggregate, aggregate_mtbench
from ditto_jax.eval.report import REPORT_JSON, load_runs, write_comparison, write_run_report
from ditto_jax.eval.stages import run_stage
from ditto_jax.eval.testsets import EvalSession, MTBenchQuestion, load_mtbench, load_wikiroleeval
from ditto_jax.fileio import atomic_write_json, atomic_write_jsonl
from ditto_jax.sampling import EngineConfig, LoadedEngine, Request, SamplingParams, load_engine
from ditto_jax.sampling.endpoint import ChatRequest, EndpointEngine, EndpointSource, is_endpoint

PROMPT_STATS = "prompt_stats.json"
JUDGEMENTS = "judgements.jsonl"
ENDPOINT_CACHE = "endpoint_cache"
FINAL_NEW_TOKENS = 40  # room for a forced verdict (a role name and "]", or a score)
LEAD_TOKENS = 16  # room for the judge's analysis lead (J.ANALYSIS_LEAD)


@dataclasses.dataclass
class LocalModel:
    """A local model: its ``LoadedEngine`` (``ditto_jax.sampling.load_engine``: model, tokenizer, engine,
    constraints), loaded on first use and dropped by ``release``."""

    source: ModelSource
    engine_cfg: EngineConfig
    loaded: LoadedEngine | None = None
    is_endpoint = False

    def load(self) -> "LocalModel":
        """Load the model and build its engine (idempotent)."""
        if self.loaded is None:
            print(f"loading {self.source.describe()}", file=sys.stderr)
            self.loaded = load_engine(self.source, self.engine_cfg, require_tokenizer=True)
        return self

    def _get(self) -> LoadedEngine:
        return self.load().loaded  # type: ignore[return-value]

    @property
    def engine(self) -> Any:
        """The sampling engine (loads the model)."""
        return self._get().engine

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loads the model)."""
        return self._get().tokenizer

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding (may exceed the tokenizer's ids)."""
        return self._get().model_cfg.vocab_size

    @property
    def free_text(self) -> Any:
        """The constraint keeping free text to the tokenizer's ids (``LoadedEngine.free_text``)."""
        return self._get().free_text

    def constraint(self, key: Any, build: Callable[[], Any]) -> Any:
        """A decoding constraint built once per loaded model (``LoadedEngine.constraint``)."""
        return self._get().constraint(key, build)

    def release(self) -> None:
        """Drop the model, engine and constraints (frees device memory before the next model loads)."""
        self.loaded = None
        gc.collect()

    def request(self, rid: str, prompt_ids: Any, messages: Any, params: Any, constraint: Any = None) -> Any:
        """A sampling-engine request (token ids)."""
        return Request(rid, prompt_ids, params, constraint)


@dataclasses.dataclass
class EndpointModel:
    """A model behind an OpenAI-compatible endpoint: no weights, no tokenizer, no constraints; answers are
    journalled under ``cache_dir`` (a re-run never asks for them again)."""

    source: EndpointSource
    cache_dir: Path
    engine: Any = None
    tokenizer: Any = None
    free_text: Any = None
    is_endpoint = True

    def load(self) -> "EndpointModel":
        """Build the client (idempotent; reads the key from the environment)."""
        if self.engine is None:
            self.engine = EndpointEngine(self.source, self.cache_dir)
        return self

    def constraint(self, key: Any, build: Callable[[], Any]) -> Any:
        """Endpoints take no decoding constraints."""
        return None

    def release(self) -> None:
        """Nothing to free."""
        self.engine = None

    def request(self, rid: str, prompt_ids: Any, messages: Any, params: Any, constraint: Any = None) -> Any:
        """A chat request (messages)."""
        return ChatRequest(rid, messages, params)


@dataclasses.dataclass(frozen=True)
class TestSet:
    """What is evaluated: sessions, MT-Bench questions, candidate descriptions and read statistics."""

    sessions: list[EvalSession]
    questions: list[MTBenchQuestion]
    descriptions: Mapping[str, str]
    stats: dict[str, Any]


def load_testset(cfg: EvalConfig) -> TestSet:
    """Load and filter the configured test sets and the knowledge base that describes the candidates."""

    sessions, report = load_wikiroleeval(cfg.testset.wikiroleeval)
    selected = [s for s in sessions if s.lang in cfg.testset.langs]
    filtered = len(sessions) - len(selected)
    if cfg.testset.limit is not None:
        selected = selected[: cfg.testset.limit]
    if cfg.testset.max_turns is not None:
        selected = [s.model_copy(update={"turns": s.turns[: cfg.testset.max_turns]}) for s in selected]
    if not selected:
        raise ConfigError(f"no test sessions left (langs={cfg.testset.langs}, limit={cfg.testset.limit})")
    questions: list[MTBenchQuestion] = []
    mt_report = None
    if cfg.testset.mtbench_enabled:
        questions, mt_report = load_mtbench(cfg.testset.mtbench)
        if cfg.testset.mtbench_limit is not None:
            questions = questions[: cfg.testset.mtbench_limit]
    descriptions = J.descriptions_by_label(load_characters(cfg.testset.characters))
    stats = {"wikiroleeval": report.to_dict() | {"language_filtered": filtered, "used": len(selected)},
             "mtbench": None if mt_report is None else mt_report.to_dict() | {"used": len(questions)}}
    return TestSet(selected, questions, descriptions, stats)


def _answer_params(cfg: EvalConfig, tokenizer: Any) -> Any:
    if tokenizer is None:
        return cfg.answer
    return cfg.answer.for_request(cfg.answer.seed, tokenizer.stop_ids)


def _text(record: Mapping[str, Any]) -> str:
    return (record.get("text") or "").strip()


def _answer_waves(name: str, stage_root: Path, waves: int, expected: Callable[[int], list[str]],
                  prompts: Callable[[int, dict[str, str], Any, int], list[W.Prompt]], cand: Any, cfg: EvalConfig,
                  stats: dict[str, int], desc: str, progress: bool = True) -> dict[str, str]:
    """Run answer waves ``0..waves-1``; each wave sees the answers of the previous ones."""
    answers: dict[str, str] = {}
    for t in range(waves):
        stage_dir = stage_root / f"t{t:02d}"

        def make_requests(pending: set[str], t: int = t, stage_dir: Path = stage_dir) -> Iterable[Any]:
            cand.load()
            budget = cfg.engine.max_len - cfg.answer.max_new_tokens
            params = _answer_params(cfg, cand.tokenizer)
            vocab_mask = cand.free_text
            wave = prompts(t, answers, None if cand.is_endpoint else W.chat_encoder(cand.tokenizer), budget)
            # counted over the whole wave and kept on disk: a resumed run may not rebuild these prompts
            atomic_write_json(stage_dir / PROMPT_STATS, {"history_trimmed": sum(p.trimmed > 0 for p in wave)})
            return [cand.request(p.id, p.input_ids, p.messages, params, vocab_mask) for p in wave if p.id in pending]

        records = run_stage(stage_dir, expected(t), make_requests, lambda: cand.load().engine,
                            f"{name}: {desc} turn {t + 1}/{waves}", cfg.engine, progress=progress)
        if (stage_dir / PROMPT_STATS).exists():
            stats["history_trimmed"] += json.loads((stage_dir / PROMPT_STATS).read_text("utf-8"))["history_trimmed"]
        for rid, rec in records.items():
            answers[rid] = _text(rec)
            stats["truncated"] += int(rec.get("finish_reason") == "length")
            stats["answers"] += 1
    return answers


def answer_candidate(cand_cfg: CandidateConfig, cand: Any, cfg: EvalConfig, testset: TestSet,
                     run_dir: Path, progress: bool = True) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    """All answers of one candidate: ``(wikiroleeval answers, mtbench answers, stats)``."""
    stats = {"answers": 0, "truncated": 0, "history_trimmed": 0}
    sessions = testset.sessions
    max_turns = max(len(s.turns) for s in sessions)
    wre = _answer_waves(
        cand_cfg.name, run_dir / "answers", max_turns,
        lambda t: [W.answer_request_id(s.id, t) for s in sessions if t < len(s.turns)],
        lambda t, answers, enc, budget: W.answer_prompts(sessions, t, answers, enc, budget),
        cand, cfg, stats, "WikiRoleEval answers", progress)
    mt: dict[str, str] = {}
    if testset.questions:
        qs = testset.questions
        mt = _answer_waves(
            cand_cfg.name, run_dir / "mtbench_answers", 2,
            lambda t: [M.answer_request_id(q.question_id, t) for q in qs],
            lambda t, answers, enc, budget: M.answer_prompts(qs, t, answers, enc, budget),
            cand, cfg, stats, "MT-Bench answers", progress)
    return wre, mt, stats


def _judge_ids(testset: TestSet, samples: int) -> list[str]:
    ids = [W.judge_request_id(s.id, t, m, k) for s in testset.sessions for t in range(len(s.turns))
           for m in J.METRICS for k in range(samples)]
    ids += [M.judge_request_id(q.question_id, t, k) for q in testset.questions for t in (0, 1) for k in range(samples)]
    return ids


def _strip_stops(ids: Sequence[int], stops: Any) -> list[int]:
    out = list(ids)
    while out and out[-1] in stops:
        out.pop()
    return out


@dataclasses.dataclass
class JudgeOutcome:
    """One candidate's judged results: per-turn and MT-Bench judgements, stats, judgements.jsonl rows."""

    turns: list[Any]
    mtbench: list[Any]
    stats: dict[str, Any]
    rows: list[dict[str, Any]]


def judge_candidate(name: str, judge: Any, cfg: EvalConfig, testset: TestSet, wre: Mapping[str, str],
                    mt: Mapping[str, str], run_dir: Path, progress: bool = True,
                    templates: Mapping[str, Mapping[str, str]] | None = None) -> JudgeOutcome:
    """Judge every turn of one candidate (``wre``/``mt``: its answers by request id).

    Stage ``judge``: every sample, free text (reference) or constrained (terse; reference's rejection 0/1).
    Stage ``judge_final`` (reference protocol, local judge, ``judge.constrained``): a sample whose free text does
    not end in a parsable verdict is continued after ``J.VERDICT_LEAD`` under ``J.verdict_pattern`` — only that
    final sentence/line is constrained; its raw text is the free text, the lead and the forced verdict."""

    jc = cfg.judge
    protocol = jc.protocol
    limits = W.JudgeLimits(jc.max_answer_chars, jc.max_summary_chars, jc.max_evidence_chars)
    reserve = FINAL_NEW_TOKENS + 16 + LEAD_TOKENS if protocol == "reference" else 0
    budget = cfg.engine.max_len - jc.new_tokens - reserve
    built: list[tuple[list[W.JudgeTask], list[W.JudgeTask]]] = []
    use_lead = protocol == "reference" and jc.analysis_lead and not is_endpoint(jc.model)

    def lead(task: W.JudgeTask) -> str:
        return J.ANALYSIS_LEAD.get((task.metric, task.lang), "") if use_lead else ""

    def led(task: W.JudgeTask) -> W.JudgeTask:  # the judge's turn starts with the analysis lead
        text = lead(task)
        if not text or not task.sendable:
            return task
        return dataclasses.replace(task, input_ids=list(task.input_ids) + judge.tokenizer.encode(text))

    def full_tasks() -> tuple[list[W.JudgeTask], list[W.JudgeTask]]:
        if not built:
            judge.load()
            enc = None if judge.is_endpoint else W.chat_encoder(judge.tokenizer)
            wre_tasks = W.judge_tasks(testset.sessions, wre, testset.descriptions, enc, jc.samples, limits, budget,
                                      protocol=protocol, seed=cfg.seed)
            mt_tasks = M.judge_tasks(testset.questions, mt, enc, jc.samples, limits, budget, protocol, templates)
            built.append(([led(t) for t in wre_tasks], [led(t) for t in mt_tasks]))
        return built[0]

    def params(max_new: int) -> Any:
        stops = [] if judge.is_endpoint else sorted(judge.tokenizer.stop_ids)
        return SamplingParams(temperature=jc.temperature, top_p=jc.top_p, max_new_tokens=max_new,
                              stop_token_ids=stops, seed=cfg.seed)

    def constraint_for(metric: str, num_options: int) -> Any:
        if judge.is_endpoint:
            return None
        vocab = judge.vocab_size
        if jc.constrained and protocol == "terse":
            return judge.constraint((metric, num_options), lambda: J.judge_constraint(
                metric, judge.tokenizer, vocab, num_options or 4))
        if jc.constrained and metric == "rejection":
            return judge.constraint(("verdict", metric), lambda: J.regex_for(J.verdict_pattern(metric),
                                                                             judge.tokenizer, vocab))
        return judge.free_text

    def make_requests(pending: set[str]) -> Iterable[Any]:
        wre_tasks, mt_tasks = full_tasks()
        p = params(jc.new_tokens)
        for task in wre_tasks + mt_tasks:
            if task.id not in pending or not task.sendable:
                continue
            yield judge.request(task.id, task.input_ids, task.messages, p, constraint_for(task.metric, task.num_options))

    outputs = run_stage(run_dir / "judge", _judge_ids(testset, jc.samples), make_requests,
                        lambda: judge.load().engine, f"{name}: judging", cfg.engine, progress=progress)
    wre_sk, mt_sk = _task_skeletons(testset, jc.samples, cfg.seed)
    leads = {t.id: lead(t) for t in wre_sk + mt_sk}
    outputs = {i: {**out, "text": leads[i] + (out.get("text") or "")} if leads.get(i) else out
               for i, out in outputs.items()}  # the raw text as the judge's turn reads: lead, then its words
    final_outputs = dict(outputs)
    forced = 0
    if protocol == "reference" and jc.constrained and not is_endpoint(jc.model):
        by_id = {s.id: s for s in testset.sessions}
        need = []
        for task in wre_sk + mt_sk:
            out = outputs.get(task.id)
            if out is None or task.metric == "rejection":
                continue
            cands = by_id[task.session].candidates if task.metric != "mtbench" else ()
            if W.parse_task(task, out.get("text"), protocol, cands) is None:
                need.append(task)
        need_ids = [t.id for t in need]

        def make_final(pending: set[str]) -> Iterable[Any]:
            wre_tasks, mt_tasks = full_tasks()
            tasks = {t.id: t for t in wre_tasks + mt_tasks}
            stops = judge.tokenizer.stop_ids
            for task in need:
                if task.id not in pending:
                    continue
                full = tasks[task.id]
                lead = judge.tokenizer.encode(J.VERDICT_LEAD[(task.metric, task.lang)])
                free = _strip_stops(outputs[task.id].get("output_ids") or [], stops)
                room = cfg.engine.max_len - FINAL_NEW_TOKENS - len(full.input_ids) - len(lead)
                ids = list(full.input_ids) + free[:max(room, 0)] + lead
                # identity: only the names listed for this sample (a small judge otherwise writes "[name]")
                names = tuple(sorted(set(by_id[task.session].candidates))) if task.metric == "consistency" else ()
                yield judge.request(task.id, ids, None, params(FINAL_NEW_TOKENS), judge.constraint(
                    ("verdict", task.metric, names), lambda m=task.metric, n=names: J.regex_for(
                        J.verdict_pattern(m, n), judge.tokenizer, judge.vocab_size)))

        if need_ids:
            finals = run_stage(run_dir / "judge_final", need_ids, make_final, lambda: judge.load().engine,
                               f"{name}: forcing {len(need_ids)} verdicts", cfg.engine, progress=progress)
            for task in need:
                fin = finals.get(task.id)
                if fin is None:
                    continue
                free = outputs[task.id]
                final_outputs[task.id] = {
                    "id": task.id, "text": (free.get("text") or "") + J.VERDICT_LEAD[(task.metric, task.lang)]
                    + (fin.get("text") or ""), "finish_reason": fin.get("finish_reason"), "forced": True,
                    "free_finish_reason": free.get("finish_reason")}
                forced += 1
    rows: list[dict[str, Any]] = []
    turns = W.collect_judgements(testset.sessions, wre_sk, final_outputs, protocol, rows)
    mt_items = M.collect_judgements(testset.questions, mt_sk, final_outputs, protocol, rows)
    if protocol == "reference":
        for row in rows:
            if row["metric"] in J.REASONED_METRICS and row.get("verdict") is not None:
                row["reasoning_words"] = J.reasoning_words(row["metric"], row.get("raw") or "",
                                                           row.get("lang", "en"), leads.get(row["id"], ""))
    return JudgeOutcome(turns, mt_items, {"judge_requests": len(outputs), "forced_verdicts": forced}, rows)


def _task_skeletons(testset: TestSet, samples: int, seed: int) -> tuple[list[W.JudgeTask], list[W.JudgeTask]]:
    """Every judge task's id and bookkeeping (shown candidate order included), without prompts (no judge
    tokenizer needed): collecting results from these, an id missing from the outputs is a prompt that could not
    fit and was never sent."""
    wre_tasks = [W.JudgeTask(W.judge_request_id(s.id, t, m, k), s.id, t, m, k, None, len(s.candidates), [],
                             W.sample_order(s, t, k, seed), s.lang)
                 for s in testset.sessions for t in range(len(s.turns)) for m in J.METRICS for k in range(samples)]
    mt_tasks = [W.JudgeTask(M.judge_request_id(q.question_id, t, k), f"q{q.question_id:04d}", t, "mtbench", k, None,
                            0, [], (), J.text_lang(q.turns[0]))
                for q in testset.questions for t in (0, 1) for k in range(samples)]
    return wre_tasks, mt_tasks


def forced_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Forced verdicts per metric (samples whose free text ended without one)."""
    out: dict[str, int] = {}
    for row in rows:
        if row.get("forced"):
            out[row["metric"]] = out.get(row["metric"], 0) + 1
    return out


def no_reasoning_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Parsed verdicts per metric with fewer than ``J.MIN_REASONING_WORDS`` words written before them."""
    out: dict[str, int] = {}
    for row in rows:
        if row.get("reasoning_words") is not None and row["reasoning_words"] < J.MIN_REASONING_WORDS:
            out[row["metric"]] = out.get(row["metric"], 0) + 1
    return out


def load_judge_templates(path: str | None) -> dict[str, dict[str, str]] | None:
    """FastChat's ``judge_prompts.jsonl`` (single-answer grading records ``single-v1`` and
    ``single-v1-multi-turn``) from a user-supplied path; ``None`` without a path (our wording of that format)."""
    if path is None:
        return None
    found: dict[str, dict[str, str]] = {}
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{path}: no MT-Bench judge prompts file (testset.mtbench_judge_prompts; FastChat's "
                                f"fastchat/llm_judge/data/judge_prompts.jsonl)")
    for _, line, obj in iter_json_lines(file):
        if not isinstance(obj, dict):
            raise ConfigError(f"{path}:{line}: not a JSON object ({obj})")
        if isinstance(obj, dict) and obj.get("name") in ("single-v1", "single-v1-multi-turn"):
            for field in ("system_prompt", "prompt_template"):
                if not isinstance(obj.get(field), str):
                    raise ConfigError(f"{path}:{line}: {obj['name']} needs a string field {field!r}")
            found[obj["name"]] = obj
    missing = {"single-v1", "single-v1-multi-turn"} - set(found)
    if missing:
        raise ConfigError(f"{path}: no judge prompt named {sorted(missing)} (FastChat's single-answer grading)")
    return found


def run_eval(cfg: EvalConfig, workdir: str | Path, models: dict[str, Any] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate every candidate (resuming whatever is on disk); returns the top-level report (``progress``:
    show progress bars).

    ``models``: a cache of loaded models (with their compiled engines) that the caller keeps across calls, e.g. to
    evaluate a seed model and its fine-tune with one judge load; without it, each model is dropped after use.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    testset = load_testset(cfg)  # a missing test set fails before anything is written
    pin_config(workdir, "config.yaml", cfg, "an evaluation")
    templates = load_judge_templates(cfg.testset.mtbench_judge_prompts) if cfg.judge.protocol == "reference" else None

    keep_loaded = models is not None
    models = {} if models is None else models

    def loaded(source: Any) -> Any:
        if is_endpoint(source):
            key = json.dumps(["endpoint", source.model_dump(mode="json"), str(workdir)])
            if key not in models:
                models[key] = EndpointModel(source, workdir / ENDPOINT_CACHE)
            return models[key]
        key = json.dumps([source.model_dump(mode="json"), cfg.engine.model_dump(mode="json")])
        if key not in models:
            models[key] = LocalModel(source, cfg.engine)
        return models[key]

    judge = loaded(cfg.judge.model)
    answers: dict[str, tuple[dict[str, str], dict[str, str], dict[str, int]]] = {}
    for cand_cfg in cfg.candidates:
        cand = loaded(cand_cfg.model)  # a candidate that is also the judge shares its loaded model
        answers[cand_cfg.name] = answer_candidate(cand_cfg, cand, cfg, testset, workdir / "runs" / cand_cfg.name,
                                                   progress)
        if not keep_loaded and cand is not judge:
            cand.release()
    rows: list[dict[str, Any]] = []
    calibration = run_calibration(cfg, judge, workdir, progress, rows)
    reports = {}
    for cand_cfg in cfg.candidates:
        run_dir = workdir / "runs" / cand_cfg.name
        wre, mt, answer_stats = answers[cand_cfg.name]
        outcome = judge_candidate(cand_cfg.name, judge, cfg, testset, wre, mt, run_dir, progress, templates)
        rows += [{"candidate": cand_cfg.name, **r} for r in outcome.rows]
        reports[cand_cfg.name] = build_report(cand_cfg, cfg, testset, outcome, answer_stats, calibration)
        write_run_report(run_dir / REPORT_JSON, reports[cand_cfg.name])
    if not keep_loaded:
        judge.release()
    atomic_write_jsonl(workdir / JUDGEMENTS, rows)
    top = dict(reports[cfg.candidates[0].name])
    top["runs"] = [c.name for c in cfg.candidates]
    write_run_report(workdir / REPORT_JSON, top)
    write_comparison(workdir, [(c.name, reports[c.name]) for c in cfg.candidates])
    return top


def run_calibration(cfg: EvalConfig, judge: Any, workdir: Path, progress: bool,
                    rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The judge on the calibration set (``WORKDIR/calibration``), through ``judge_candidate``; ``None`` when
    disabled. Appends its judgements.jsonl rows (candidate ``"calibration"``)."""
    cal = cfg.calibration
    if not cal.enabled:
        return None
    items = C.load_calibration(cal.path, cal.limit)
    sessions, answers = C.as_sessions(items)
    testset = TestSet(sessions, [], {}, {})
    outcome = judge_candidate("calibration", judge, cfg, testset, answers, {}, workdir / "calibration", progress)
    rows += [{"candidate": "calibration", **r} for r in outcome.rows]
    metrics = C.score_calibration(items, outcome.turns, cal.margin, cal.max_majority_share, outcome.rows)
    return {"items": len(items), "source": cal.path or "shipped (ditto_jax/data/assets/eval_calibration.jsonl)",
            "metrics": metrics, "reliable": all(m["reliable"] for m in metrics.values()),
            "forced": forced_counts(outcome.rows), "no_reasoning": no_reasoning_counts(outcome.rows)}


def build_report(cand_cfg: CandidateConfig, cfg: EvalConfig, testset: TestSet, outcome: JudgeOutcome,
                 answer_stats: dict[str, Any], calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """One candidate's report (see ``ditto_jax.eval.report``)."""
    jc = cfg.judge
    agg = aggregate(outcome.turns, jc.rejection_tie, jc.knowledge_turns)
    unparsable = dict(agg["unparsable"])
    mt_result = None
    if outcome.mtbench:
        mt_result, unparsable["mtbench"] = aggregate_mtbench(outcome.mtbench)
        mt_result["set"] = "mtbench" if cfg.testset.mtbench else "project"
    for metric, n in forced_counts(outcome.rows).items():
        if metric in unparsable:
            unparsable[metric]["forced"] = n
    for metric, n in no_reasoning_counts(outcome.rows).items():
        if metric in unparsable:
            unparsable[metric]["no_reasoning"] = n
    counts = {"sessions": len(testset.sessions), **agg["counts"], "mtbench_questions": len(testset.questions),
              **answer_stats, **outcome.stats, "testset": testset.stats}
    unreliable = sorted(m for m, v in ((calibration or {}).get("metrics") or {}).items() if not v["reliable"])
    return {
        "name": cand_cfg.name,
        "metrics": agg["metrics"],
        "mtbench": mt_result,
        "unparsable": unparsable,
        "calibration": calibration,
        "unreliable_metrics": unreliable,
        "counts": counts,
        "models": {"candidate": {"name": cand_cfg.name, "source": cand_cfg.model.describe()},
                   "judge": {"source": jc.model.describe(), "protocol": jc.protocol, "samples": jc.samples,
                             "temperature": jc.temperature, "constrained": jc.constrained,
                             "max_new_tokens": jc.new_tokens, "rejection_tie": jc.rejection_tie}},
        "config": cfg.model_dump(mode="json"),
    }


def compare_runs(dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """``ditto-jax eval report``: several evaluation work dirs side by side in ``out_dir``."""
    return write_comparison(out_dir, load_runs(dirs))
