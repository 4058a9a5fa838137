"""Issue 2: the seed command line gives exactly the decisions of spec section 2.7, with real connections.

Pod 192.0.2.2 (eth0) <-> peer 192.0.2.1. The pod runs one server on the proxy ports and the app ports;
its answer names the listener that accepted and the original destination (SO_ORIGINAL_DST).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from support.netlab import VENV_BIN, Lab, sh

SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020"]
POD_PORTS = (80, 8080, 9080, 15001, 15006, 15008, 15090, 15021, 15020)


def install(lab: Lab, args: list[str], via: str = "interceptd") -> None:
    if via == "istio-iptables":
        result = sh(str(VENV_BIN / "istio-iptables"), *args, ns=lab.pod, check=False)
        assert result.returncode == 0, result.stderr
    else:
        lab.interceptd("apply", *args)


def landed(answer: str) -> tuple[str, int, str]:
    """(label, listener port, original destination) from a server's answer."""
    label, port, odst, _peer = answer.split()
    return label, int(port), odst


@pytest.fixture(params=["interceptd", "istio-iptables"])
def seeded(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Lab]:
    lab.serve(lab.pod, "pod", tcp=POD_PORTS, udp=[9999])
    lab.serve(lab.peer, "peer", tcp=[9999, 80], udp=[9999, 53])
    install(lab, SEED, via=request.param)
    yield lab


@pytest.mark.parametrize("port", [80, 8080, 9080, 15001])  # :15006 -> :15006 looks unchanged
def test_inbound_is_redirected_with_original_destination(seeded: Lab, port: int) -> None:
    answer = seeded.request(seeded.peer, seeded.pod_ip, port)
    assert landed(answer) == ("pod", 15006, f"192.0.2.2:{port}")


@pytest.mark.parametrize("port", [15008, 15090, 15021, 15020])
def test_inbound_excluded_ports_reach_the_real_port(seeded: Lab, port: int) -> None:
    assert landed(seeded.request(seeded.peer, seeded.pod_ip, port)) == ("pod", port, "-")


def test_inbound_udp_is_untouched(seeded: Lab) -> None:
    assert seeded.udp(seeded.peer, seeded.pod_ip, 9999).startswith("pod 9999 ")


# (uid, gid, destination, port) -> (listener, original destination); spec 2.7's outbound rows
OUTBOUND_ROWS = [
    (1000, 1000, "192.0.2.1", 9999, ("pod", 15001, "192.0.2.1:9999")),
    (1337, 1000, "192.0.2.1", 9999, ("peer", 9999, "-")),
    (1337, 1337, "192.0.2.1", 9999, ("peer", 9999, "-")),
    (1000, 1337, "192.0.2.1", 9999, ("peer", 9999, "-")),
    (1000, 1000, "192.0.2.2", 8080, ("pod", 8080, "-")),
    (1337, 1337, "192.0.2.2", 8080, ("pod", 15006, "192.0.2.2:8080")),
    (1000, 1337, "192.0.2.2", 8080, ("pod", 8080, "-")),
    (1337, 1337, "192.0.2.2", 15008, ("pod", 15008, "-")),
    (1337, 1337, "127.0.0.1", 8080, ("pod", 8080, "-")),
    (1337, 1337, "127.0.0.2", 8080, ("pod", 15006, "127.0.0.2:8080")),
    (1000, 1000, "127.0.0.1", 8080, ("pod", 8080, "-")),
]


@pytest.mark.parametrize(("uid", "gid", "dst", "port", "expect"), OUTBOUND_ROWS,
                         ids=[f"uid{r[0]}-gid{r[1]}-{r[2]}:{r[3]}" for r in OUTBOUND_ROWS])
def test_outbound_decisions(seeded: Lab, uid: int, gid: int, dst: str, port: int,
                            expect: tuple[str, int, str]) -> None:
    assert landed(seeded.request(seeded.pod, dst, port, uid=uid, gid=gid)) == expect


def test_validation_probe_is_in_redirected(seeded: Lab) -> None:
    answer = seeded.request(seeded.pod, "127.0.0.6", 15002, uid=1337, gid=1337, source="127.0.0.1")
    assert landed(answer) == ("pod", 15006, "127.0.0.6:15002")


def test_app_udp_is_not_redirected(seeded: Lab) -> None:
    assert seeded.udp(seeded.pod, seeded.peer_ip, 53, uid=1000, gid=1000).startswith("peer 53 ")


def test_second_apply_is_a_no_op_in_effect(seeded: Lab) -> None:
    before = json.loads(sh("nft", "-j", "list", "table", "inet", "interceptd", ns=seeded.pod).stdout)
    install(seeded, SEED)
    after = json.loads(sh("nft", "-j", "list", "table", "inet", "interceptd", ns=seeded.pod).stdout)

    def shape(doc: dict[str, list[dict[str, dict[str, object]]]]) -> list[object]:
        return [{k: {f: v for f, v in body.items() if f not in ("handle", "packets", "bytes")}}
                for item in doc["nftables"] for k, body in item.items() if k != "metainfo"]

    assert shape(before) == shape(after)
    assert landed(seeded.request(seeded.pod, "192.0.2.1", 9999, uid=1000, gid=1000))[1] == 15001


def test_cleanup_removes_everything(seeded: Lab) -> None:
    seeded.interceptd("cleanup")
    assert "interceptd" not in sh("nft", "list", "tables", ns=seeded.pod).stdout
    assert landed(seeded.request(seeded.pod, "192.0.2.1", 9999, uid=1000, gid=1000)) == ("peer", 9999, "-")
    seeded.interceptd("cleanup")  # idempotent


def test_status_shows_counters(seeded: Lab) -> None:
    for _ in range(3):
        seeded.request(seeded.pod, "192.0.2.1", 9999, uid=1000, gid=1000)
    doc = json.loads(seeded.interceptd("status", "--json").stdout)
    rules = {(c["name"], r["name"]): r["packets"] for c in doc["chains"] for r in c["rules"]}
    assert rules[("istio-redirect", "redirect-outbound")] == 3
    text = seeded.interceptd("status").stdout
    assert "redirect-outbound" in text and "Chain istio-output" in text


class TestLists:
    """-b port lists, -q/-o outbound ports, -i CIDR lists with -x exclusions."""

    def test_inbound_port_list(self, lab: Lab) -> None:
        lab.serve(lab.pod, "pod", tcp=POD_PORTS)
        lab.interceptd("apply", "-b", "80,8080", "-i", "")
        assert landed(lab.request(lab.peer, lab.pod_ip, 80))[1:] == (15006, "192.0.2.2:80")
        assert landed(lab.request(lab.peer, lab.pod_ip, 8080))[1] == 15006
        assert landed(lab.request(lab.peer, lab.pod_ip, 9080))[1] == 9080
        assert landed(lab.request(lab.peer, lab.pod_ip, 15008))[1] == 15008

    def test_exclude_ports_ignored_with_a_port_list(self, lab: Lab) -> None:
        lab.serve(lab.pod, "pod", tcp=POD_PORTS)
        lab.interceptd("apply", "-b", "80", "-d", "80")  # -d only counts with -b '*' (Istio)
        assert landed(lab.request(lab.peer, lab.pod_ip, 80))[1] == 15006

    def test_outbound_ports_without_cidrs(self, lab: Lab) -> None:
        lab.serve(lab.pod, "pod", tcp=POD_PORTS)
        lab.serve(lab.peer, "peer", tcp=[9999, 80])
        lab.interceptd("apply", "-i", "", "-q", "80")
        assert landed(lab.request(lab.pod, lab.peer_ip, 80, uid=1000, gid=1000))[1:] == (15001, "192.0.2.1:80")
        assert landed(lab.request(lab.pod, lab.peer_ip, 9999, uid=1000, gid=1000))[0] == "peer"

    def test_outbound_exclude_ports(self, lab: Lab) -> None:
        lab.serve(lab.pod, "pod", tcp=POD_PORTS)
        lab.serve(lab.peer, "peer", tcp=[9999, 80])
        lab.interceptd("apply", "-i", "*", "-o", "9999")
        assert landed(lab.request(lab.pod, lab.peer_ip, 9999, uid=1000, gid=1000))[0] == "peer"
        assert landed(lab.request(lab.pod, lab.peer_ip, 80, uid=1000, gid=1000))[1] == 15001

    def test_cidr_lists_with_exclusions(self, lab: Lab) -> None:
        lab.serve(lab.pod, "pod", tcp=POD_PORTS)
        lab.serve(lab.peer, "peer", tcp=[9999, 80])
        lab.interceptd("apply", "-i", "198.51.100.0/24,203.0.113.0/24", "-x", "203.0.113.0/25", "-q", "80")
        assert landed(lab.request(lab.pod, "198.51.100.1", 9999, uid=1000, gid=1000)) == \
            ("pod", 15001, "198.51.100.1:9999")
        assert landed(lab.request(lab.pod, "203.0.113.1", 9999, uid=1000, gid=1000))[0] == "peer"
        assert landed(lab.request(lab.pod, lab.peer_ip, 9999, uid=1000, gid=1000))[0] == "peer"
        # -x wins over -q (Istio: the exclusions come first)
        assert landed(lab.request(lab.pod, "203.0.113.1", 80, uid=1000, gid=1000))[0] == "peer"
        assert landed(lab.request(lab.pod, lab.peer_ip, 80, uid=1000, gid=1000))[1] == 15001

    def test_reapply_with_other_lists_replaces_them(self, lab: Lab) -> None:
        lab.serve(lab.pod, "pod", tcp=POD_PORTS)
        lab.serve(lab.peer, "peer", tcp=[9999])
        lab.interceptd("apply", "-i", "*", "-x", "192.0.2.1/32")
        assert landed(lab.request(lab.pod, lab.peer_ip, 9999, uid=1000, gid=1000))[0] == "peer"
        lab.interceptd("apply", "-i", "*", "-x", "203.0.113.0/24")
        assert landed(lab.request(lab.pod, lab.peer_ip, 9999, uid=1000, gid=1000))[1] == 15001
        lab.interceptd("apply", "-i", "*")
        sets = sh("nft", "list", "sets", "table", "inet", "interceptd", ns=lab.pod).stdout
        assert "exclude-cidrs-v4" not in sets  # nothing the new config does not need is left behind


def test_unchanged_sets_are_not_rewritten_on_reapply(lab: Lab) -> None:
    """The kernel lists our sets exactly as we render them, so a re-apply leaves unchanged sets alone."""
    from support.netlab import call_in

    args = {"service_cidr": "*", "service_exclude_cidr": "10.0.0.0/8,192.0.2.1,198.51.100.0/25,2001:db8::/40",
            "inbound_ports": "*", "local_exclude_ports": "15090,15020-15021,22", "outbound_ports": "8000-8100",
            "proxy_uid": "1337,0", "exclude_interfaces": "eth9", "dual_stack": "true"}

    def plan(exclude: str) -> list[str]:
        from interceptd.config import load
        from interceptd.control import install
        from interceptd.ruleset.nftjson import Existing, transaction
        from interceptd.ruleset.render import render
        from interceptd.system import host
        from interceptd.system.kernel import NftKernel
        from interceptd.system.routes import Netlink

        config = load({**args, "service_exclude_cidr": exclude}, {})
        kernel = NftKernel()
        ruleset = render(config, host.detect(config, ipv6_override=True))
        install.apply(kernel, Netlink(), render(load(args, {}), host.detect(config, ipv6_override=True)))
        doc = transaction(ruleset, Existing.from_listing(kernel.list_table("interceptd") or []))
        return [c["flush"]["set"]["name"] for c in doc["nftables"] if "set" in c.get("flush", {})]

    assert call_in(lab.pod, plan, args["service_exclude_cidr"]) == []
    assert call_in(lab.pod, plan, "10.0.0.0/8,192.0.2.2,198.51.100.0/25,2001:db8::/40") == ["exclude-cidrs-v4"]
