"""explain, status --explain-top and diff answer about the table installed in the namespace, not the defaults."""

from __future__ import annotations

import json

import pytest
from support.netlab import Lab, sh

pytestmark = pytest.mark.netns

SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020"]
QUESTION = ["explain", "--json", "--outbound", "--dst", "203.0.113.7:80", "--uid", "1000", "--gid", "1000"]


def test_explain_without_flags_explains_the_installed_table(lab: Lab) -> None:
    lab.interceptd("apply", *SEED)
    answer = json.loads(lab.interceptd(*QUESTION).stdout)
    assert answer["verdict"]["text"].startswith("redirected to the proxy's outbound listener :15001")
    assert "notes" not in answer


def test_explain_of_a_proposal_says_first_that_it_differs_from_the_installed_table(lab: Lab) -> None:
    lab.interceptd("apply", *SEED)
    answer = json.loads(lab.interceptd(*QUESTION, "-i", "198.51.100.0/24").stdout)
    assert "differs from the given configuration" in answer["notes"][0]
    assert answer["verdict"]["action"] == "none"
    text = lab.interceptd(*[q for q in QUESTION if q != "--json"], "-i", "198.51.100.0/24").stdout
    assert text.startswith("note: the installed table inet interceptd differs")
    same = json.loads(lab.interceptd(*QUESTION, *SEED).stdout)
    assert "notes" not in same and same["verdict"]["action"] == "redirect"


def test_explain_without_a_table_says_so(lab: Lab) -> None:
    result = lab.interceptd(*QUESTION, check=False)
    assert result.returncode == 3 and "not installed" in result.stderr and "nothing is captured" in result.stderr


def test_explain_top_names_installed_rules_without_the_config(lab: Lab) -> None:
    lab.interceptd("apply", *SEED)
    assert lab.request(lab.pod, "203.0.113.7", 80, uid=1000) in ("refused", "timeout")
    top = lab.interceptd("status", "--explain-top", "5").stdout
    assert "istio-redirect/redirect-outbound" in top and "not in the" not in top, top


def test_diff_lists_differences_rule_by_rule_and_element_by_element(lab: Lab) -> None:
    lab.interceptd("apply", *SEED)
    equal = lab.interceptd("diff", *SEED)
    assert equal.returncode == 0 and "matches the configuration" in equal.stdout
    sh("nft", "delete element inet interceptd inbound-exclude-ports { 15090 }", ns=lab.pod)
    sh("nft", "delete rule inet interceptd istio-output handle "
       + _handle(lab, "istio-output", "loopback-return"), ns=lab.pod)
    seeded = lab.nft_json()
    changed = lab.interceptd("diff", "--json", *SEED, check=False)
    assert changed.returncode == 1 and lab.nft_json() == seeded
    details = [d["detail"] for d in json.loads(changed.stdout)["differences"]]
    assert any(d.startswith("- istio-output/loopback-return:") for d in details), details
    assert "- set inbound-exclude-ports element 15090" in details
    bad = lab.interceptd("diff", "-p", "x", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "-p" in bad.stderr
    lab.interceptd("cleanup")
    missing = lab.interceptd("diff", *SEED, check=False)
    assert missing.returncode == 1 and "not installed" in missing.stdout


def _handle(lab: Lab, chain: str, rule: str) -> str:
    listing = json.loads(sh("nft", "-j", "-a", "list", "chain", "inet", "interceptd", chain, ns=lab.pod).stdout)
    return str(next(i["rule"]["handle"] for i in listing["nftables"]
                    if "rule" in i and i["rule"].get("comment") == rule))


def test_status_json_holds_the_set_contents(lab: Lab) -> None:
    lab.interceptd("apply", *SEED)
    shown = json.loads(lab.interceptd("status", "--json").stdout)
    assert shown["sets"]["inbound-exclude-ports"] == ["15020-15021", "15090"]
    assert shown["sets"]["proxy-uids"] == ["1337"]


def test_diff_names_a_missing_tproxy_route(lab: Lab) -> None:
    tproxy = ["-m", "TPROXY", "-b", "*", "-i", "*"]
    lab.interceptd("apply", *tproxy)
    assert lab.interceptd("diff", *tproxy).returncode == 0
    sh("ip", "rule", "del", "fwmark", "1337", "lookup", "133", ns=lab.pod)
    result = lab.interceptd("diff", *tproxy, check=False)
    assert result.returncode == 1 and "lookup 133" in result.stdout and "is missing" in result.stdout, result.stdout
