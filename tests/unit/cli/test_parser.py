"""The CLI builds only the running subcommand's options: its help, errors and results stay those of the full parser."""

from __future__ import annotations

import pytest

from interceptd.cli import main as cli
from interceptd.cli import parser as cli_parser


def _help(parser_argv: list[str], only: str | None, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        cli_parser.build_parser(only).parse_args(parser_argv)
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(cli_parser.COMMANDS))
def test_a_subcommand_built_alone_has_the_full_parsers_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    full = _help([command, "--help"], None, capsys)
    assert "--istio-service-exclude-cidr" in full
    assert _help([command, "--help"], command, capsys) == full


def test_the_top_level_help_does_not_depend_on_the_subcommands_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert _help(["--help"], "apply", capsys) == _help(["--help"], None, capsys)


def test_the_parser_is_built_for_the_first_non_option_argument() -> None:
    args, config = cli.parse(["apply", "-x", "198.51.100.0/24", "--istio-inbound-ports", "*", "-d", "15020"])
    assert args.command == "apply" and config.inbound_ports is None
    assert [str(n) for n in config.service_exclude_cidr] == ["198.51.100.0/24"]
