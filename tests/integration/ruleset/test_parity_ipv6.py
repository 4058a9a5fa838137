"""IPv6. Dual-stack pods get the same decisions for IPv6, with the ::1 and
::6 exemptions; when IPv6 is off, IPv6 traffic is left entirely alone (as Istio's iptables backend does).

The lab6 pod has 192.0.2.2 before 2001:db8::2, so without --dual-stack the first address (IPv4) decides.
"""

from __future__ import annotations

from support.netlab import Lab, sh

APP = {"uid": 1000, "gid": 1000}
PROXY = {"uid": 1337, "gid": 1337}


def serve(lab: Lab) -> None:
    lab.serve(lab.pod, "pod", tcp=[8080, 15001, 15006])
    lab.serve(lab.peer, "peer", tcp=[9999])


def lo6(lab: Lab) -> str:
    return sh("ip", "-6", "addr", "show", "dev", "lo", ns=lab.pod).stdout


def test_dual_stack_captures_ipv6_like_ipv4(lab6: Lab) -> None:
    serve(lab6)
    lab6.interceptd("apply", "--dual-stack", "-i", "*", "-b", "*")
    assert "inet6 ::6/128" in lo6(lab6)
    assert lab6.request(lab6.peer, lab6.pod_ip6, 8080) == "pod 15006 2001:db8::2:8080 2001:db8::1"
    assert lab6.request(lab6.pod, lab6.peer_ip6, 9999, **APP) == "pod 15001 2001:db8::1:9999 2001:db8::2"
    assert lab6.request(lab6.pod, lab6.peer_ip6, 9999, **PROXY) == "peer 9999 - 2001:db8::2"
    # ::1 is never captured; the proxy to its own pod over lo is in-redirected, except from ::6.
    assert lab6.request(lab6.pod, "::1", 8080, **PROXY) == "pod 8080 - ::1"
    assert lab6.request(lab6.pod, lab6.pod_ip6, 8080, **PROXY) == "pod 15006 2001:db8::2:8080 2001:db8::2"
    assert lab6.request(lab6.pod, lab6.pod_ip6, 8080, source="::6", **PROXY) == "pod 8080 - ::6"
    assert lab6.request(lab6.pod, lab6.pod_ip6, 8080, **APP) == "pod 8080 - 2001:db8::2"
    # IPv4 keeps working alongside.
    assert lab6.request(lab6.peer, lab6.pod_ip, 8080) == "pod 15006 192.0.2.2:8080 192.0.2.1"
    lab6.interceptd("apply", "--dual-stack", "-i", "*", "-b", "*")  # ::6 already there: fine


def test_ipv6_cidr_lists_only_with_ipv6(lab6: Lab) -> None:
    serve(lab6)
    lab6.interceptd("apply", "--dual-stack", "-i", "2001:db8::1/128")
    assert lab6.request(lab6.pod, lab6.peer_ip6, 9999, **APP) == "pod 15001 2001:db8::1:9999 2001:db8::2"
    assert lab6.request(lab6.pod, lab6.peer_ip, 9999, **APP) == "peer 9999 - 192.0.2.2"
    lab6.interceptd("apply", "--dual-stack", "-i", "*", "-x", "2001:db8::1/128")
    assert lab6.request(lab6.pod, lab6.peer_ip6, 9999, **APP) == "peer 9999 - 2001:db8::2"
    assert lab6.request(lab6.pod, lab6.peer_ip, 9999, **APP) == "pod 15001 192.0.2.1:9999 192.0.2.2"


def test_ipv6_off_leaves_ipv6_alone(lab6: Lab) -> None:
    serve(lab6)
    lab6.interceptd("apply", "-i", "*", "-b", "*", "-q", "9999", "-o", "7")
    assert "::6" not in lo6(lab6)
    # Istio's nft backend would capture these; its iptables backend and interceptd do not.
    assert lab6.request(lab6.peer, lab6.pod_ip6, 8080) == "pod 8080 - 2001:db8::1"
    assert lab6.request(lab6.pod, lab6.peer_ip6, 9999, **APP) == "peer 9999 - 2001:db8::2"
    assert lab6.request(lab6.peer, lab6.pod_ip, 8080) == "pod 15006 192.0.2.2:8080 192.0.2.1"
    assert lab6.request(lab6.pod, lab6.peer_ip, 9999, **APP) == "pod 15001 192.0.2.1:9999 192.0.2.2"


def test_first_ipv6_address_turns_ipv6_on_without_dual_stack(lab6: Lab) -> None:
    serve(lab6)
    sh("ip", "addr", "del", "192.0.2.2/24", "dev", "eth0", ns=lab6.pod)
    lab6.interceptd("apply", "-i", "*", "-b", "*")
    assert "inet6 ::6/128" in lo6(lab6)
    assert lab6.request(lab6.peer, lab6.pod_ip6, 8080) == "pod 15006 2001:db8::2:8080 2001:db8::1"
