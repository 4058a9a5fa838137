"""TPROXY inbound with real connections, policy routing owned by interceptd.

The pod's inbound listener on 15006 is transparent (IP_TRANSPARENT) and answers with the local address of
the accepted socket, which TPROXY keeps as the original destination; the client source is kept too.
"""

from __future__ import annotations

import pytest
from support.netlab import VENV_BIN, Lab, sh

TPROXY = ["-m", "TPROXY", "-i", "*", "-b", "*"]


def rules(lab: Lab, family: str = "-4") -> list[str]:
    return [line for line in sh("ip", family, "rule", ns=lab.pod).stdout.splitlines() if "proto 245" in line]


def routes(lab: Lab, family: str = "-4") -> list[str]:
    out = sh("ip", family, "route", "show", "table", "all", ns=lab.pod).stdout.splitlines()
    return [" ".join(line.split()) for line in out if "proto 245" in line]


def serve_pod(lab: Lab) -> None:
    lab.serve(lab.pod, "tp", tcp=[15006], transparent=True)
    lab.serve(lab.pod, "pod", tcp=[8080, 9080, 15001, 15008, 15090])
    lab.serve(lab.peer, "peer", tcp=[9999])


def test_tproxy_inbound_keeps_destination_and_source(lab: Lab) -> None:
    serve_pod(lab)
    lab.interceptd("apply", *TPROXY, "-d", "15090")
    assert lab.request(lab.peer, lab.pod_ip, 8080) == "tp 15006 192.0.2.2:8080 192.0.2.1"
    assert lab.request(lab.peer, lab.pod_ip, 9080) == "tp 15006 192.0.2.2:9080 192.0.2.1"
    # -d and the tunnel port are not captured (Istio TPROXYs 15008; interceptd exempts it in both modes).
    assert lab.request(lab.peer, lab.pod_ip, 15090) == "pod 15090 - 192.0.2.1"
    assert lab.request(lab.peer, lab.pod_ip, 15008) == "pod 15008 - 192.0.2.1"
    # Outbound still uses REDIRECT, the proxy's own traffic goes direct.
    assert lab.request(lab.pod, "198.51.100.1", 9999, uid=1000, gid=1000) == "pod 15001 198.51.100.1:9999 192.0.2.2"
    assert lab.request(lab.pod, "198.51.100.1", 9999, uid=1337, gid=1337).startswith("peer 9999 - ")
    assert rules(lab) == ["32765:\tfrom all fwmark 0x539 lookup 133 proto 245"]
    assert routes(lab) == ["local default dev lo table 133 proto 245 scope host"]
    assert rules(lab, "-6") == [] and routes(lab, "-6") == []  # IPv6 is off in this pod


def test_tproxy_port_list_captures_only_those_ports(lab: Lab) -> None:
    serve_pod(lab)
    lab.interceptd("apply", "-m", "TPROXY", "-b", "8080", "-t", "7", "-r", "77")
    assert lab.request(lab.peer, lab.pod_ip, 8080) == "tp 15006 192.0.2.2:8080 192.0.2.1"
    assert lab.request(lab.peer, lab.pod_ip, 9080) == "pod 9080 - 192.0.2.1"
    assert rules(lab) == ["32765:\tfrom all fwmark 0x7 lookup 77 proto 245"]


def test_second_apply_succeeds_and_reapply_replaces_routes(lab: Lab) -> None:
    serve_pod(lab)
    lab.interceptd("apply", *TPROXY)
    lab.interceptd("apply", *TPROXY)  # Istio fails here with "file exists"
    assert len(rules(lab)) == 1 and len(routes(lab)) == 1
    assert lab.request(lab.peer, lab.pod_ip, 8080) == "tp 15006 192.0.2.2:8080 192.0.2.1"
    lab.interceptd("apply", *TPROXY, "-r", "140", "-t", "1400")
    assert rules(lab) == ["32765:\tfrom all fwmark 0x578 lookup 140 proto 245"]
    assert routes(lab) == ["local default dev lo table 140 proto 245 scope host"]
    assert lab.request(lab.peer, lab.pod_ip, 8080) == "tp 15006 192.0.2.2:8080 192.0.2.1"
    lab.interceptd("apply", "-i", "*", "-b", "*")  # back to REDIRECT: the routes are no longer needed
    assert rules(lab) == [] and routes(lab) == []


def test_tproxy_without_inbound_ports_installs_no_routes(lab: Lab) -> None:
    lab.interceptd("apply", "-m", "TPROXY", "-b", "")
    assert rules(lab) == [] and routes(lab) == []


@pytest.mark.parametrize("how", ["cleanup", "istio-iptables --cleanup-only"])
def test_cleanup_removes_table_and_routes(lab6: Lab, how: str) -> None:
    lab6.interceptd("apply", *TPROXY, "--dual-stack")
    assert len(rules(lab6, "-6")) == 1 and len(routes(lab6, "-6")) == 1
    foreign = sh("ip", "rule", "add", "fwmark", "9", "lookup", "99", ns=lab6.pod)  # someone else's rule
    assert foreign.returncode == 0
    if how == "cleanup":
        lab6.interceptd("cleanup")
    else:
        assert sh(str(VENV_BIN / "istio-iptables"), "--cleanup-only", ns=lab6.pod).returncode == 0
    assert rules(lab6) == rules(lab6, "-6") == routes(lab6) == routes(lab6, "-6") == []
    assert "lookup 99" in sh("ip", "rule", ns=lab6.pod).stdout
    assert sh("nft", "list", "tables", ns=lab6.pod).stdout == ""


def test_tproxy_ipv6_dual_stack(lab6: Lab) -> None:
    serve_pod(lab6)
    lab6.interceptd("apply", *TPROXY, "--dual-stack")
    assert lab6.request(lab6.peer, lab6.pod_ip6, 8080) == "tp 15006 2001:db8::2:8080 2001:db8::1"
    assert lab6.request(lab6.peer, lab6.pod_ip, 8080) == "tp 15006 192.0.2.2:8080 192.0.2.1"
    assert lab6.request(lab6.peer, lab6.pod_ip6, 15008) == "pod 15008 - 2001:db8::1"
    assert rules(lab6, "-6") == ["32765:\tfrom all fwmark 0x539 lookup 133 proto 245"]
    assert routes(lab6, "-6") == ["local default dev lo table 133 proto 245 metric 1024 pref medium"]
