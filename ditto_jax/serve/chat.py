"""A role-play conversation in the terminal with a knowledge-base character (``ditto-jax chat``).

The system prompt is the character's brief intro, exactly as at SFT time (``Character.brief_intro``: the paper
drops the profile). Tokens stream as they are produced (the engine's incremental API). Commands: ``/reset``
(forget the conversation), ``/character ID_OR_NAME`` (switch role, conversation reset), ``/quit``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from ditto_jax.config import ConfigError
from ditto_jax.sampling import Request, SamplingParams
from ditto_jax.serve.app import TextStream


def find_character(characters: Sequence[Any], key: str) -> Any:
    """A character by id, label or alias (case-insensitive); a clear error listing near matches otherwise."""
    folded = key.strip().casefold()
    for c in characters:
        if folded == c.id.casefold():
            return c
    for c in characters:
        if folded in (n.casefold() for n in (c.label, *c.aliases)):
            return c
    near = [c.label for c in characters if folded and folded in c.label.casefold()][:5]
    hint = f" (did you mean: {', '.join(near)}?)" if near else " (`ditto-jax characters` lists them)"
    raise ConfigError(f"no character {key!r} in the knowledge base{hint}")


class ChatSession:
    """One conversation: the character, the messages so far, and a streamed reply per user turn."""

    def __init__(self, engine: Any, tokenizer: Any, characters: Sequence[Any], character: str,
                 params: SamplingParams, max_len: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.characters = characters
        self.params = params.model_copy(update={"stop_token_ids": sorted(set(params.stop_token_ids)
                                                                         | set(tokenizer.stop_ids))})
        self.max_len = max_len
        self.turns = 0
        self.character = find_character(characters, character)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.character.brief_intro()}]

    def switch(self, key: str) -> None:
        """Play another character (conversation reset)."""
        self.character = find_character(self.characters, key)
        self.reset()

    def reply(self, user: str, write: Callable[[str], None]) -> str:
        """Stream the character's answer to ``user`` through ``write``; returns it (kept in the history). The
        oldest exchanges are dropped when the conversation no longer fits."""
        self.messages.append({"role": "user", "content": user})
        while True:
            ids = self.tokenizer.encode_chat(self.messages, add_generation_prompt=True)[0]
            if len(ids) + 16 <= self.max_len or len(self.messages) <= 2:
                break
            del self.messages[1:3]
        room = self.max_len - len(ids)
        if room < 1:
            self.messages.pop()
            raise ConfigError(f"the message is {len(ids)} tokens; the model holds {self.max_len}")
        params = self.params.model_copy(update={"max_new_tokens": min(self.params.max_new_tokens, room)})
        self.turns += 1
        stream = TextStream(self.tokenizer, params.stop_strings)
        lock = threading.Lock()

        def on_token(_: str, new_ids: list[int]) -> None:
            with lock:
                delta = stream.add(new_ids)
            if delta:
                write(delta)

        rid = f"chat-{self.turns}"
        self.engine.submit(Request(rid, ids, params), on_token=on_token)
        result = None
        while result is None:
            for done in self.engine.step():
                if done.id == rid:
                    result = done
        text = result.text or ""
        rest = stream.finish(text)
        if rest:
            write(rest)
        self.messages.append({"role": "assistant", "content": text})
        return text
