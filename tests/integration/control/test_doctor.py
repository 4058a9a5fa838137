"""`interceptd doctor` in real namespaces: quiet next to ordinary neighbours, names the culprit of every seeded
fault, and never changes the kernel (the whole ruleset, policy rules and routes are compared around every run)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from support.gaplab import CONFIG_A, AgentProc
from support.neighbours import install_neighbour_tables
from support.netlab import Lab, call_in, sh, wait_until

pytestmark = pytest.mark.netns

SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020"]
DUAL = [*SEED, "--dual-stack"]
PROXY_UID = 1337


def kernel_state(lab: Lab) -> list[str]:
    """Everything doctor could touch: the whole nft ruleset, policy rules and routes of both families."""
    return [lab.nft_json(), *(sh("ip", *fam, what, "show", ns=lab.pod).stdout
                              for fam in ([], ["-6"]) for what in ("rule", "route"))]


def doctor(lab: Lab, *flags: str) -> tuple[int, dict[str, Any]]:
    before = kernel_state(lab)
    result = lab.interceptd("doctor", "--json", *flags, check=False)
    assert kernel_state(lab) == before, "doctor changed the kernel"
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def problems(report: dict[str, Any]) -> dict[str, str]:
    """check -> its verdict and culprits as one text, for the checks that failed."""
    return {c["check"]: " | ".join([c["verdict"], *c["culprits"]]) for c in report["checks"] if not c["ok"]}


def nft(lab: Lab, script: str) -> None:
    sh("nft", script, ns=lab.pod)


@pytest.fixture
def pod(lab6: Lab, tmp_path: Path) -> Lab:
    """The seed's rules, dual-stack, the proxy listening as its own user, and ordinary neighbours."""
    lab6.interceptd("apply", *DUAL)
    install_neighbour_tables(lab6, tmp_path)
    return lab6


def proxy(lab: Lab, ports: tuple[int, ...] = (15001, 15006), uid: int | None = PROXY_UID) -> None:
    lab.serve(lab.pod, "proxy", tcp=ports, uid=uid)


def test_clean_namespace_with_neighbours_has_no_finding(pod: Lab) -> None:
    proxy(pod)
    for flags in (DUAL, []):  # the configuration given, or the installed table as the reference
        code, report = doctor(pod, *flags)
        assert (code, problems(report)) == (0, {}), flags
        assert {c["check"] for c in report["checks"]} >= {"kernel-features", "loopback", "address", "table", "owner",
                                                         "neighbour-chains", "iptables", "listeners"}


@dataclass(frozen=True)
class Fault:
    name: str
    seed: Callable[[Lab], None]
    check: str
    culprit: tuple[str, ...]
    flags: list[str] = field(default_factory=lambda: DUAL)
    listening: bool = True


FAULTS = [
    Fault("lo down", lambda lab: sh("ip", "link", "set", "lo", "down", ns=lab.pod), "loopback", ("lo is down",)),
    Fault("no global address", lambda lab: [sh("ip", "addr", "flush", "dev", dev, "scope", "global", ns=lab.pod)
                                            for dev in ("eth0", "lo")] and None, "address", ("no global address",)),
    Fault("ip table drops first", lambda lab: nft(lab, "add table ip meshb; add chain ip meshb out { type filter "
                                                       "hook output priority -200; }; add rule ip meshb out tcp dport "
                                                       "80 drop"),
          "neighbour-chains", ("table ip meshb chain out", "before ours", "can drop")),
    Fault("ip6 table dnats first", lambda lab: nft(lab, "add table ip6 meshc; add chain ip6 meshc nat { type nat "
                                                        "hook output priority -150; }; add rule ip6 meshc nat ip6 "
                                                        "daddr 2001:db8:7::/48 tcp dport 80 dnat to [2001:db8::9]:80"),
          "neighbour-chains", ("table ip6 meshc chain nat", "can dnat")),
    Fault("inet table redirects at our priority", lambda lab: nft(
        lab, "add table inet meshd; add chain inet meshd pre { type nat hook prerouting priority -100; }; "
             "add rule inet meshd pre tcp dport 8080 redirect to :9999"),
          "neighbour-chains", ("table inet meshd chain pre", "same priority", "can redirect")),
    Fault("ip6 drop through a regular chain", lambda lab: nft(
        lab, "add table ip6 meshe; add chain ip6 meshe deny; add rule ip6 meshe deny drop; add chain ip6 meshe raw "
             "{ type filter hook prerouting priority -300; }; add rule ip6 meshe raw tcp dport 443 jump deny"),
          "neighbour-chains", ("table ip6 meshe chain raw", "via chain deny", "can drop")),
    Fault("a mark set before TPROXY's", lambda lab: nft(
        lab, "add table ip meshf; add chain ip meshf mangle { type filter hook prerouting priority -200; }; "
             "add rule ip meshf mangle meta mark set 0x539"),
          "neighbour-chains", ("table ip meshf chain mangle", "set the packet mark"), [*DUAL, "-m", "TPROXY"]),
    Fault("leftover istio-init (iptables-nft)", lambda lab: [sh(*c, ns=lab.pod) for c in (
        ["iptables-nft", "-t", "nat", "-N", "ISTIO_OUTPUT"],
        ["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"])] and None,
          "iptables", ("iptables-nft: 1 rule ", "leftover istio-init", "ISTIO_OUTPUT")),
    Fault("leftover istio-init (ip6tables-nft)", lambda lab: [sh(*c, ns=lab.pod) for c in (
        ["ip6tables-nft", "-t", "nat", "-N", "ISTIO_REDIRECT"],
        ["ip6tables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_REDIRECT"])] and None,
          "iptables", ("ip6tables-nft: 1 rule", "leftover istio-init", "ISTIO_REDIRECT")),
    Fault("ip6tables-legacy rule", lambda lab: sh("ip6tables-legacy", "-A", "OUTPUT", "-p", "tcp", "--dport", "9",
                                                  "-j", "REJECT", ns=lab.pod) and None,
          "iptables", ("ip6tables-legacy: 1 rule,", "--dport 9")),
    Fault("iptables-legacy rule", lambda lab: sh("iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-j",
                                                 "MARK", "--set-mark", "9", ns=lab.pod) and None,
          "iptables", ("iptables-legacy: 1 rule,", "MARK")),
    Fault("inbound listener missing", lambda lab: proxy(lab, (15001,)), "listeners", (":15006", "nothing listens"),
          listening=False),
    Fault("proxy runs as root", lambda lab: proxy(lab, uid=None), "listeners", (":15001", "uid 0", "loop"),
          listening=False),
    Fault("owner flag missing", lambda lab: None, "owner", ("no owner flag",), [*DUAL, "--own-table"]),
    Fault("table missing", lambda lab: lab.interceptd("cleanup") and None, "table", ("not installed",)),
    Fault("table flushed", lambda lab: nft(lab, "flush chain inet interceptd istio-output"), "table",
          ("chain istio-output: flushed",)),
    Fault("foreign rule in our table", lambda lab: nft(lab, "insert rule inet interceptd istio-output tcp dport 9 "
                                                            "accept comment \"x\""), "table",
          ("+ istio-output/x",)),
    Fault("set element removed", lambda lab: nft(lab, "delete element inet interceptd inbound-exclude-ports "
                                                      "{ 15090 }"), "table",
          ("- set inbound-exclude-ports element 15090",)),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_each_seeded_fault_is_named_with_its_culprit(pod: Lab, fault: Fault) -> None:
    if fault.listening:
        proxy(pod)
    fault.seed(pod)
    code, report = doctor(pod, *fault.flags)
    found = problems(report)
    assert code == 1 and fault.check in found, (fault.name, found)
    for words in fault.culprit:
        assert words in found[fault.check], (fault.name, found[fault.check])


def test_a_neighbour_after_ours_or_on_an_absent_interface_is_no_finding(pod: Lab) -> None:
    proxy(pod)
    nft(pod, "add table ip late; add chain ip late out { type filter hook output priority 10; }; "
             "add rule ip late out tcp dport 80 drop; add chain ip late early { type filter hook output priority "
             "-200; }; add rule ip late early oifname \"eth9\" drop; add rule ip late early accept")
    code, report = doctor(pod, *DUAL)
    assert (code, problems(report)) == (0, {})


def test_the_agent_finds_a_neighbour_exports_it_and_logs_it_once(lab: Lab, tmp_path: Path) -> None:
    def scrape(path: str) -> str:
        try:
            with urlopen(f"http://127.0.0.1:15321{path}", timeout=5) as response:
                return str(response.read().decode())
        except OSError as exc:
            return str(getattr(exc, "read", lambda: b"")().decode())

    proxy(lab)
    nft(lab, "add table ip meshb; add chain ip meshb out { type filter hook output priority -200; }; "
             "add rule ip meshb out tcp dport 80 drop")
    agent = AgentProc(lab, tmp_path, "--log-level", "debug")  # debug: each quiet check is an event
    agent.write_config(CONFIG_A.replace('metrics_address = ""', 'metrics_address = "127.0.0.1:15321"')
                       + "reconcile_interval = 0.1\n")  # the smallest accepted: doctor looks every 10th
    agent.start()
    try:
        assert wait_until(lambda: 'interceptd_conflicts{kind="neighbour-chains"} 1.0'
                          in call_in(lab.pod, scrape, "/metrics"), timeout=20), agent.log.read_text()[-2000:]
        assert "conflict (neighbour-chains): table ip meshb chain out" in call_in(lab.pod, scrape, "/readyz")
        assert wait_until(lambda: agent.events("check") >= 3 * 10, timeout=20)  # more looks around: no new log
        assert agent.events("conflict") == 1
    finally:
        agent.close()
