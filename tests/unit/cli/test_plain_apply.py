"""`apply`'s plain command lines skip argparse (cli.main.plain_apply): both ways must read any argv alike.

Whatever plain_apply takes, argparse reads as the same flags and --config: what `load_all` makes the Config
(or the error) of. Whatever it leaves (help, abbreviations, `--flag=value`, values beginning with '-', stray
words) goes to argparse, as before.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from support.fuzz_strategies import value_for

from interceptd.cli import main as cli
from interceptd.cli import parser as cli_parser
from interceptd.config import OPTIONS, Option, load_all
from interceptd.errors import ConfigError

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1  # make fuzz multiplies every budget
SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020"]
TOML = "/nonexistent/plain-apply.toml"  # compared as text only


@st.composite
def flag_words(draw: st.DrawFn, option: Option) -> list[str]:
    """One option as a user may write it: short or long, a value, or (booleans) alone or `=false`."""
    name = draw(st.sampled_from([f"-{option.short}", option.flag] if option.short else [option.flag]))
    if option.kind == "bool":
        return draw(st.sampled_from([[name], [name], [f"{name}=false"], [f"{name}=true"]]))
    value = draw(value_for(option))
    return draw(st.sampled_from([[name, value]] * 4 + [[f"{name}={value}"]]))


# Spellings plain_apply must leave to argparse, and pilot-agent's flags (accepted and ignored).
ODD = [["--help"], ["-h"], ["--version"], ["--envoy-po", "15001"], ["-p15001"], ["stray"], ["--"], ["-p"],
       ["--nope"], ["--log_output_level", "default:info"], ["--log_as_json"], ["--config", TOML],
       ["--config"], ["-x", "-1"], ["--dry-run=maybe"]]


@st.composite
def apply_argv(draw: st.DrawFn) -> list[str]:
    words = ["apply"]
    flag = st.sampled_from(OPTIONS).flatmap(flag_words)
    # Mostly flags, so that about half the command lines are plain ones: an odd word makes the rest argparse's.
    for part in draw(st.lists(st.one_of(flag, flag, flag, flag, flag, flag, st.sampled_from(ODD)), max_size=10)):
        words += part
    return words


def _argparse_outcome(args_list: list[str]) -> tuple[str | None, dict[str, str]] | str:
    try:
        args, flags = cli_parser.parse_with_argparse(args_list)
    except ConfigError as exc:
        return f"error: {exc}"
    return args.config, flags


@settings(max_examples=600 * SCALE)
@given(apply_argv())
def test_plain_apply_reads_every_command_line_it_takes_as_argparse_does(argv: list[str]) -> None:
    args_list, _bools = cli.normalise_argv(argv)  # what both ways read
    plain = cli.plain_apply(args_list)
    event("plain" if plain is not None else "left to argparse")
    if plain is None:
        return
    config = plain.pop("config", None)
    assert _argparse_outcome(args_list) == (config, plain)


def test_the_seed_command_line_is_plain_and_gives_argparse_s_config() -> None:
    args_list, bools = cli.normalise_argv(["apply", *SEED])
    plain = cli.plain_apply(args_list)
    assert plain is not None and bools == {}
    args, flags = cli_parser.parse_with_argparse(args_list)
    assert plain == flags and args.config is None
    assert load_all(plain, {}) == load_all(flags, {})


@pytest.mark.parametrize("odd", [o for o in ODD if o[0] not in ("--log_output_level", "--log_as_json", "--config")
                                 or o == ["--config"]])
def test_unusual_spellings_go_to_argparse(odd: list[str]) -> None:
    assert cli.plain_apply(["apply", *SEED, *odd]) is None


def test_only_apply_is_read_the_plain_way() -> None:
    assert cli.plain_apply(["render", *SEED]) is None
    assert cli.plain_apply(["--version", "apply"]) is None
    assert cli.plain_apply(["apply"]) == {}


def test_parse_gives_the_same_result_both_ways(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('service_exclude_cidr = ["198.51.100.0/24"]\n')
    argv = ["apply", *SEED, "--config", str(toml), "--dry-run", "--log_output_level", "default:info"]
    args, config = cli.parse(argv, env={})
    full_args, flags = cli_parser.parse_with_argparse(cli.normalise_argv(argv)[0])
    assert (args.command, args.config, args.option_flags) == (full_args.command, full_args.config, flags)
    assert config == load_all(flags, {}, config_path=str(toml))
