"""Proxy uids/gids (several of them), owner groups, and the IPv4 loopback CIDR.

"Never loops" = the proxy's own connection to the original destination reaches the real server instead of
being captured back into the proxy.
"""

from __future__ import annotations

import grp

import pytest
from support.netlab import Lab

CAPTURED = "pod 15001 198.51.100.1:9999 192.0.2.2"
DIRECT = "peer 9999 - 192.0.2.2"
IN_REDIRECTED = "pod 15006 192.0.2.2:8080 192.0.2.2"
TO_APP = "pod 8080 - 192.0.2.2"


@pytest.fixture
def served(lab: Lab) -> Lab:
    lab.serve(lab.pod, "pod", tcp=[8080, 15001, 15006])
    lab.serve(lab.peer, "peer", tcp=[9999])
    return lab


def out(lab: Lab, uid: int, gid: int) -> str:
    return lab.request(lab.pod, "198.51.100.1", 9999, uid=uid, gid=gid)


def own_pod(lab: Lab, uid: int, gid: int, host: str = "192.0.2.2") -> str:
    return lab.request(lab.pod, host, 8080, uid=uid, gid=gid)


def test_each_of_several_proxy_uids_behaves_as_a_lone_proxy_uid(served: Lab) -> None:
    served.interceptd("apply", "-u", "1337,1338", "-i", "*", "-b", "*")
    for uid in (1337, 1338):
        assert out(served, uid, uid) == DIRECT
        assert out(served, uid, 1000) == DIRECT
        # Istio: 1338's in-redirect is shadowed by 1337's lo exemption; interceptd redirects both.
        assert own_pod(served, uid, 1000) == IN_REDIRECTED
    assert out(served, 1000, 1000) == CAPTURED
    assert out(served, 1000, 1338) == DIRECT  # -g defaults to the -u list
    assert own_pod(served, 1000, 1000) == TO_APP


def test_several_proxy_gids(served: Lab) -> None:
    served.interceptd("apply", "-u", "1337", "-g", "1337,1339", "-i", "*")
    assert out(served, 1000, 1339) == DIRECT
    assert out(served, 1000, 1337) == DIRECT
    assert out(served, 1000, 1000) == CAPTURED
    assert own_pod(served, 1000, 1339) == TO_APP  # the uid lo exemption comes first, as in Istio


def test_owner_groups_include(served: Lab) -> None:
    served.interceptd("apply", "-i", "*", env={"ISTIO_OUTBOUND_OWNER_GROUPS": "2000,2001"})
    assert out(served, 1000, 2000) == CAPTURED
    assert out(served, 1000, 2001) == CAPTURED
    assert out(served, 1000, 3000) == DIRECT
    assert out(served, 1337, 2000) == DIRECT


def test_owner_groups_include_by_name(served: Lab) -> None:
    name = grp.getgrgid(1).gr_name
    served.interceptd("apply", "-i", "*", env={"ISTIO_OUTBOUND_OWNER_GROUPS": name})
    assert out(served, 1000, 1) == CAPTURED
    assert out(served, 1000, 2000) == DIRECT


def test_owner_groups_exclude(served: Lab) -> None:
    served.interceptd("apply", "-i", "*", env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "3000"})
    assert out(served, 1000, 3000) == DIRECT
    assert out(served, 1000, 2000) == CAPTURED


def test_owner_groups_set_but_empty_captures_nothing_outbound(served: Lab) -> None:
    served.interceptd("apply", "-i", "*", "-b", "*", env={"ISTIO_OUTBOUND_OWNER_GROUPS": ""})
    assert out(served, 1000, 1000) == DIRECT
    assert served.request(served.peer, served.pod_ip, 8080) == "pod 15006 192.0.2.2:8080 192.0.2.1"


def test_unknown_group_name_is_refused_before_anything_changes(served: Lab) -> None:
    served.interceptd("apply", "-i", "*")
    before = served.nft_json()
    result = served.interceptd("apply", "-i", "*", check=False,
                               env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "no-such-group"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "outbound_owner_groups_exclude" in lines[0]
    assert lines[0].endswith("unknown group 'no-such-group'")
    assert served.nft_json() == before


def test_ipv4_loopback_cidr(served: Lab) -> None:
    served.interceptd("apply", "-i", "*")
    assert own_pod(served, 1337, 1337, "127.0.0.2") == "pod 15006 127.0.0.2:8080 127.0.0.1"
    assert own_pod(served, 1337, 1337, "127.0.0.1") == "pod 8080 - 127.0.0.1"
    served.interceptd("apply", "-i", "*", env={"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.0/8"})
    assert own_pod(served, 1337, 1337, "127.0.0.2") == "pod 8080 - 127.0.0.1"
    assert own_pod(served, 1000, 1000, "127.0.0.2") == "pod 8080 - 127.0.0.1"
    assert out(served, 1000, 1000) == CAPTURED
