"""The command line: every command and sub-command prints its help (argparse formats help lazily, so a stray
``%`` in a help string only fails when someone asks for help)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from ditto_jax.cli import COMMANDS, build_parser, main


def _subcommand_paths(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
    paths = []
    for action in parser._actions:  # argparse exposes no public walk over sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths.append(prefix + [name])
                paths.extend(_subcommand_paths(child, prefix + [name]))
    return paths


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_and_subcommand_prints_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser([command])
    paths = [p for p in _subcommand_paths(parser, []) if p[0] == command]
    assert paths, command
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main(path + ["--help"])
        assert exit_info.value.code == 0, path
        assert "usage: ditto-jax " + " ".join(path) in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("argv", [
    ["demo", "--workdir", "gs://bucket/run"],
    ["sample", "--out", "s3://bucket/out", "--prompts", "p.jsonl"],
    ["eval", "--workdir", "gs://bucket/eval"],
    ["train", "--workdir", "gs://bucket/sft", "--config", "sft/tiny"],
])
def test_object_store_output_folders_are_refused_by_name(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert argv[2] in err and "object-store URLs are not supported" in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_command_imports_no_jax(command: str) -> None:
    # a fresh interpreter: this one has imported JAX already
    code = ("import sys\nfrom ditto_jax.cli import main\ntry:\n    main([%r, '--help'])\nexcept SystemExit:\n    pass\n"
            "print('JAX' if 'jax' in sys.modules else 'no JAX')" % command)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "no JAX"


_EXIT_PROBE = """
import atexit, os, sys, threading, time
import ditto_jax.cli as cli
out = sys.argv[1]

class Finalised:
    def __del__(self, path=os.path.join(out, "teardown"), opener=os.open, closer=os.close, flags=os.O_CREAT | os.O_WRONLY):
        closer(opener(path, flags))  # the module's globals may be gone by then: everything comes bound

keep = Finalised()  # collected only by the interpreter's teardown

def command(argv=None):
    atexit.register(lambda: open(os.path.join(out, "atexit"), "w").close())
    def late():
        time.sleep(0.3)
        open(os.path.join(out, "thread"), "w").close()
    threading.Thread(target=late).start()  # not a daemon: the exit waits for it
    sys.stdout.write("x" * 200000)  # buffered when piped: flushed before the exit
    return 3

cli.main = command
sys.argv = ["ditto-jax"]
cli.run()
"""


@pytest.mark.parametrize("full", ["0", "1"])
def test_the_program_exits_without_teardown_but_keeps_code_output_threads_and_atexit(tmp_path, full):
    """``ditto-jax`` (``cli.run``) skips the interpreter's teardown after the command: the exit code, the whole
    standard output, non-daemon threads and atexit handlers registered by the command are kept; an object that
    only the teardown would finalise is not (``DITTO_JAX_FULL_EXIT=1``: it is)."""
    env = {**os.environ, "DITTO_JAX_FULL_EXIT": full}
    proc = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "x" * 200000
    assert (tmp_path / "atexit").exists() and (tmp_path / "thread").exists()
    assert (tmp_path / "teardown").exists() == (full == "1")


def test_the_program_keeps_argparse_and_error_exit_codes(tmp_path):
    run = [sys.executable, "-m", "ditto_jax.cli"]
    assert subprocess.run([*run, "sample", "--bogus"], capture_output=True).returncode == 2
    proc = subprocess.run([*run, "characters", "validate", str(tmp_path / "missing.jsonl")], capture_output=True,
                          text=True)
    assert proc.returncode == main(["characters", "validate", str(tmp_path / "missing.jsonl")]) != 0
    assert "missing.jsonl" in proc.stderr
