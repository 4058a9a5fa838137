"""Golden renders: tests/golden/NAME.nft is `interceptd render --format nft` of NAME's input, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptd.cli import commands, golden
from interceptd.cli.main import run_command
from interceptd.config import load
from interceptd.records import replace
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Match, Ruleset
from interceptd.ruleset.nfttext import ruleset_text
from interceptd.ruleset.render import render

ROOT = Path(__file__).resolve().parents[3]
CASES = golden.cases(ROOT)
STALE = "out of date: run `make golden` and review the diff (git diff tests/golden) before committing"
SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_is_the_render(name: str) -> None:
    path = golden.golden_path(ROOT, name)
    assert path.exists(), f"{path} is missing: {STALE}"
    assert golden.render_case(CASES[name], name=name) == path.read_text(encoding="utf-8"), f"{path} is {STALE}"


def test_every_golden_has_an_input_and_every_example_a_golden() -> None:
    present = {p.stem for p in (ROOT / golden.GOLDEN_DIR).glob("*.nft")}
    assert present == set(CASES), f"goldens and inputs differ ({sorted(present ^ set(CASES))}): {STALE}"
    examples = {golden.EXAMPLE_PREFIX + p.stem for p in (ROOT / golden.EXAMPLES_DIR).glob("*.toml")}
    assert examples and examples <= present


def test_the_seed_golden_is_the_seed_command_line() -> None:
    assert (ROOT / golden.GOLDEN_DIR / "seed.args").read_text().splitlines()[-1] == (
        "-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x \"\" -b '*' -d 15090,15021,15020")
    assert CASES["seed"] == SEED


def _with_port(ruleset: Ruleset, chain: str, rule: str, port: int) -> Ruleset:
    """The same ruleset with one rule's port match changed and its name kept."""
    chains = []
    for c in ruleset.chains:
        rules = tuple(replace(r, matches=tuple(Match(m.key, port, m.negate) for m in r.matches))
                      if c.name == chain and r.name == rule else r for r in c.rules)
        chains.append(replace(c, rules=rules))
    return replace(ruleset, chains=tuple(chains))


def test_a_changed_expression_under_an_unchanged_name_differs_from_the_golden() -> None:
    config = load(dict(envoy_port="15001", inbound_capture_port="15006", proxy_uid="1337",
                       inbound_interception_mode="REDIRECT", service_cidr="*", service_exclude_cidr="",
                       inbound_ports="*", local_exclude_ports="15090,15021,15020"), {})
    facts = HostFacts(ipv6=False, host_ip=None)
    seed = golden.golden_path(ROOT, "seed").read_text(encoding="utf-8")
    assert commands.rendered(config, facts, "nft") == seed
    changed = ruleset_text(_with_port(render(config, facts), N.ISTIO_INBOUND, N.RULE_TUNNEL_PORT_RETURN, 15009))
    assert changed != seed
    # The only difference is the rule's expression: its name, comment and counter are the same.
    ((before, after),) = [(a, b) for a, b in zip(seed.splitlines(), changed.splitlines(), strict=True) if a != b]
    assert before.replace("tcp dport 15008", "tcp dport 15009") == after
    assert after.endswith(f'counter name "{N.counter_name(N.ISTIO_INBOUND, N.RULE_TUNNEL_PORT_RETURN)}" return '
                          f'comment "{N.RULE_TUNNEL_PORT_RETURN}"')


def test_render_format_nft_prints_the_golden_and_json_stays_the_default(capsys: pytest.CaptureFixture[str]
                                                                        ) -> None:
    assert run_command(["render", "--ipv6", "off", "--format", "nft", *SEED]) == 0
    assert capsys.readouterr().out == golden.golden_path(ROOT, "seed").read_text(encoding="utf-8")
    assert run_command(["render", "--ipv6", "off", *SEED]) == 0
    default = capsys.readouterr().out
    assert run_command(["render", "--ipv6", "off", "--format", "json", *SEED]) == 0
    assert capsys.readouterr().out == default and default.startswith('{\n  "nftables": [')


def test_a_bad_format_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(["render", "--format", "text", *SEED]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format" in err and "'text'" in err


def test_make_golden_writes_removes_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    (tmp_path / golden.GOLDEN_DIR).mkdir(parents=True)
    (tmp_path / golden.EXAMPLES_DIR).mkdir(parents=True)
    (tmp_path / golden.GOLDEN_DIR / "seed.args").write_text(" ".join(f"'{a}'" for a in SEED) + "\n")
    (tmp_path / golden.GOLDEN_DIR / "gone.nft").write_text("stale\n")
    assert golden.main(["write", str(tmp_path)]) == 0
    assert golden.golden_path(tmp_path, "seed").read_text() == golden.golden_path(ROOT, "seed").read_text()
    assert not golden.golden_path(tmp_path, "gone").exists()
    assert "removed" in capsys.readouterr().out
    assert golden.main(["write", str(tmp_path)]) == 0 and capsys.readouterr().out == ""  # nothing to do
    (tmp_path / golden.GOLDEN_DIR / "bad.args").write_text("-p 99999\n")
    assert golden.main(["write", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-p/--envoy-port" in err and "99999" in err
