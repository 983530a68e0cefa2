"""The command line: every command and sub-command prints its help (argparse formats help lazily, so a stray
``%`` in a help string only fails when someone asks for help)."""

from __future__ import annotations

import argparse
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
