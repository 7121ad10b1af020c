"""Both programs' --help lists their commands, and every option says what it does."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from helpers import REPO, run_cli
from retrofit_agent import __version__
from retrofit_agent.daemon.cli import SUBCOMMANDS
from retrofit_agent.train.cli import build_parser


def _options(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every argument of ``parser`` and of its subcommands, recursively."""
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if isinstance(action, argparse._SubParsersAction):
            described = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                assert described.get(name), f"{path} {name}: subcommand without help"
                yield from _options(sub, f"{path} {name}")
            continue
        yield path, action


def _all_options() -> list[tuple[str, argparse.Action]]:
    found = list(_options(build_parser(), "retrofit-model"))
    for name, cmd in SUBCOMMANDS.items():
        found += _options(cmd.parser(), f"retrofit-agent {name}")
    return found


def test_every_option_of_both_programs_has_help():
    missing = [
        f"{path}: {'/'.join(a.option_strings) or a.dest}"
        for path, a in _all_options()
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert missing == []


def test_agent_help_lists_its_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    listed = r.stdout.split("commands:", 1)[1]
    for name, cmd in SUBCOMMANDS.items():
        assert f"  {name}  " in listed or f"  {name} " in listed, name
        assert cmd.help in listed


def _model(*args: str) -> subprocess.CompletedProcess:
    code = "import sys\nfrom retrofit_agent.train.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.mark.integration
def test_model_help_lists_its_commands():
    r = _model("--help")
    assert r.returncode == 0
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        assert f"    {name} " in r.stdout, name


@pytest.mark.integration
def test_both_programs_tell_their_version():
    assert _model("--version").stdout.strip() == f"retrofit-model {__version__}"
    assert run_cli("--version").stdout.strip() == f"retrofit-agent {__version__}"
