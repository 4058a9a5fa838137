"""status, explain and diff on both capture modes: an ambient pod's table, and the node's host probe table
(installed here from its golden, as `interceptd node --ambient-host-rules` writes it), in a lab namespace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.netlab import Lab, sh

pytestmark = pytest.mark.netns

AMBIENT = ["--capture-mode", "ambient", "--redirect-dns"]
HOST = ["--table", "interceptd-host"]
GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "host-probe.nft"


def test_status_of_an_ambient_table_shows_its_chains_counters_and_mode(lab: Lab) -> None:
    lab.interceptd("apply", *AMBIENT)
    shown = lab.interceptd("status").stdout
    for rule in ("probe-accept", "proxy-mark-return", "proxied-accept", "save-mark", "restore-mark",
                 "proxy-dns-upstream-zone"):
        assert rule in shown, rule
    data = json.loads(lab.interceptd("status", "--json").stdout)
    rules = {(c["name"], r["name"]) for c in data["chains"] for r in c.get("rules", [])}
    assert {("prerouting", "probe-accept"), ("istio-output", "proxied-accept")} <= rules, data


def test_explain_of_an_inbound_connection_in_ambient_mode(lab: Lab) -> None:
    lab.interceptd("apply", *AMBIENT)
    ask = ["explain", "--json", "--inbound", "--dst", "192.0.2.2:8080"]
    captured = json.loads(lab.interceptd(*ask, "--src", "198.51.100.7").stdout)
    assert captured["verdict"]["action"] == "redirect" and captured["verdict"]["port"] == 15006
    tunnel = json.loads(lab.interceptd(*ask[:-1], "192.0.2.2:15008", "--src", "198.51.100.7").stdout)
    assert tunnel["verdict"]["action"] == "none" and "istio-inbound/tunnel-port-return" in tunnel["matched"]
    probe = json.loads(lab.interceptd(*ask, "--src", "169.254.7.127", "--iif", "eth0").stdout)
    assert probe["verdict"]["action"] == "none" and "prerouting/probe-accept" in probe["matched"]


def test_diff_of_an_ambient_configuration(lab: Lab) -> None:
    lab.interceptd("apply", *AMBIENT)
    assert lab.interceptd("diff", *AMBIENT).returncode == 0
    changed = lab.interceptd("diff", "--json", "--capture-mode", "ambient", check=False)
    assert changed.returncode == 1
    details = [d["detail"] for d in json.loads(changed.stdout)["differences"]]
    assert any("dns-jump" in d for d in details) and any("raw-output" in d for d in details)


def test_status_explain_and_diff_of_the_host_probe_table(lab: Lab) -> None:
    sh("nft", "-f", str(GOLDEN), ns=lab.pod)
    shown = lab.interceptd("status", *HOST).stdout
    assert "probe-snat" in shown and "snat ip to 169.254.7.127" in shown and "192.0.2.10" in shown
    ask = ["explain", "--json", *HOST, "--outbound", "--dst", "192.0.2.10:8080"]
    kubelet = json.loads(lab.interceptd(*ask, "--uid", "0", "--gid", "0").stdout)
    assert kubelet["verdict"]["action"] == "snat" and kubelet["verdict"]["address"] == "169.254.7.127"
    other = json.loads(lab.interceptd(*ask, "--uid", "1000", "--gid", "1000").stdout)
    assert other["verdict"]["action"] == "none"
    assert lab.interceptd("diff", *HOST).stdout.strip() == "table inet interceptd-host matches the configuration"
    changed = lab.interceptd("diff", *HOST, "--kubelet-uid", "1000", check=False)
    assert changed.returncode == 1 and "meta skuid 1000" in changed.stdout


def test_explain_kernel_agrees_on_the_host_probe_table(lab: Lab) -> None:
    """A real probe through the host table: the kubelet's is SNATed, another uid's is not, and the kernel's trace
    matches the model's rules for both; a capture flag given with --kernel still explains (and traces) the host
    table, never a pod's rendering of it."""
    sh("nft", "-f", str(GOLDEN), ns=lab.pod)
    ask = ["explain", "--kernel", "--json", *HOST, "--outbound", "--dst", "192.0.2.10:8080"]
    kubelet = json.loads(lab.interceptd(*ask, "--uid", "0", "--gid", "0").stdout)
    assert kubelet["kernel"]["agree"], kubelet["kernel"]
    assert kubelet["kernel"]["rules"] == ["postrouting/entry", "postrouting/probe-snat"]
    assert kubelet["verdict"]["action"] == "snat" and kubelet["verdict"]["address"] == "169.254.7.127"
    other = json.loads(lab.interceptd(*ask, "--uid", "1000", "--gid", "1000").stdout)
    assert other["kernel"]["agree"] and other["kernel"]["rules"] == ["postrouting/entry"], other["kernel"]
    assert other["verdict"]["action"] == "none"
    proposed = lab.interceptd(*ask, "--uid", "0", "--capture-mode", "ambient")
    shown = json.loads(proposed.stdout)
    assert shown["kernel"]["agree"] and shown["verdict"]["action"] == "snat", shown
    assert "MODEL AND KERNEL DISAGREE" not in proposed.stderr
