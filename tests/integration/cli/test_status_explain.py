"""`status` and `explain` as a user runs them, and the refusals of cli/commands.py, in lab namespaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.netlab import INTERCEPTD, Lab, sh

pytestmark = pytest.mark.netns

EXCLUDED = "203.0.113.0/24"


def apply(lab: Lab) -> None:
    lab.interceptd("apply", "-i", "*", "-b", "*", "-x", EXCLUDED)


def test_status_without_the_table_exits_3_on_one_line(lab: Lab) -> None:
    result = lab.interceptd("status", check=False)
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr == "interceptd: table inet interceptd is not installed\n"


def test_status_explain_top_ranks_the_busiest_rules_with_their_meaning(lab: Lab) -> None:
    apply(lab)
    top = lab.interceptd("status", "--explain-top", "3").stdout.splitlines()
    assert top == ["no rule of table inet interceptd has counted anything yet"]
    lab.serve(lab.peer, "peer", tcp=(9999,))
    for _ in range(4):
        lab.request(lab.pod, "192.0.2.1", 9999, uid=1000, gid=1000)  # captured: nobody listens on 15001
    lines = lab.interceptd("status", "--explain-top", "2").stdout.splitlines()
    assert lines[0].split() == ["packets", "rule:", "what", "it", "means"]
    counted = [line.split(None, 1) for line in lines[1:3]]
    assert int(counted[0][0]) >= int(counted[1][0]) >= 1 and len(counted) == 2
    assert any(text.startswith("istio-redirect/redirect-outbound: captured to the proxy's outbound listener :15001")
               for _, text in counted), lines
    assert lines[-1].startswith("nat chains see only the first packet")


def test_status_netns_reads_another_namespace_and_says_the_agent_is_away(lab: Lab, tmp_path: Path) -> None:
    apply(lab)
    state = str(tmp_path / "state")
    result = sh(INTERCEPTD, "status", "--json", "--netns", lab.pod, "--state-dir", state, ns=lab.peer)
    head, _, body = result.stdout.partition("\n")
    assert head.startswith(f"network namespace {lab.pod} (/run/netns/{lab.pod}); node agent: not reachable (")
    assert {c["name"] for c in json.loads(body)["chains"]} >= {"istio-output", "istio-redirect"}
    # The peer namespace holds no table: exit 3, as without --netns.
    missing = sh(INTERCEPTD, "status", "--netns", lab.peer, "--state-dir", state, ns=lab.pod, check=False)
    assert missing.returncode == 3 and "is not installed" in missing.stderr
    nowhere = sh(INTERCEPTD, "status", "--netns", "no-such-ns", "--state-dir", state, ns=lab.pod, check=False)
    assert nowhere.returncode == 1 and nowhere.stderr.strip() == (
        "interceptd: error: --netns 'no-such-ns': '/run/netns/no-such-ns' is not a network namespace")


def test_explain_all_steps_adds_the_counting_rules_and_chain_exits(lab: Lab) -> None:
    apply(lab)
    args = ("explain", "-i", "*", "-b", "*", "-x", EXCLUDED, "--dst", "203.0.113.9:80", "--uid", "1000")
    short = lab.interceptd(*args).stdout.splitlines()
    full = lab.interceptd(*args, "--all-steps").stdout.splitlines()
    assert len(full) > len(short) and set(short) <= set(full), (short, full)
    assert any("exclude" in line for line in short)
    from_kernel = lab.interceptd(*args, "--all-steps", "--from-kernel").stdout.splitlines()
    assert from_kernel == full


@pytest.mark.parametrize(("args", "message"), [
    (["apply", "--own-table"], "--own-table needs `interceptd run`"),
    (["run", "--dry-run"], "--dry-run cannot be used with run"),
    (["run", "--cleanup-only"], "--cleanup-only cannot be used with run"),
    (["node", "--skip-rule-apply"], "--skip-rule-apply cannot be used with node"),
    (["node", "--run-validation"], "--run-validation cannot be used with node"),
    (["status", "--netns", "x", "--explain-top"], "--explain-top cannot be used with --netns"),
    (["explain", "--dst", "203.0.113.9"], "--dst: a destination port is needed"),
    (["explain", "--dst", "192.0.2.1:80", "--uid", "no-such-user-xyz"], "--uid: invalid value 'no-such-user-xyz'"),
    (["explain", "--from-kernel", "--dst", "192.0.2.1:80"], "table inet interceptd is not installed"),
])
def test_refusals_are_one_line_and_change_nothing(lab: Lab, tmp_path: Path, args: list[str], message: str) -> None:
    before = lab.nft_json()
    result = lab.interceptd(*args, "--state-dir", str(tmp_path / "state"), check=False)
    lines = result.stderr.splitlines()
    assert result.returncode in (2, 3) and len(lines) == 1 and message in lines[0], result.stderr
    assert lab.nft_json() == before and not (tmp_path / "state").exists()


def test_cleanup_says_when_there_was_nothing(lab: Lab) -> None:
    assert lab.interceptd("cleanup").stderr == "interceptd: table inet interceptd was not installed\n"
    apply(lab)
    assert lab.interceptd("cleanup").stderr == "interceptd: table inet interceptd removed\n"
