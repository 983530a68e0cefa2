"""``ditto-jax chat --model SRC --character ID_OR_NAME``: role-play with a knowledge-base character in the terminal.

The character's brief intro is the system prompt (as at SFT time); replies stream as they are generated.
Commands: /reset (new conversation), /character ID_OR_NAME (switch role), /quit (or end of input).
"""

from __future__ import annotations

import argparse
import sys

from ditto_jax.commands.serve import add_model_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``chat``."""
    p = subparsers.add_parser("chat", help="role-play with a knowledge-base character in the terminal",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--character", required=True, help="character id, name or alias")
    p.add_argument("--characters", default=None, help="knowledge-base JSONL (default: the embedded one)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.8, help="the paper's 0.8")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="the paper's 1.1")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run, batch_size=1)


def run(args: argparse.Namespace) -> int:
    """Read lines from stdin, stream the character's replies to stdout."""
    from ditto_jax.commands.serve import engine_from_args
    from ditto_jax.config import ConfigError
    from ditto_jax.data.characters import load_characters
    from ditto_jax.sampling import SamplingParams
    from ditto_jax.serve.chat import ChatSession, find_character

    characters = load_characters(args.characters)
    find_character(characters, args.character)  # a bad name fails before the model loads
    loaded, _ = engine_from_args(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    session = ChatSession(loaded.engine, loaded.tokenizer, characters, args.character, params, loaded.config.max_len)
    interactive = sys.stdin.isatty()

    def banner() -> None:
        c = session.character
        print(f"[{c.label}] {session.messages[0]['content']}  (/reset, /character NAME, /quit)", flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    banner()
    while True:
        if interactive:
            write("you> ")
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            print("[conversation reset]", flush=True)
            continue
        if line.startswith("/character"):
            try:
                session.switch(line[len("/character"):].strip())
            except ConfigError as exc:
                print(f"error: {exc}", flush=True)
                continue
            banner()
            continue
        write(f"{session.character.label}> ")
        session.reply(line, write)
        write("\n")
    return 0
