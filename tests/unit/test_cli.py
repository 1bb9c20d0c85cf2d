"""The command line: every sub-command listed with a description, unknown ones refused."""
from __future__ import annotations

import pytest

from sniproxy import cli
from sniproxy.observe.profile_cli import build_parser


def test_help_lists_every_subcommand_with_a_description(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out and cli.DESCRIPTIONS.get(name), f"{name} has no description"
    assert "examples:" in out


def test_unknown_command_is_refused_with_the_usage(capsys):
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_profile_takes_the_duration_as_bcc_does():
    args = build_parser().parse_args(["-F", "49", "7"])
    assert args.duration_pos == 7 and args.frequency == 49


@pytest.mark.parametrize("argv", [["profile", "--help"], ["check", "--help"], ["run", "--help"]])
def test_each_subcommand_has_its_own_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert "usage: sni-proxy" in capsys.readouterr().out


# ---- every command's --help has examples, and every example parses -----------------------
import argparse  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402


def _parser(command: str) -> argparse.ArgumentParser:
    module = importlib.import_module(cli.SUBCOMMANDS[command].split(":")[0])
    return module.build_parser()


def _help_pages():
    """(name, help text) of every command and every `trace` sub-command."""
    for command in cli.SUBCOMMANDS:
        parser = _parser(command)
        yield command, parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{command} {name}", sub.format_help()


HELP_PAGES = dict(_help_pages())


def test_the_help_pages_cover_every_trace_command():
    assert {"trace syscalls", "trace tcp", "trace connect", "trace retrans",
            "trace memory"} <= set(HELP_PAGES)


@pytest.mark.parametrize("page", sorted(HELP_PAGES))
def test_every_help_page_ends_with_examples_of_that_command(page):
    text = HELP_PAGES[page]
    assert "\nexamples:\n" in text, f"`sni-proxy {page} --help` has no examples"
    examples = _examples(text)
    assert examples, page
    if page != "run":
        assert any(f"sni-proxy {page}" in " ".join(e) for e in examples), examples


def _examples(text: str) -> list[list[str]]:
    """The command lines of the examples block, without their descriptions."""
    block = text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
    found = []
    for line in block.splitlines():
        line = line.strip()
        if not line.startswith(("sni-proxy", "sudo sni-proxy")):
            continue
        line = re.split(r"\s{2,}|\s#\s", line)[0].split(" | ")[0].split(" > ")[0]
        found.append(shlex.split(line.removeprefix("sudo ")))
    return found


@pytest.mark.parametrize("page", sorted(HELP_PAGES))
def test_every_example_parses_with_its_commands_parser(page):
    for argv in _examples(HELP_PAGES[page]):
        args = argv[1:]
        command = args.pop(0) if args and args[0] in cli.SUBCOMMANDS else "run"
        try:
            _parser(command).parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"`{' '.join(argv)}` (in `sni-proxy {page} --help`) does not parse: {exc}")


def test_profile_help_says_how_it_differs_from_bcc():
    assert "differences from bcc's profile" in HELP_PAGES["profile"]
    for name in ("syscalls", "tcp", "connect", "retrans", "memory"):
        assert "as bcc " in HELP_PAGES[f"trace {name}"], name
