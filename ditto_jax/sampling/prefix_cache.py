"""Host-side index of the prefix cache: which prompt prefixes have their keys/values in the device pool.

The pool (``Sampler.pool``) is ``rows`` rows of ``row_tokens`` tokens of KV for every layer. A prompt is cut into
blocks of ``block`` tokens; block ``j`` is named by a chained hash of blocks ``0..j`` (so a name stands for the
whole prefix up to it). A pooled row holds one prefix; every block boundary inside it is indexed, so any prompt
sharing at least one block with it reuses the shared part. Hits are verified token by token (no hash collision
can serve wrong keys/values). A prompt always keeps at least one token out of the prefix (its logits are needed).

Which prefixes are pooled: those shared by at least two requests (in the batch being admitted, among the next
queued ones — the engine's ``lookahead`` — or seen before in this engine's life): a prompt that shares nothing
costs nothing extra, and the first prompt of a group already pools the prefix the others will reuse. Rows are
evicted least recently used, never while the batch being admitted reads them. Counters: ``lookups``, ``hits``,
``tokens_saved`` (prompt tokens not recomputed), ``inserted``, ``evicted``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence


@dataclasses.dataclass
class PrefixStats:
    """Prefix-cache counters of one engine."""

    lookups: int = 0  # prompts admitted while the cache was on
    hits: int = 0  # prompts that reused a pooled prefix
    tokens_saved: int = 0  # prompt tokens served from the pool instead of recomputed
    prompt_tokens: int = 0  # prompt tokens of all looked-up prompts
    inserted: int = 0  # prefixes computed into the pool
    inserted_tokens: int = 0
    evicted: int = 0

    def to_json(self) -> dict[str, float | int]:
        """Counters plus ``hit_rate`` (hits / lookups) and ``token_hit_rate`` (tokens_saved / prompt tokens)."""
        out: dict[str, float | int] = dataclasses.asdict(self)
        out["hit_rate"] = round(self.hits / self.lookups, 4) if self.lookups else 0.0
        out["token_hit_rate"] = round(self.tokens_saved / self.prompt_tokens, 4) if self.prompt_tokens else 0.0
        return out


@dataclasses.dataclass
class _Row:
    tokens: tuple[int, ...]  # the pooled prefix
    names: list[int]  # block names indexed for this row


class PrefixIndex:
    """Which prefixes the ``rows`` x ``row_tokens`` pool holds (see the module docstring)."""

    def __init__(self, rows: int, row_tokens: int, block: int = 16, seen_limit: int = 1 << 16):
        if rows < 1 or row_tokens < block or block < 1:
            raise ValueError(f"prefix cache: rows={rows}, row_tokens={row_tokens}, block={block} leave no room")
        self.rows, self.row_tokens, self.block = rows, row_tokens, block
        self._rows: dict[int, _Row] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # row ids, least recent first
        self._names: dict[int, tuple[int, int]] = {}  # block name -> (row, prefix length)
        self._seen: collections.OrderedDict[int, int] = collections.OrderedDict()  # block name -> requests
        self._seen_limit = seen_limit
        self.stats = PrefixStats()

    def names(self, ids: Sequence[int]) -> list[int]:
        """Chained names of the prompt's full blocks that leave at least one token out (``len - 1`` tokens)."""
        out, h = [], 0
        usable = min(len(ids) - 1, self.row_tokens)
        for j in range(usable // self.block):
            h = hash((h, tuple(int(t) for t in ids[j * self.block:(j + 1) * self.block])))
            out.append(h)
        return out

    def lookup(self, ids: Sequence[int], names: list[int]) -> tuple[int, int]:
        """``(row, length)`` of the longest pooled prefix of ``ids`` (``(-1, 0)``: none); not counted."""
        for j in range(len(names), 0, -1):
            hit = self._names.get(names[j - 1])
            if hit is not None:
                row, length = hit
                if tuple(int(t) for t in ids[:length]) == self._rows[row].tokens[:length]:
                    return row, length
        return -1, 0

    def seen_count(self, name: int) -> int:
        """Requests seen before whose prompt had this block name."""
        return self._seen.get(name, 0)

    def note_seen(self, names: list[int]) -> None:
        """Count one more request for each of its block names (bounded memory: the oldest names are dropped)."""
        for h in names:
            self._seen[h] = self._seen.get(h, 0) + 1
            self._seen.move_to_end(h)
        while len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)

    def touch(self, row: int) -> None:
        """Mark a row as just used."""
        self._lru.move_to_end(row)

    def allocate(self, tokens: Sequence[int], pinned: set[int]) -> int:
        """A row for the prefix ``tokens`` (a whole number of blocks), evicting the least recently used unpinned
        row when full; -1 when every row is pinned. The caller then fills the row on device."""
        if len(self._rows) < self.rows:
            row = next(r for r in range(self.rows) if r not in self._rows)
        else:
            row = next((r for r in self._lru if r not in pinned), -1)
            if row < 0:
                return -1
            self._drop(row)
            self.stats.evicted += 1
        tokens = tuple(int(t) for t in tokens)
        names = self.names(tokens + (0,))  # every block of the prefix
        self._rows[row] = _Row(tokens, names)
        for j, h in enumerate(names):
            self._names[h] = (row, (j + 1) * self.block)
        self._lru[row] = None
        self._lru.move_to_end(row)
        self.stats.inserted += 1
        self.stats.inserted_tokens += len(tokens)
        return row

    def _drop(self, row: int) -> None:
        entry = self._rows.pop(row)
        for h in entry.names:
            if self._names.get(h, (None,))[0] == row:
                del self._names[h]
        self._lru.pop(row, None)

    def clear(self) -> None:
        """Forget every pooled prefix (the pool's contents become unreachable)."""
        for row in list(self._rows):
            self._drop(row)
