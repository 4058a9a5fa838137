"""Hostile input: every flag/env/TOML input yields a Config that renders safely, or one ConfigError line.

Never another exception. 10,000+ derandomized examples in `make test`; `make fuzz` runs many more with
fresh randomness (FUZZ_PROFILE=fuzz FUZZ_EXAMPLES=N).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fuzz_strategies import FACTS, SMUGGLE, culprit, inputs, toml_text, unsafe_strings, value_for

from interceptd.cli import main as cli
from interceptd.cli import parser as cli_parser
from interceptd.config import OPTIONS, Config
from interceptd.config import options as config
from interceptd.errors import ConfigError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import Existing, transaction
from interceptd.ruleset.render import render

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1  # make fuzz multiplies every budget
DAEMON = Path(__file__).resolve().parents[3] / "daemon" / "interceptd"


def assert_one_line_naming(exc: ConfigError, name: str) -> None:
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    assert name in message, (message, name)


def assert_names_the_bad_argument(exc: ConfigError, argv: list[str]) -> None:
    """argparse's own errors: the flag that lacks its value, the command, or exactly the stray tokens."""
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    shown = sorted({"".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in a)
                    for a in argv}, key=len, reverse=True)
    if message.startswith("unrecognized arguments: "):
        # After the tokens, at most one hint: the closest flag, or that the shell expanded an unquoted *.
        rest = re.sub(r" \((did you mean '[^']*'\?|these are file names: [^)]*)\)$", "",
                      message.removeprefix("unrecognized arguments: "))
        for token in shown:
            rest = rest.replace(token, "") if token else rest
        assert rest.strip(" ") == "", (message, argv)
        return
    if message.startswith("argument COMMAND: invalid choice: "):
        assert repr(argv[0]) in message, (message, argv)
        return
    named = re.match(r"(?:argument|ambiguous option:) ([^: ]+)", message)
    used = {a.partition("=")[0] for a in argv if a.startswith("-")}
    assert named and (set(named.group(1).split("/")) & used or named.group(1).split("=")[0] in used), (message, argv)


def assert_renders_safely(cfg: Config, facts: HostFacts) -> None:
    try:
        document = transaction(render(cfg, facts), Existing.empty())
    except ConfigError as exc:  # a combination render cannot express (e.g. an unsupported feature)
        assert "\n" not in str(exc)
        return
    bad = unsafe_strings(document)
    assert not bad, bad
    json.dumps(document)


@settings(max_examples=6000 * SCALE)
@given(inputs(), st.sampled_from(FACTS))
def test_load_yields_config_or_one_line_error(given_input: tuple[dict[str, str], dict[str, str], dict[str, Any]],
                                             facts: HostFacts) -> None:
    flags, env, toml = given_input
    try:
        cfg = config.load(flags, env, toml, "fuzz.toml")
    except ConfigError as exc:
        assert_one_line_naming(exc, culprit(flags, env, toml))
        return
    assert_renders_safely(cfg, facts)


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    """A command line as a user (or an attacker controlling a pod spec) could write it."""
    out = [draw(st.sampled_from(["render", "render", "apply", "status", "cleanup", "bogus"]))]
    for option in draw(st.lists(st.sampled_from(OPTIONS), max_size=6)):
        name = draw(st.sampled_from([option.flag, f"-{option.short}" if option.short else option.flag]))
        if option.kind == "bool":
            form = draw(st.sampled_from(["bare", "eq", "eq"]))
            out += [name] if form == "bare" else [f"{name}={draw(value_for(option))}"]
        elif draw(st.booleans()):
            out += [name, draw(value_for(option))]
        else:
            out.append(f"{name}={draw(value_for(option))}")
    if draw(st.booleans()):
        out.append(draw(st.sampled_from([*SMUGGLE, "--", "-", "--json", "--ipv6", "--config"])).replace("\0", ""))
    return out


@settings(max_examples=2000 * SCALE)
@given(argv(), st.sampled_from(FACTS))
def test_command_line_yields_config_or_one_line_error(args: list[str], facts: HostFacts) -> None:
    try:
        _ns, cfg = cli.parse(args)
    except ConfigError as exc:
        argv, bools = cli.normalise_argv(args)
        try:
            ns = cli_parser.build_parser().parse_args(argv)
        except ConfigError:
            assert_names_the_bad_argument(exc, argv)
            return
        flags = {o.key: getattr(ns, o.key) for o in OPTIONS if getattr(ns, o.key, None) is not None}
        assert_one_line_naming(exc, culprit({**flags, **bools}, dict(os.environ), {}))
        return
    except SystemExit:  # argparse's --help and --version: not reachable from these inputs
        pytest.fail(f"exit from {args}")
    assert_renders_safely(cfg, facts)


@settings(max_examples=1000 * SCALE)
@given(argv())
def test_the_cli_entry_point_exits_2_on_one_line_never_a_traceback(args: list[str]) -> None:
    """Through run_command, as `interceptd` runs: only `render` is kept (no command may touch the host's
    kernel from a unit test), the other commands still reach the parser's refusals."""
    if args[0] not in ("render", "bogus"):
        args = ["render", *args[1:]]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.run_command(args)
    if code == 0:
        json.loads(out.getvalue())
        return
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("interceptd: error: "), (code, err.getvalue())
    assert out.getvalue() == ""


@settings(max_examples=2000 * SCALE)
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda flags, env, toml: toml_text(toml).encode(), *[st.just({})] * 2,
                           inputs().map(lambda t: t[2])),
                 st.text(max_size=200).map(str.encode)), st.sampled_from(FACTS))
def test_toml_file_yields_config_or_one_line_error(tmp_path_factory: pytest.TempPathFactory, data_bytes: bytes,
                                                   facts: HostFacts) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_bytes(data_bytes)
    try:
        cfg = config.load_all({}, {}, str(path))
    except ConfigError as exc:
        try:
            data = tomllib.loads(data_bytes.decode())
        except (UnicodeDecodeError, ValueError):
            assert_one_line_naming(exc, f"--config {str(path)!r}: ")
            return
        unknown = [key for key in data if key not in config.OPTIONS_BY_KEY]
        assert_one_line_naming(exc, f"unknown key {unknown[0]!r}" if unknown else culprit({}, {}, data))
        return
    assert_renders_safely(cfg, facts)


def test_smuggling_names_are_refused() -> None:
    """Interface, group and table names that carry nft syntax never reach a Config."""
    for key in ("exclude_interfaces", "kube_virt_interfaces", "proxy_gid", "outbound_owner_groups_exclude",
                "table"):
        for text in ('eth0"; flush ruleset; "', "a}", "x\ny", "$(reboot)", "a b", "é"):
            with pytest.raises(ConfigError, match=key.replace("_", "-")):
                config.load({key: text}, {})


def test_nothing_is_ever_passed_through_a_shell() -> None:
    """No shell=True, os.system, os.popen or os.exec*: interceptd runs no program at all."""
    offenders = []
    for path in sorted(DAEMON.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func in ("os.system", "os.popen") or func.startswith(("os.exec", "os.spawn", "pty.spawn")):
                    offenders.append(f"{path.name}:{node.lineno} {func}")
                offenders += [f"{path.name}:{node.lineno} shell=" for kw in node.keywords if kw.arg == "shell"]
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offenders += [f"{path.name}:{node.lineno} import {m}" for m in mods if m in ("subprocess", "pty")]
    assert offenders == []


def test_the_oracle_names_the_source_of_the_first_bad_value() -> None:
    """The fuzz's expectation is the one source to fix, in load's order, not any name at all."""
    assert culprit({"inbound_capture_port": "x"}, {"ISTIO_SERVICE_CIDR": "nope"}, {"envoy_port": "y"}) \
        == "key 'envoy_port'"
    assert culprit({"envoy_port": "1", "inbound_capture_port": "x"}, {"INBOUND_CAPTURE_PORT": "2"}, {}) \
        == "--inbound-capture-port"
    assert culprit({}, {"INBOUND_CAPTURE_PORT": "x"}, {"inbound_capture_port": 15006}) \
        == "environment variable INBOUND_CAPTURE_PORT"
    assert culprit({"proxy_uid": "no-such-user-xyz"}, {}, {}) == "--proxy-uid"
    with pytest.raises(ConfigError) as err:
        config.load({"inbound_capture_port": "x"}, {"ISTIO_SERVICE_CIDR": "nope"}, {"envoy_port": "y"}, "f.toml")
    assert "key 'envoy_port'" in str(err.value) and "--inbound-capture-port" not in str(err.value)


def test_the_safety_check_flags_a_smuggled_set_reference() -> None:
    """What the old interface-name rule let through ('@x' reached libnftables as a set reference)."""
    document = transaction(render(config.load({"service_exclude_cidr": "192.0.2.0/24"}, {}), FACTS[1]),
                           Existing.empty())
    assert unsafe_strings(document) == [] and "@exclude-cidrs-v4" in json.dumps(document)
    document["nftables"].append({"add": {"rule": {"expr": [{"match": {"right": "@x"}}, {"x": "a*"}]}}})
    assert unsafe_strings(document) == ["@x", "a*"]
