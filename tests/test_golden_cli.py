"""Golden test of the command line's flags: every long flag of ``dip-ext prune``, ``eval`` and ``info`` that exists
today keeps existing, keeps appearing in its ``--help`` and keeps accepting an example value.

When the CLI is regenerated from configuration dataclasses, existing scripts must keep working: the flags in
``tests/golden/cli_flags.json`` must stay a SUBSET of the CLI's flags (new flags may be added freely). That
file is edited by hand: drop a flag from it only when removing the flag from the CLI on purpose.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from dip_ext.cli import build_parser, main

GOLDEN = json.loads((Path(__file__).parent / "golden" / "cli_flags.json").read_text())["commands"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def long_flags(command: str) -> set[str]:
    """The long option strings ``build_parser()`` gives ``command`` (``--x`` and ``--no-x`` alike)."""
    sub = _subparsers(build_parser())[command]
    return {o for a in sub._actions for o in a.option_strings if o.startswith("--")}


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_commands_kept():
    """prune, eval and info are still subcommands."""
    assert set(GOLDEN) <= set(_subparsers(build_parser())), "a dip-ext subcommand was removed"


@pytest.mark.parametrize("command", list(GOLDEN))
def test_flags_kept(command):
    """Every golden flag of ``command`` is still an option of the parser."""
    missing = sorted(set(GOLDEN[command]) - long_flags(command))
    assert not missing, f"dip-ext {command} lost the flags {missing}"


@pytest.mark.parametrize("command", list(GOLDEN))
def test_flags_in_help(command, capsys):
    """Every golden flag of ``command`` is still shown by ``dip-ext COMMAND --help`` (not hidden)."""
    shown = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", help_text(command, capsys)))
    missing = sorted(set(GOLDEN[command]) - shown)
    assert not missing, f"dip-ext {command} --help no longer shows {missing}"


@pytest.mark.parametrize("command", list(GOLDEN))
def test_flag_examples_parse(command, capsys):
    """``dip-ext COMMAND FLAG EXAMPLE...`` still parses for every golden flag (same kind of value accepted)."""
    refused = []
    for flag, example in GOLDEN[command].items():
        if example is None:  # --help: exits (tested above)
            continue
        try:
            build_parser().parse_args([command, flag, *example])
        except SystemExit:
            refused.append(f"{flag} {' '.join(example)}: {capsys.readouterr().err.strip()}")
    assert not refused, f"dip-ext {command} refuses:\n  " + "\n  ".join(refused)
