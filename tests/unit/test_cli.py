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
