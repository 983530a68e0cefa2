"""Ditto self-simulation (arXiv:2401.12474 §3.3, Algorithm 1): the supervision model writes its own role-play data.

Files, in pipeline order:
- ``config``: the ``ditto-jax simulate`` schema (supervision and seed models, stages, filters, engine);
- ``partners``: who contrasts with whom (random as in the paper, or far in era/domain), a matching per round;
- ``prompts``: profiles and the EN/ZH prompts for query and response simulation;
- ``queries``: directed-pair tasks, the JSON schema that constrains decoding, parsing;
- ``evidence``: profile facts a query draws on (lexical overlap), for knowledge judging;
- ``sessions``: turn plans (role-specific vs contrastive, rejection labels) and the SFT record;
- ``responses``: answer tasks, independent or with the dialogue so far;
- ``filters``: format, length, duplicates, character breaks, language, over-long (each counted);
- ``backend``: the supervision model, engine and sampling-runner calls of one process;
- ``stages``: the resumable, exactly-once pipeline over ``WORKDIR`` (``Simulation``);
- ``report``: counts per stage and filter, corpus by language and kind, samples.

``Simulation(cfg, workdir).run()`` is what ``ditto-jax simulate`` calls.
"""
