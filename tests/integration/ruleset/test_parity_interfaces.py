"""Kube-virt interfaces (-k) and excluded interfaces (-c), with a second veth.

A "vm" namespace (192.0.2.130/25) sits behind the pod's virt0 (192.0.2.129/25), as a KubeVirt VM does;
the peer stays on eth0.
"""

from __future__ import annotations

import pytest
from support.netlab import Lab


@pytest.fixture
def vm(lab: Lab) -> tuple[Lab, str]:
    ns = lab.attach("virt0", "192.0.2.129/25", "192.0.2.130/25")
    lab.serve(lab.pod, "pod", tcp=[8080, 15001, 15006])
    lab.serve(ns, "vm", tcp=[9999])
    lab.serve(lab.peer, "peer", tcp=[9999])
    return lab, ns


def test_kube_virt_traffic_is_outbound(vm: tuple[Lab, str]) -> None:
    lab, ns = vm
    lab.interceptd("apply", "-k", "virt0", "-i", "*", "-b", "*")
    assert lab.request(ns, "203.0.113.1", 9999) == "pod 15001 203.0.113.1:9999 192.0.2.130"
    assert lab.request(ns, lab.pod_ip, 8080) == "pod 15001 192.0.2.2:8080 192.0.2.130"
    # The same connection from the peer is inbound.
    assert lab.request(lab.peer, lab.pod_ip, 8080) == "pod 15006 192.0.2.2:8080 192.0.2.1"


def test_kube_virt_with_cidr_list(vm: tuple[Lab, str]) -> None:
    lab, ns = vm
    lab.interceptd("apply", "-k", "virt0", "-i", "203.0.113.0/24", "-b", "*")
    assert lab.request(ns, "203.0.113.1", 9999) == "pod 15001 203.0.113.1:9999 192.0.2.130"
    # Not in -i: not outbound, and never inbound-captured either.
    assert lab.request(ns, lab.pod_ip, 8080) == "pod 8080 - 192.0.2.130"


def test_excluded_interface_is_untouched(vm: tuple[Lab, str]) -> None:
    lab, ns = vm
    lab.interceptd("apply", "-c", "virt0", "-i", "*", "-b", "*")
    assert lab.request(ns, lab.pod_ip, 8080) == "pod 8080 - 192.0.2.130"
    assert lab.request(lab.pod, "192.0.2.130", 9999, uid=1000, gid=1000) == "vm 9999 - 192.0.2.129"
    assert lab.request(lab.peer, lab.pod_ip, 8080) == "pod 15006 192.0.2.2:8080 192.0.2.1"
    assert lab.request(lab.pod, "198.51.100.1", 9999, uid=1000, gid=1000) == \
        "pod 15001 198.51.100.1:9999 192.0.2.2"


def test_excluded_interface_is_untouched_in_tproxy_mode(vm: tuple[Lab, str]) -> None:
    lab, ns = vm
    lab.serve(lab.pod, "tp", tcp=[15016], transparent=True)
    lab.interceptd("apply", "-m", "TPROXY", "-z", "15016", "-c", "virt0", "-i", "*", "-b", "*")
    assert lab.request(ns, lab.pod_ip, 8080) == "pod 8080 - 192.0.2.130"
    assert lab.request(lab.peer, lab.pod_ip, 8080) == "tp 15016 192.0.2.2:8080 192.0.2.1"
