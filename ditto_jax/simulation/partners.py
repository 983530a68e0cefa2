"""Partner selection for query simulation: who is character A's contrast B.

Partners form a matching per round (A's partner is B and B's partner is A), so the two directed prompts
(A, B) and (B, A) give both characters their role-specific queries and their contrastive ones. With an odd
number of characters in a pool the one left over borrows a partner from a pair (that partner then appears in
two directed pairs of the round). ``random`` is the paper's choice; ``far`` greedily matches each character with
the available one furthest away in era, domain and category. Everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class Pairing:
    """One round's partner assignment: ``partner[id]`` for every character; ``cross_language`` pairs counted."""

    round: int
    partner: dict[str, str]
    cross_language: int = 0


def seeded_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded by a stable hash of ``parts`` (independent of Python's hash randomisation)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _midpoint(character: Any) -> float | None:
    era = getattr(character, "era", None)
    if era is None:
        return None
    years = [y for y in (getattr(era, "start", None), getattr(era, "end", None)) if y is not None]
    return sum(years) / len(years) if years else None


def distance(a: Any, b: Any) -> float:
    """How far apart two characters are: era (years, capped at 500 -> 1.0, or period names), domain, category."""
    ma, mb = _midpoint(a), _midpoint(b)
    if ma is not None and mb is not None:
        era = min(abs(ma - mb) / 500.0, 1.0)
    else:
        pa = getattr(getattr(a, "era", None), "period", None)
        pb = getattr(getattr(b, "era", None), "period", None)
        era = 0.5 if (pa is None or pb is None) else float(pa.strip().lower() != pb.strip().lower())
    da, db = getattr(a, "domain", None), getattr(b, "domain", None)
    dom = 0.5 if (da is None or db is None) else float(da.strip().lower() != db.strip().lower())
    cat = float(getattr(a, "category", None) != getattr(b, "category", None))
    return era + dom + 0.5 * cat


def _match_random(ids: list[str], rng: random.Random) -> dict[str, str]:
    order = sorted(ids)
    rng.shuffle(order)
    partner: dict[str, str] = {}
    for i in range(0, len(order) - 1, 2):
        partner[order[i]], partner[order[i + 1]] = order[i + 1], order[i]
    if len(order) % 2:
        partner[order[-1]] = rng.choice(order[:-1])
    return partner


def _match_far(chars: dict[str, Any], rng: random.Random, used: set[tuple[str, str]]) -> dict[str, str]:
    order = sorted(chars)
    rng.shuffle(order)
    tiebreak = {cid: i for i, cid in enumerate(order)}
    partner: dict[str, str] = {}
    for a in order:
        if a in partner:
            continue
        free = [b for b in order if b != a and b not in partner]
        if not free:  # odd one out: borrow the furthest character overall
            free = [b for b in order if b != a]
            partner[a] = max(free, key=lambda b: (distance(chars[a], chars[b]), -tiebreak[b]))
            break
        # prefer pairs not used in earlier rounds, then the largest distance, then the seeded order
        best = max(free, key=lambda b: ((a, b) not in used, distance(chars[a], chars[b]), -tiebreak[b]))
        partner[a], partner[best] = best, a
    return partner


def assign_partners(characters: Sequence[Any], rounds: int, strategy: str = "random", seed: int = 0,
                    same_language: bool = True) -> list[Pairing]:
    """Partners for every character in each of ``rounds`` rounds (deterministic in ``seed``).

    With ``same_language`` characters are matched within their language; a language with a single character
    is matched across languages (counted in ``Pairing.cross_language``).
    """
    if len(characters) < 2:
        raise ValueError(f"query simulation needs at least 2 characters, got {len(characters)}")
    by_id = {c.id: c for c in characters}
    if len(by_id) != len(characters):
        raise ValueError("character ids must be unique")
    pools: dict[str, list[str]] = {}
    for c in characters:
        pools.setdefault(c.lang if same_language else "*", []).append(c.id)
    singles = sorted(ids[0] for ids in pools.values() if len(ids) == 1)
    pools = {k: v for k, v in pools.items() if len(v) > 1}
    used: set[tuple[str, str]] = set()
    out: list[Pairing] = []
    for r in range(rounds):
        partner: dict[str, str] = {}
        for key in sorted(pools):
            rng = seeded_rng("partners", seed, r, key, strategy)
            if strategy == "far":
                partner.update(_match_far({i: by_id[i] for i in pools[key]}, rng, used))
            elif strategy == "random":
                partner.update(_match_random(pools[key], rng))
            else:
                raise ValueError(f"unknown partner strategy {strategy!r} (random | far)")
        cross = 0
        for cid in singles:
            others = sorted(i for i in by_id if i != cid)
            rng = seeded_rng("partners-single", seed, r, cid)
            partner[cid] = (max(others, key=lambda b: (distance(by_id[cid], by_id[b]), b))
                            if strategy == "far" else rng.choice(others))
            cross += 1
        used |= {(a, b) for a, b in partner.items()}
        out.append(Pairing(round=r, partner=dict(sorted(partner.items())), cross_language=cross))
    return out


def directed_pairs(pairings: Sequence[Pairing]) -> list[tuple[int, str, str]]:
    """Every (round, asker, other) query prompt needed: both directions of each pair, sorted, no repeats."""
    pairs = set()
    for p in pairings:
        for a, b in p.partner.items():
            pairs.add((p.round, a, b))
            pairs.add((p.round, b, a))
    return sorted(pairs)
