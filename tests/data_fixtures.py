"""Small generated role-play sessions for the data tests (no files outside the test's tmp dir)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS_EN = "the king rode north across the river and spoke of war harvest ships letters gold".split()
WORDS_ZH = list("我是诗人喜欢月亮和酒长安城里春风不知道电脑手机")


def make_session(i: int, lang: str = "en", exchanges: int = 2, words: int = 12, seed: int = 0) -> dict:
    """A valid session record with ``exchanges`` user/assistant pairs of about ``words`` words each."""
    rng = random.Random(seed * 100_003 + i)
    pool = WORDS_EN if lang == "en" else WORDS_ZH
    sep = " " if lang == "en" else ""
    turns = []
    for k in range(exchanges):
        kind = "contrastive" if k % 2 else "role_specific"
        turns.append({"role": "user", "content": sep.join(rng.choices(pool, k=words)) + "?", "kind": kind,
                      "reject": kind == "contrastive", "evidence": ["a fact"]})
        turns.append({"role": "assistant", "content": sep.join(rng.choices(pool, k=words)) + "."})
    return {"id": f"s{i:05d}", "character": f"c{i % 7}", "lang": lang,
            "system": "You are Person, a king." if lang == "en" else "你是李白，诗人。", "turns": turns,
            "source": {"model": "test"}}


def write_jsonl(path: Path, lines: list) -> Path:
    """Write dicts as JSON lines, str/bytes verbatim."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
    return path


def corpus_lines(n: int, seed: int = 0) -> list[dict]:
    """``n`` sessions, alternating languages, 1-4 exchanges."""
    return [make_session(i, "en" if i % 3 else "zh", exchanges=1 + i % 4, words=5 + i % 11, seed=seed) for i in range(n)]
