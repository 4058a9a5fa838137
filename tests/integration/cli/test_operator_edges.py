"""Commands that used to surprise: dry runs that changed the kernel, permission noise, misleading errors."""

from __future__ import annotations

import json

import pytest
from support.netlab import INTERCEPTD, Lab, sh

pytestmark = pytest.mark.netns

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("args", [["cleanup", "--dry-run"], ["apply", "--cleanup-only", "--dry-run"],
                                  ["istio-iptables", "--cleanup-only", "--dry-run"]], ids=" ".join)
def test_a_dry_run_cleanup_changes_nothing(lab: Lab, args: list[str]) -> None:
    lab.interceptd("apply", "-i", "*")
    before = lab.nft_json()
    result = lab.interceptd(*args)
    assert lab.nft_json() == before
    assert json.loads(result.stdout)["nftables"][-1] == {"delete": {"table": {"family": "inet",
                                                                              "name": "interceptd"}}}
    assert "nothing was changed" in result.stderr


def test_render_cleanup_only_prints_the_removal() -> None:
    result = sh(INTERCEPTD, "render", "--cleanup-only", "--ipv6", "off")
    assert [next(iter(c)) for c in json.loads(result.stdout)["nftables"]] == ["add", "delete"]


@pytest.mark.parametrize("args", [["apply", "-i", "*"], ["status"], ["cleanup"], ["doctor"], ["diff"],
                                  ["run", "--state-dir", "/tmp/interceptd-nobody"]], ids=" ".join)
def test_without_privilege_one_line_says_what_is_needed(lab: Lab, args: list[str]) -> None:
    before = lab.nft_json()
    result = sh(*NOBODY, INTERCEPTD, *args, ns=lab.pod, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["interceptd: error: needs root or CAP_NET_ADMIN in the target network "
                                          "namespace"], result.stderr
    assert lab.nft_json() == before


def test_explain_without_a_route_says_so_in_words(lab: Lab) -> None:
    result = lab.interceptd("explain", "--dst", "100.64.0.1:80", "-i", "*", check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["interceptd: error: 100.64.0.1: this namespace has no route to it "
                                          "(Network is unreachable); give --oif/--iif and --src"], result.stderr



def test_explaining_a_proposal_needs_no_privilege(lab: Lab) -> None:
    lab.interceptd("apply", "-i", "*")
    result = sh(*NOBODY, INTERCEPTD, "explain", "--json", "-i", "*", "--dst", "203.0.113.7:80", "--uid", "1000",
                ns=lab.pod)
    answer = json.loads(result.stdout)
    assert answer["verdict"]["action"] == "redirect"
    assert answer["notes"] == ["the installed table could not be read (needs root or CAP_NET_ADMIN in the target "
                               "network namespace): this explains the given configuration only"]
