"""Partners, evidence, session planning and assembly (labels, kinds, system prompt without the profile)."""

from __future__ import annotations

import pytest

from ditto_jax.data.characters import default_characters
from ditto_jax.data.corpus import parse_session
from ditto_jax.simulation.config import FiltersConfig, SessionsConfig
from ditto_jax.simulation.evidence import character_facts, content_tokens, select_evidence
from ditto_jax.simulation.filters import FilterCounts
from ditto_jax.simulation.partners import assign_partners, directed_pairs, distance
from ditto_jax.simulation.prompts import profile_texts
from ditto_jax.simulation.queries import build_tasks
from ditto_jax.simulation.sessions import CONTRASTIVE, ROLE_SPECIFIC, assemble_session, plan_sessions


@pytest.fixture(scope="module")
def chars():
    return [c for c in default_characters() if c.split == "train"]


def by_id(cs):
    return {c.id: c for c in cs}


@pytest.mark.parametrize("strategy", ["random", "far"])
def test_partners_are_a_deterministic_same_language_matching(chars, strategy):
    pairings = assign_partners(chars, rounds=2, strategy=strategy, seed=3)
    again = assign_partners(chars, rounds=2, strategy=strategy, seed=3)
    assert pairings == again
    assert pairings != assign_partners(chars, rounds=2, strategy=strategy, seed=4) or strategy == "far"
    ids = by_id(chars)
    for p in pairings:
        assert set(p.partner) == set(ids)
        borrowed = 0
        for a, b in p.partner.items():
            assert a != b and ids[a].lang == ids[b].lang
            borrowed += p.partner[b] != a
        assert borrowed <= 2  # one odd character per language borrows a partner
    assert pairings[0].partner != pairings[1].partner


def test_far_partners_are_further_than_random(chars):
    ids = by_id(chars)

    def mean_distance(pairings):
        d = [distance(ids[a], ids[b]) for p in pairings for a, b in p.partner.items()]
        return sum(d) / len(d)

    far = mean_distance(assign_partners(chars, 1, "far", seed=0))
    rnd = sum(mean_distance(assign_partners(chars, 1, "random", seed=s)) for s in range(5)) / 5
    assert far > rnd


def test_single_language_character_pairs_across_languages(chars):
    en = [c for c in chars if c.lang == "en"][:3]
    zh = [c for c in chars if c.lang == "zh"][:1]
    (pairing,) = assign_partners(en + zh, 1, "random", seed=0)
    assert pairing.cross_language == 1 and by_id(en)[pairing.partner[zh[0].id]].lang == "en"
    with pytest.raises(ValueError):
        assign_partners(en[:1], 1)


def test_directed_pairs_cover_both_ways(chars):
    pairings = assign_partners(chars[:5], 1, seed=1)
    pairs = directed_pairs(pairings)
    for a, b in pairings[0].partner.items():
        assert (0, a, b) in pairs and (0, b, a) in pairs
    assert pairs == sorted(set(pairs))


def test_evidence_prefers_overlapping_facts(chars):
    socrates = next(c for c in chars if c.id == "en-socrates")
    ev = select_evidence("Who was your wife Xanthippe to you?", socrates, 2)
    assert any("Xanthippe" in e for e in ev) and len(ev) <= 2
    assert select_evidence("zzz qqq", socrates, 3) == [socrates.description]
    assert select_evidence("anything", socrates, 0) == []
    assert all(f in character_facts(socrates) for f in ev)
    assert {"长城", "城和"} <= content_tokens("修长城和驰道")


def _plan(chars, order="shuffle"):
    cs = [c for c in chars if c.lang == "en"][:4] + [c for c in chars if c.lang == "zh"][:2]
    ids = by_id(cs)
    pairings = assign_partners(cs, 1, seed=0)
    tasks = {(t.round, t.asker, t.other): t for t in build_tasks(directed_pairs(pairings), ids)}
    questions = {}
    for t in tasks.values():
        if ids[t.asker].lang == "zh":
            questions[t.key] = [f"{ids[t.asker].label}，你第{i}个问题是什么？" for i in range(3)]
        else:
            questions[t.key] = [f"Question {i} for {ids[t.asker].label} about your life?" for i in range(3)]
    counts = FilterCounts()
    plans = plan_sessions(pairings, questions, tasks, ids, SessionsConfig(order=order, evidence_k=2),
                          FiltersConfig(), seed=0, counts=counts)
    return cs, ids, pairings, plans, counts


@pytest.mark.parametrize("order", ["shuffle", "interleave"])
def test_plans_label_role_specific_and_contrastive(chars, order):
    cs, ids, pairings, plans, counts = _plan(chars, order)
    assert [p.id for p in plans] == sorted(p.id for p in plans) and len(plans) == len(cs)
    for plan in plans:
        assert plan.partner == pairings[0].partner[plan.character]
        kinds = [t.kind for t in plan.turns]
        assert kinds.count(ROLE_SPECIFIC) == 3 and kinds.count(CONTRASTIVE) == 3
        for t in plan.turns:
            asker = plan.character if t.kind == ROLE_SPECIFIC else plan.partner
            assert t.reject == (t.kind == CONTRASTIVE)
            assert ids[asker].label in t.query  # role-specific from own prompt, contrastive from the partner's
            assert t.evidence_from == asker and t.source.split("/")[1] == asker
        if order == "interleave":
            assert kinds == [ROLE_SPECIFIC, CONTRASTIVE] * 3
    assert counts.as_dict()["queries.role_specific"]["kept"] == 3 * len(cs)


def test_assembled_session_is_valid_and_has_no_profile_in_system(chars):
    cs, ids, _, plans, _ = _plan(chars)
    for plan in plans:
        answers = [f"answer {i}" if i % 3 else None for i in range(len(plan.turns))]
        rec = assemble_session(plan, answers, ids[plan.character], {"supervision_model": "x"})
        session = parse_session(rec)
        c = ids[plan.character]
        assert rec["system"] == c.brief_intro()
        assert c.label in rec["system"]
        for piece in profile_texts(c):
            assert piece not in rec["system"]
        users = [t for t in rec["turns"] if t["role"] == "user"]
        kept = [t for t, a in zip(plan.turns, answers) if a is not None]
        assert [u["content"] for u in users] == [t.query for t in kept]
        assert [u["reject"] for u in users] == [t.kind == CONTRASTIVE for t in kept]
        assert all(u["evidence"] for u in users)
        assert session.lang == c.lang
    assert assemble_session(plans[0], [None] * len(plans[0].turns), ids[plans[0].character], {}) is None


def test_response_tasks_and_dialogue_history(chars):
    from ditto_jax.simulation.prompts import ProfileBudget
    from ditto_jax.simulation.responses import response_tasks, task_messages

    cs, ids, _, plans, _ = _plan(chars)
    every = response_tasks(plans)
    assert len(every) == sum(len(p.turns) for p in plans)
    assert [t.request_id for t in every] == sorted(t.request_id for t in every)
    wave = response_tasks(plans, 2)
    assert all(t.index == 2 for t in wave) and len(wave) == len(plans)
    t = wave[0]
    history = [(t.plan.turns[0].query, "first answer"), (t.plan.turns[1].query, "second answer")]
    messages = task_messages(t, ids, history, ProfileBudget())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == t.plan.turns[2].query and messages[2]["content"] == "first answer"
    assert ids[t.plan.character].label in messages[0]["content"]
    assert len(task_messages(t, ids, [], ProfileBudget())) == 2  # independent: profile + the query only
