"""Evaluation: WikiRoleEval-style judged metrics (consistency, knowledge, rejection) and MT-Bench roleplay.

Modules (imported on use; nothing heavy is loaded here):

* ``config``: the ``ditto-jax eval`` schema (``EvalConfig``).
* ``testsets``: WikiRoleEval (ours and the Ditto release layout) and MT-Bench ``question.jsonl`` loaders.
* ``judge``: judge prompts (EN/ZH) of the reference protocol (OFA-Sys/Ditto's judge) and the terse one, verdict
  constraints and parsers.
* ``calibration``: the judge on a labelled set first; chance-level or constant judges flagged.
* ``wikiroleeval`` / ``mtbench``: answer and judge requests; judge outputs -> per-turn judgements.
* ``metrics``: the metric math (majority vote with a tie rule, unparsable counts, language splits).
* ``stages``: resumable, exactly-once stages over the sampling runner.
* ``pipeline``: ``run_eval(cfg, workdir)`` — answer, judge, report.
* ``report``: ``report.json`` / ``report.md`` / ``report.png``; runs side by side.
* ``builder``: ``build_testset`` — a WikiRoleEval set from held-out roles via the simulation.
"""
