"""DNS capture (docs/istio-compatibility.md, "DNS capture") with real UDP and TCP queries.

The "real" resolver runs in the peer on port 53 (203.0.113.1, 198.51.100.1, 2001:db8::1); the pod's DNS
agent listens on 15053 as the proxy uid 1337. UDP clients use a connected socket, so a reply is only
accepted if it comes back from the address the app asked (i.e. the redirect was undone on the way back,
which needs the conntrack zones).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.netlab import Lab, call_in, udp_query

APP = {"uid": 1000, "gid": 1000}
PROXY = {"uid": 1337, "gid": 1337}


def udp(lab: Lab, host: str, who: dict[str, int]) -> str:
    return str(call_in(lab.pod, udp_query, host, 53, **who))


def tcp(lab: Lab, host: str, who: dict[str, int]) -> str:
    return lab.request(lab.pod, host, 53, **who)


@pytest.fixture
def resolv(tmp_path: Path) -> Path:
    path = tmp_path / "resolv.conf"
    path.write_text("search example.test\nnameserver 203.0.113.1\nnameserver 2001:db8::1\noptions ndots:5\n")
    return path


def start(lab: Lab) -> None:
    lab.serve(lab.peer, "real", tcp=[53], udp=[53])
    lab.serve(lab.pod, "agent", tcp=[15053], udp=[15053], uid=1337)
    lab.serve(lab.pod, "proxy", tcp=[15001])


def test_app_queries_reach_the_agent_and_the_proxy_reaches_the_resolver(lab: Lab, resolv: Path) -> None:
    start(lab)
    lab.interceptd("apply", "-i", "*", "--redirect-dns", "--resolv-conf", str(resolv))
    for _ in range(2):  # the proxy's own query in between must not steal the app's next one
        assert udp(lab, "203.0.113.1", APP) == "agent"
        assert udp(lab, "203.0.113.1", PROXY) == "real"
    assert tcp(lab, "203.0.113.1", APP) == "agent 15053 203.0.113.1:53 192.0.2.2"
    assert tcp(lab, "203.0.113.1", PROXY) == "real 53 - 192.0.2.2"
    # A server not in resolv.conf: UDP goes direct, TCP is ordinary outbound traffic (-i '*').
    assert udp(lab, "198.51.100.1", APP) == "real"
    assert tcp(lab, "198.51.100.1", APP) == "proxy 15001 198.51.100.1:53 192.0.2.2"


def test_env_dns_capture_and_istio_meta_name(lab: Lab, resolv: Path) -> None:
    start(lab)
    lab.interceptd("apply", "--resolv-conf", str(resolv), env={"ISTIO_META_DNS_CAPTURE": "true"})
    assert udp(lab, "203.0.113.1", APP) == "agent"
    assert tcp(lab, "203.0.113.1", APP).startswith("agent 15053")


def test_capture_all_dns(lab: Lab, tmp_path: Path) -> None:
    start(lab)
    missing = tmp_path / "absent.conf"  # capture-all never reads resolv.conf
    lab.interceptd("apply", "--redirect-dns", "--capture-all-dns", "--resolv-conf", str(missing))
    for host in ("203.0.113.1", "198.51.100.1"):
        assert udp(lab, host, APP) == "agent"
        assert tcp(lab, host, APP) == f"agent 15053 {host}:53 192.0.2.2"
        assert udp(lab, host, PROXY) == "real"


def test_no_nameservers_means_no_capture(lab: Lab, tmp_path: Path) -> None:
    start(lab)
    empty = tmp_path / "resolv.conf"
    empty.write_text("search example.test\n")
    lab.interceptd("apply", "--redirect-dns", "--resolv-conf", str(empty))
    assert udp(lab, "203.0.113.1", APP) == "real"
    bad = lab.interceptd("apply", "--redirect-dns", "--resolv-conf", str(tmp_path / "nope"), check=False)
    assert bad.returncode == 2 and "--resolv-conf" in bad.stderr


def test_outbound_port_exclusion_disables_dns_capture(lab: Lab, resolv: Path) -> None:
    start(lab)
    lab.interceptd("apply", "--redirect-dns", "--resolv-conf", str(resolv), "-o", "53")
    assert udp(lab, "203.0.113.1", APP) == "real"
    assert tcp(lab, "203.0.113.1", APP) == "real 53 - 192.0.2.2"


def test_dns_over_ipv6_with_dual_stack(lab6: Lab, resolv: Path) -> None:
    start(lab6)
    lab6.interceptd("apply", "--dual-stack", "--redirect-dns", "--resolv-conf", str(resolv))
    assert udp(lab6, "2001:db8::1", APP) == "agent"
    assert tcp(lab6, "2001:db8::1", APP) == "agent 15053 2001:db8::1:53 2001:db8::2"
    assert udp(lab6, "2001:db8::1", PROXY) == "real"
    assert udp(lab6, "203.0.113.1", APP) == "agent"


def test_dns_over_ipv6_untouched_when_ipv6_is_off(lab6: Lab, resolv: Path) -> None:
    start(lab6)
    lab6.interceptd("apply", "--redirect-dns", "--resolv-conf", str(resolv))
    assert udp(lab6, "2001:db8::1", APP) == "real"
    assert tcp(lab6, "2001:db8::1", APP) == "real 53 - 2001:db8::2"
    assert udp(lab6, "203.0.113.1", APP) == "agent"
