"""Constrained decoding: a regex or JSON schema compiled (by outlines-core) into dense device tables.

``regex_constraint(pattern, tokenizer)`` builds the token automaton with ``outlines_core.Index`` over the
tokenizer's byte vocabulary, then compresses it: tokens that behave identically in every state (same next
state everywhere, or disallowed everywhere) form one *token class*, so the table is ``next_state [S, C]``
(``-1`` = not allowed) plus ``token_class [V]``, instead of ``states x vocab``. A JSON-array-of-3-questions
schema over a 32k vocabulary has a few hundred states and a few dozen classes. The decode loop looks the
mask up with two gathers and stays inside jit; every row carries its own automaton state.

The end-of-sequence token is allowed exactly in accepting states, and ends the row (it is always a stop
token for a constrained row), so a constrained output that stops on its own always matches the pattern.
Bound: ``states * classes`` must stay under ``MAX_TABLE_ENTRIES`` (an error names the pattern otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np
from outlines_core import Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema

MAX_TABLE_ENTRIES = 64 * 1024 * 1024
# Smallest table capacities: the usual constraints (a JSON schema, a few choices) fit without a recompilation.
MIN_STATES, MIN_CLASSES, MIN_CONSTRAINTS = 1024, 64, 8


@dataclasses.dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled token automaton: ``next_state [S, C]`` (-1 = disallowed), ``token_class [V]``, start state."""

    pattern: str
    initial_state: int
    next_state: np.ndarray
    token_class: np.ndarray
    eos_id: int

    @property
    def num_states(self) -> int:
        """Number of automaton states."""
        return int(self.next_state.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of token classes."""
        return int(self.next_state.shape[1])

    def allowed(self, state: int) -> np.ndarray:
        """Boolean mask over the vocabulary of tokens allowed in ``state`` (host-side, for tests and debugging)."""
        return self.next_state[state][self.token_class] >= 0

    def advance(self, state: int, token: int) -> int:
        """Next state after ``token`` (-1 if the token is not allowed)."""
        return int(self.next_state[state, self.token_class[token]])


def _byte_vocabulary(tokenizer: Any, vocab_size: int) -> dict[bytes, list[int]]:
    special = set(getattr(tokenizer, "special_ids", ()) or ())
    special.add(tokenizer.eos_id)
    vocab: dict[bytes, list[int]] = {}
    all_bytes = tokenizer.vocab_bytes() if hasattr(tokenizer, "vocab_bytes") else None
    for tid in range(min(vocab_size, tokenizer.vocab_size)):
        if tid in special:
            continue
        b = all_bytes[tid] if all_bytes is not None else tokenizer.token_bytes(tid)
        if b:
            vocab.setdefault(bytes(b), []).append(tid)
    return vocab


def _compress(transitions: dict[int, dict[int, int]], initial: int, vocab_size: int, eos_id: int,
              pattern: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Renumber states 0..S-1 and group tokens into classes by partition refinement (exact, no hashing)."""
    states = sorted(set(transitions) | {initial} | {n for t in transitions.values() for n in t.values()})
    index = {s: i for i, s in enumerate(states)}
    num_states = len(states)
    token_class = np.zeros(vocab_size, np.int64)
    for s in states:
        nxt = np.full(vocab_size, -1, np.int64)
        row = transitions.get(s, {})
        if row:
            ids = np.fromiter(row.keys(), np.int64, len(row))
            keep = ids < vocab_size
            nxt[ids[keep]] = np.fromiter((index[n] for n in row.values()), np.int64, len(row))[keep]
        key = token_class * (num_states + 1) + (nxt + 1)
        _, token_class = np.unique(key, return_inverse=True)
    num_classes = int(token_class.max()) + 1
    if num_states * num_classes > MAX_TABLE_ENTRIES:
        raise ValueError(f"constraint {pattern[:80]!r}: table {num_states} states x {num_classes} token classes "
                         f"exceeds {MAX_TABLE_ENTRIES} entries; simplify the pattern")
    reps = np.zeros(num_classes, np.int64)
    reps[token_class[::-1]] = np.arange(vocab_size)[::-1]  # first token of each class
    next_state = np.full((num_states, num_classes), -1, np.int32)
    for s in states:
        row = transitions.get(s, {})
        for c, tok in enumerate(reps):
            n = row.get(int(tok))
            if n is not None:
                next_state[index[s], c] = index[n]
    # A state with no way out (should not happen with outlines) may still end the sequence.
    dead = (next_state < 0).all(axis=1)
    if dead.any() and eos_id < vocab_size:
        next_state[dead, token_class[eos_id]] = np.nonzero(dead)[0]
    return index[initial], next_state, token_class.astype(np.int32)


def regex_constraint(pattern: str, tokenizer: Any, vocab_size: int | None = None) -> Constraint:
    """Constrain the output to match ``pattern`` (full match), then end-of-sequence.

    ``vocab_size`` is the model's vocabulary (default: the tokenizer's); ids beyond the tokenizer are never allowed.
    """

    vocab_size = vocab_size or tokenizer.vocab_size
    eos = int(tokenizer.eos_id)
    try:
        index = Index(pattern, Vocabulary(eos, _byte_vocabulary(tokenizer, vocab_size)))
    except Exception as exc:  # outlines raises its own error types
        raise ValueError(f"cannot build a token automaton for pattern {pattern[:200]!r}: {exc}") from exc
    initial, next_state, token_class = _compress(index.get_transitions(), index.get_initial_state(), vocab_size,
                                                 eos, pattern)
    return Constraint(pattern=pattern, initial_state=initial, next_state=next_state, token_class=token_class, eos_id=eos)


def vocab_constraint(tokenizer: Any, vocab_size: int) -> Constraint:
    """A one-state automaton allowing every tokenizer id (special tokens included) and no id beyond it.

    A model's embedding is often larger than its tokenizer (Qwen2.5: 152,064 rows, 151,665 tokens; our 40M
    preset: 32,000 rows, the embedded tokenizer 2,048). A trained model never samples the extra ids, a
    random-init one does and its text cannot be decoded; this mask rules them out. Every state accepts, so the
    row still ends on the usual stop tokens or ``max_new_tokens``.
    """
    token_class = np.zeros(vocab_size, np.int32)
    token_class[tokenizer.vocab_size:] = 1
    return Constraint(pattern=f"<tokenizer ids < {tokenizer.vocab_size}>", initial_state=0,
                      next_state=np.array([[0, -1]], np.int32), token_class=token_class, eos_id=int(tokenizer.eos_id))


def json_schema_regex(schema: dict[str, Any] | str, whitespace: str = r"[ ]?") -> str:
    """The regex outlines-core derives from a JSON schema (compact whitespace by default)."""

    text = schema if isinstance(schema, str) else json.dumps(schema)
    return build_regex_from_schema(text, whitespace)


def json_schema_constraint(schema: dict[str, Any] | str, tokenizer: Any, vocab_size: int | None = None,
                           whitespace: str = r"[ ]?") -> Constraint:
    """Constrain the output to a JSON document valid under ``schema`` (bounded strings keep tables small)."""
    return regex_constraint(json_schema_regex(schema, whitespace), tokenizer, vocab_size)


def choice_constraint(options: list[str], tokenizer: Any, vocab_size: int | None = None) -> Constraint:
    """Exactly one of ``options`` (e.g. ``["A", "B", "C", "D"]`` for the judge's multiple choice)."""

    return regex_constraint("(" + "|".join(re.escape(o) for o in options) + ")", tokenizer, vocab_size)


def integer_constraint(low: int, high: int, tokenizer: Any, vocab_size: int | None = None) -> Constraint:
    """A decimal integer in ``[low, high]`` (e.g. a 1-10 score, or 0/1)."""
    return regex_constraint("(" + "|".join(str(i) for i in range(low, high + 1)) + ")", tokenizer, vocab_size)


@dataclasses.dataclass
class ConstraintTables:
    """All constraints of an engine stacked for the device: global state ids (each constraint's states at an
    offset), ``next_state [S_cap, C_cap]`` and ``token_class [N_cap, V]``, padded to power-of-two capacities
    (at least ``MIN_*``) so adding a constraint recompiles only when a capacity doubles."""

    vocab_size: int
    constraints: list[Constraint] = dataclasses.field(default_factory=list)
    offsets: list[int] = dataclasses.field(default_factory=list)
    _by_id: dict[int, int] = dataclasses.field(default_factory=dict)

    def register(self, constraint: Constraint) -> tuple[int, int]:
        """Add ``constraint`` (once); returns ``(constraint index, global initial state)``."""
        key = id(constraint)
        if key not in self._by_id:
            if constraint.token_class.shape[0] != self.vocab_size:
                raise ValueError(f"constraint built for vocab {constraint.token_class.shape[0]}, engine vocab "
                                 f"{self.vocab_size}: pass vocab_size=model vocab to the constraint builder")
            self._by_id[key] = len(self.constraints)
            self.offsets.append(sum(c.num_states for c in self.constraints))
            self.constraints.append(constraint)
        i = self._by_id[key]
        return i, self.offsets[i] + constraint.initial_state

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(next_state [S_cap, C_cap] int32 with global ids, token_class [N_cap, V] int32)``."""
        total_states = sum(c.num_states for c in self.constraints)
        max_classes = max((c.num_classes for c in self.constraints), default=1)
        s_cap, c_cap, n_cap = (max(_pow2(total_states), MIN_STATES), max(_pow2(max_classes), MIN_CLASSES),
                               max(_pow2(len(self.constraints)), MIN_CONSTRAINTS))
        next_state = np.full((s_cap, c_cap), -1, np.int32)
        token_class = np.zeros((n_cap, self.vocab_size), np.int32)
        for i, (c, off) in enumerate(zip(self.constraints, self.offsets)):
            ns = c.next_state
            next_state[off:off + c.num_states, :c.num_classes] = np.where(ns >= 0, ns + off, -1)
            token_class[i] = c.token_class
        return next_state, token_class


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
