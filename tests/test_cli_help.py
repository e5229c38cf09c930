"""Every option of every command says what it does and what it defaults to."""

from __future__ import annotations

import argparse
from typing import Iterator

import pytest

from fedfms_secure.cli import HelpFormatter, _parser

# owned by the key-management commands, checked there
OTHER_ROOMS = ("keys",)


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield " ".join(path) or "fedfms-secure", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _options() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    return [(command, parser, action) for command, parser in _commands(_parser())
            if not command.startswith(OTHER_ROOMS)
            for action in parser._actions
            if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))]


def test_the_walk_reaches_every_command() -> None:
    commands = {command for command, _ in _commands(_parser())}
    assert {"server", "client", "demo", "data synth", "data inspect", "privacy plan", "privacy report",
            "train central", "train local", "evaluate", "bench he", "model summary", "status"} <= commands
    for command, parser in _commands(_parser()):
        assert parser.format_help(), command  # every help page renders (a stray % would raise here)


@pytest.mark.parametrize(("command", "parser", "action"), _options(),
                         ids=lambda v: v if isinstance(v, str) else getattr(v, "dest", ""))
def test_every_option_has_help_that_shows_its_default(command: str, parser: argparse.ArgumentParser,
                                                      action: argparse.Action) -> None:
    flag = action.option_strings[0]
    assert action.help and len(action.help) > 10, f"{command} {flag} has no help text"
    shown = HelpFormatter(command)._get_help_string(action)
    assert "default" in shown or action.required, f"{command} {flag} does not show its default"
    if action.choices and len(action.choices) < 10:
        assert all(str(c) in parser.format_help() for c in action.choices)


def test_help_renders_and_lists_the_preset_choices(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["server", "--help"], ["demo", "--help"], ["model", "summary", "--help"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(args)
        out = capsys.readouterr().out
        assert "tiny" in out and "vit_b" in out and "vit_h" in out, args
