"""``ditto-jax eval``: answer the test sessions with each candidate, judge every turn, write the reports.

Work dir layout (every stage resumable; a re-run skips finished requests and loads no model it does not need)::

    WORKDIR/config.yaml                        the config of this run (a re-run must match it)
    WORKDIR/runs/<name>/answers/t00 ...        candidate answers, one stage per turn position
    WORKDIR/runs/<name>/mtbench_answers/t0, t1
    WORKDIR/runs/<name>/judge                  every judge sample of the candidate (WikiRoleEval + MT-Bench)
    WORKDIR/runs/<name>/report.json            the candidate's report
    WORKDIR/report.json                        the first candidate's report, plus "runs" (all candidates' names)
    WORKDIR/report.md, WORKDIR/report.png      all candidates side by side

Models are loaded lazily: a candidate whose answers are all on disk is not loaded again; the judge is loaded once
for all candidates, and only when some judge output is missing.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ditto_jax.config import ConfigError, dump_config
from ditto_jax.eval import judge as J
from ditto_jax.eval import mtbench as M
from ditto_jax.eval import wikiroleeval as W
from ditto_jax.eval.config import CandidateConfig, EvalConfig
from ditto_jax.eval.metrics import aggregate, aggregate_mtbench
from ditto_jax.eval.report import REPORT_JSON, load_runs, write_comparison, write_run_report
from ditto_jax.eval.stages import run_stage
from ditto_jax.eval.testsets import EvalSession, MTBenchQuestion, load_mtbench, load_wikiroleeval
from ditto_jax.fileio import atomic_write_json, atomic_write_text
from ditto_jax.checkpoints import ModelSource

PROMPT_STATS = "prompt_stats.json"


@dataclasses.dataclass
class LoadedModel:
    """A model with its tokenizer and sampling engine (loaded on first use)."""

    source: ModelSource
    engine_kwargs: dict[str, Any]
    mesh: Any = None
    model: Any = None
    tokenizer: Any = None
    engine: Any = None

    def load(self) -> "LoadedModel":
        """Load the model and build its engine (idempotent)."""
        if self.engine is None:
            from ditto_jax.checkpoints import load_model_source
            from ditto_jax.sampling import SamplingEngine

            print(f"loading {self.source.describe()}", file=sys.stderr)
            self.model, _, self.tokenizer = load_model_source(self.source, self.mesh)
            self.engine = SamplingEngine(self.model, self.tokenizer, mesh=self.mesh, **self.engine_kwargs)
        return self

    constraints: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def constraint(self, key: Any, build: Callable[[], Any]) -> Any:
        """A decoding constraint built once per model: the engine registers constraints by identity, so reusing
        the object keeps its device tables (and compiled shapes) from growing on every stage."""
        if key not in self.constraints:
            self.constraints[key] = build()
        return self.constraints[key]

    def release(self) -> None:
        """Drop the model, engine and constraints (frees device memory before the next model loads)."""
        self.model = self.engine = None
        self.constraints.clear()
        gc.collect()


@dataclasses.dataclass(frozen=True)
class TestSet:
    """What is evaluated: sessions, MT-Bench questions, candidate descriptions and read statistics."""

    sessions: list[EvalSession]
    questions: list[MTBenchQuestion]
    descriptions: Mapping[str, str]
    stats: dict[str, Any]


def load_testset(cfg: EvalConfig) -> TestSet:
    """Load and filter the configured test sets and the knowledge base that describes the candidates."""
    from ditto_jax.data.characters import load_characters

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
    stops = sorted(set(cfg.answer.stop_token_ids) | set(tokenizer.stop_ids))
    return cfg.answer.model_copy(update={"stop_token_ids": stops})


def _text(record: Mapping[str, Any]) -> str:
    return (record.get("text") or "").strip()


def _vocab_mask(loaded: LoadedModel) -> Any:
    """A constraint keeping free text to the tokenizer's ids when the model's embedding is larger (a random-init
    model samples the extra rows, whose text cannot be decoded); ``None`` when they agree."""
    if loaded.model.cfg.vocab_size <= loaded.tokenizer.vocab_size:
        return None
    from ditto_jax.sampling import vocab_constraint

    return loaded.constraint("vocab", lambda: vocab_constraint(loaded.tokenizer, loaded.model.cfg.vocab_size))


def _answer_waves(name: str, stage_root: Path, waves: int, expected: Callable[[int], list[str]],
                  prompts: Callable[[int, dict[str, str], Any], list[W.Prompt]], cand: LoadedModel, cfg: EvalConfig,
                  stats: dict[str, int], desc: str, progress: bool = True) -> dict[str, str]:
    """Run answer waves ``0..waves-1``; each wave sees the answers of the previous ones."""
    answers: dict[str, str] = {}
    for t in range(waves):
        stage_dir = stage_root / f"t{t:02d}"

        def make_requests(pending: set[str], t: int = t, stage_dir: Path = stage_dir) -> Iterable[Any]:
            from ditto_jax.sampling import Request

            cand.load()
            budget = cfg.engine.max_len - cfg.answer.max_new_tokens
            params = _answer_params(cfg, cand.tokenizer)
            vocab_mask = _vocab_mask(cand)
            wave = prompts(t, answers, W.chat_encoder(cand.tokenizer), budget)
            # counted over the whole wave and kept on disk: a resumed run may not rebuild these prompts
            atomic_write_json(stage_dir / PROMPT_STATS, {"history_trimmed": sum(p.trimmed > 0 for p in wave)})
            return [Request(p.id, p.input_ids, params, vocab_mask) for p in wave if p.id in pending]

        records = run_stage(stage_dir, expected(t), make_requests, lambda: cand.load().engine,
                            f"{name}: {desc} turn {t + 1}/{waves}", progress=progress)
        if (stage_dir / PROMPT_STATS).exists():
            stats["history_trimmed"] += json.loads((stage_dir / PROMPT_STATS).read_text("utf-8"))["history_trimmed"]
        for rid, rec in records.items():
            answers[rid] = _text(rec)
            stats["truncated"] += int(rec.get("finish_reason") == "length")
            stats["answers"] += 1
    return answers


def answer_candidate(cand_cfg: CandidateConfig, cand: LoadedModel, cfg: EvalConfig, testset: TestSet,
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


def judge_candidate(name: str, judge: LoadedModel, cfg: EvalConfig, testset: TestSet, wre: Mapping[str, str],
                    mt: Mapping[str, str], run_dir: Path, progress: bool = True
                    ) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Judge every turn of one candidate: ``(TurnJudgements, MTBenchJudgements, stats)``."""
    from ditto_jax.sampling import Request, SamplingParams

    jc = cfg.judge
    limits = W.JudgeLimits(jc.max_answer_chars, jc.max_summary_chars, jc.max_evidence_chars)
    budget = cfg.engine.max_len - jc.max_new_tokens

    def make_requests(pending: set[str]) -> Iterable[Any]:
        judge.load()
        enc = W.chat_encoder(judge.tokenizer)
        wre_tasks = W.judge_tasks(testset.sessions, wre, testset.descriptions, enc, jc.samples, limits, budget)
        mt_tasks = M.judge_tasks(testset.questions, mt, enc, jc.samples, limits, budget)
        params = SamplingParams(temperature=jc.temperature, top_p=jc.top_p, max_new_tokens=jc.max_new_tokens,
                                stop_token_ids=sorted(judge.tokenizer.stop_ids), seed=cfg.seed)
        for task in wre_tasks + mt_tasks:
            if task.id not in pending or task.input_ids is None:
                continue
            constraint = None
            if jc.constrained:
                constraint = judge.constraint((task.metric, task.num_options), lambda task=task: J.judge_constraint(
                    task.metric, judge.tokenizer, judge.model.cfg.vocab_size, task.num_options or 4))
            yield Request(task.id, task.input_ids, params, constraint)

    outputs = run_stage(run_dir / "judge", _judge_ids(testset, jc.samples), make_requests,
                        lambda: judge.load().engine, f"{name}: judging", progress=progress)
    wre_tasks, mt_tasks = _task_skeletons(testset, jc.samples)
    return (W.collect_judgements(testset.sessions, wre_tasks, outputs),
            M.collect_judgements(testset.questions, mt_tasks, outputs), {"judge_requests": len(outputs)})


def _task_skeletons(testset: TestSet, samples: int) -> tuple[list[W.JudgeTask], list[W.JudgeTask]]:
    """Every judge task's id and bookkeeping, without prompts (no judge tokenizer needed): collecting results
    from these, an id missing from the outputs is a prompt that could not fit and was never sent."""
    wre_tasks = [W.JudgeTask(W.judge_request_id(s.id, t, m, k), s.id, t, m, k, [], len(s.candidates))
                 for s in testset.sessions for t in range(len(s.turns)) for m in J.METRICS for k in range(samples)]
    mt_tasks = [W.JudgeTask(M.judge_request_id(q.question_id, t, k), f"q{q.question_id:04d}", t, "mtbench", k, [], 0)
                for q in testset.questions for t in (0, 1) for k in range(samples)]
    return wre_tasks, mt_tasks


def _check_config(workdir: Path, cfg: EvalConfig) -> None:
    path = workdir / "config.yaml"
    text = dump_config(cfg)
    if path.exists() and path.read_text(encoding="utf-8") != text:
        raise ConfigError(f"{workdir} holds an evaluation with a different config ({path}); resume with the same "
                          f"config and overrides, or use a new --workdir")
    if not path.exists():
        atomic_write_text(path, text)


def run_eval(cfg: EvalConfig, workdir: str | Path, models: dict[str, LoadedModel] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate every candidate (resuming whatever is on disk); returns the top-level report (``progress``:
    show progress bars).

    ``models``: a cache of loaded models (with their compiled engines) that the caller keeps across calls, e.g. to
    evaluate a seed model and its fine-tune with one judge load; without it, each model is dropped after use.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_config(workdir, cfg)
    testset = load_testset(cfg)
    from ditto_jax.mesh import make_mesh

    engine = cfg.engine
    engine_kwargs = {"batch_size": engine.batch_size, "max_len": engine.max_len,
                     "min_bucket": min(engine.min_bucket, engine.max_len), "chunk": engine.chunk}
    keep_loaded = models is not None
    models = {} if models is None else models
    mesh: list[Any] = []

    def loaded(source: ModelSource) -> LoadedModel:
        key = json.dumps([source.model_dump(mode="json"), engine_kwargs,
                          None if engine.mesh is None else engine.mesh.model_dump(mode="json")])
        if key not in models:
            if not mesh:
                mesh.append(None if engine.mesh is None else make_mesh(engine.mesh))
            models[key] = LoadedModel(source, engine_kwargs, mesh[0])
        return models[key]

    judge = loaded(cfg.judge.model)
    answers: dict[str, tuple[dict[str, str], dict[str, str], dict[str, int]]] = {}
    for cand_cfg in cfg.candidates:
        cand = loaded(cand_cfg.model)  # a candidate that is also the judge shares its loaded model
        answers[cand_cfg.name] = answer_candidate(cand_cfg, cand, cfg, testset, workdir / "runs" / cand_cfg.name,
                                                   progress)
        if not keep_loaded and cand is not judge:
            cand.release()
    reports = {}
    for cand_cfg in cfg.candidates:
        run_dir = workdir / "runs" / cand_cfg.name
        wre, mt, answer_stats = answers[cand_cfg.name]
        turns, mt_items, judge_stats = judge_candidate(cand_cfg.name, judge, cfg, testset, wre, mt, run_dir,
                                                         progress)
        reports[cand_cfg.name] = build_report(cand_cfg, cfg, testset, turns, mt_items, answer_stats | judge_stats)
        write_run_report(run_dir / REPORT_JSON, reports[cand_cfg.name])
    if not keep_loaded:
        judge.release()
    top = dict(reports[cfg.candidates[0].name])
    top["runs"] = [c.name for c in cfg.candidates]
    write_run_report(workdir / REPORT_JSON, top)
    write_comparison(workdir, [(c.name, reports[c.name]) for c in cfg.candidates])
    return top


def build_report(cand_cfg: CandidateConfig, cfg: EvalConfig, testset: TestSet, turns: Sequence[Any],
                 mt_items: Sequence[Any], stats: dict[str, Any]) -> dict[str, Any]:
    """One candidate's report (see ``ditto_jax.eval.report``)."""
    jc = cfg.judge
    agg = aggregate(turns, jc.rejection_tie, jc.knowledge_turns)
    unparsable = dict(agg["unparsable"])
    mt_result = None
    if mt_items:
        mt_result, unparsable["mtbench"] = aggregate_mtbench(mt_items)
    counts = {"sessions": len(testset.sessions), **agg["counts"], "mtbench_questions": len(testset.questions),
              **stats, "testset": testset.stats}
    return {
        "name": cand_cfg.name,
        "metrics": agg["metrics"],
        "mtbench": mt_result,
        "unparsable": unparsable,
        "counts": counts,
        "models": {"candidate": {"name": cand_cfg.name, "source": cand_cfg.model.describe()},
                   "judge": {"source": jc.model.describe(), "samples": jc.samples, "temperature": jc.temperature,
                             "constrained": jc.constrained, "rejection_tie": jc.rejection_tie}},
        "config": cfg.model_dump(mode="json"),
    }


def compare_runs(dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """``ditto-jax eval report``: several evaluation work dirs side by side in ``out_dir``."""
    return write_comparison(out_dir, load_runs(dirs))
