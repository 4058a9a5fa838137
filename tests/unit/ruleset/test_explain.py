"""explain: the pure evaluator on the rule model, the kernel-listing parser, the trace message parser."""

from __future__ import annotations

import argparse
import ipaddress
import struct

import pytest

from interceptd.cli.explaincmd import add_arguments, connection, split_hostport
from interceptd.config import Config, load
from interceptd.config.values import parse_cidr
from interceptd.errors import ConfigError, UnexplainableError
from interceptd.ruleset import names as N
from interceptd.ruleset.explain import Connection, as_json, borrow_why, explain, format_text
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Chain, Hook, Match, Rule, Ruleset, TProxy
from interceptd.ruleset.nftjson import Existing, transaction
from interceptd.ruleset.nftparse import parse_listing, rule_handles
from interceptd.ruleset.render import render
from interceptd.system.fake import FakeKernel
from interceptd.system.trace import NFT_MSG_TRACE, Observed, Report, frame, internet_checksum, parse_messages

IP = ipaddress.ip_address
POD, PEER = "192.0.2.2", "192.0.2.1"
V4 = HostFacts(ipv6=False, host_ip=POD)
V6 = HostFacts(ipv6=True, host_ip=POD)
# Spec 2.7: istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020
SEED = {"envoy_port": "15001", "inbound_capture_port": "15006", "proxy_uid": "1337", "service_cidr": "*",
        "inbound_ports": "*", "local_exclude_ports": "15090,15021,15020"}


def cfg(**flags: str) -> Config:
    return load({**SEED, **flags}, {})


def out(dst: str, port: int, uid: int = 1000, gid: int = 1000, proto: str = "tcp", src: str | None = None
        ) -> Connection:
    address = IP(dst)
    local = address.is_loopback or dst in (POD, "2001:db8::2")
    source = IP(src) if src else (IP("127.0.0.1" if address.version == 4 else "::1") if address.is_loopback
                                  else IP(POD if address.version == 4 else "2001:db8::2"))
    return Connection("outbound", proto, address, port, source, 40000, uid, gid, oif="lo" if local else "eth0")


def inbound(port: int, proto: str = "tcp", dst: str = POD, src: str = PEER, iif: str = "eth0") -> Connection:
    return Connection("inbound", proto, IP(dst), port, IP(src), 40000, iif=iif)


def verdict(conn: Connection, config: Config | None = None, facts: HostFacts = V4) -> tuple[str, str, int]:
    v = explain(render(config or cfg(), facts), conn).verdict
    return v.action, v.address, v.port


# Every row of the seed's decision table in docs/istio-compatibility.md (pod 192.0.2.2, peer 192.0.2.1).
SPEC_ROWS = [
    *[(inbound(p), ("redirect", "primary address of eth0", 15006)) for p in (80, 8080, 15001, 15006)],
    *[(inbound(p), ("none", POD, p)) for p in (15008, 15090, 15021, 15020)],
    (inbound(53, "udp"), ("none", POD, 53)),
    (out(PEER, 9999), ("redirect", "127.0.0.1", 15001)),
    (out(PEER, 9999, uid=1337), ("none", PEER, 9999)),
    (out(PEER, 9999, uid=1337, gid=1337), ("none", PEER, 9999)),
    (out(PEER, 9999, gid=1337), ("none", PEER, 9999)),
    (out(POD, 8080), ("none", POD, 8080)),
    (out(POD, 8080, uid=1337), ("redirect", "127.0.0.1", 15006)),
    (out(POD, 8080, gid=1337), ("none", POD, 8080)),
    (out(POD, 15008, uid=1337), ("none", POD, 15008)),
    (out("127.0.0.1", 8080, uid=1337), ("none", "127.0.0.1", 8080)),
    (out("127.0.0.2", 8080, uid=1337), ("redirect", "127.0.0.1", 15006)),
    (out("127.0.0.6", 15002, uid=1337, src="127.0.0.1"), ("redirect", "127.0.0.1", 15006)),
    (out(PEER, 53, proto="udp"), ("none", PEER, 53)),
]


@pytest.mark.parametrize(("conn", "expected"), SPEC_ROWS, ids=[c.describe() for c, _ in SPEC_ROWS])
def test_seed_decision_table(conn: Connection, expected: tuple[str, str, int]) -> None:
    assert verdict(conn) == expected


def test_path_names_rules_and_says_why() -> None:
    result = explain(render(cfg(), V4), out(PEER, 9999))
    text = format_text(result)
    assert "no    proxy-uid-return: uid 1000 is not in proxy-uids {1337}" in text
    assert "MATCH redirect-outbound-all" in text
    assert "verdict: redirected to the proxy's outbound listener :15001 (127.0.0.1:15001), original destination " \
           "192.0.2.1:9999 kept" in text
    assert result.verdict.rule == N.counter_name(N.ISTIO_REDIRECT, N.RULE_REDIRECT_OUTBOUND)
    assert result.matched() == [N.counter_name(chain, rule) for chain, rule in (
        (N.OUTPUT, N.ENTRY), (N.OUTPUT, N.RULE_OUTPUT_JUMP), (N.ISTIO_OUTPUT, N.ENTRY),
        (N.ISTIO_OUTPUT, N.RULE_REDIRECT_OUTBOUND_ALL), (N.ISTIO_REDIRECT, N.ENTRY),
        (N.ISTIO_REDIRECT, N.RULE_REDIRECT_OUTBOUND))]
    assert as_json(result)["matched"] == result.matched()


def test_redirected_connection_comes_back_on_lo_without_nat_prerouting() -> None:
    steps = explain(render(cfg(), V4), out(PEER, 9999)).steps
    hooks = [s.reason for s in steps if s.kind == "hook"]
    assert hooks == ["output: tcp 192.0.2.2:40000 -> 192.0.2.1:9999 oif eth0",
                     "prerouting: tcp 192.0.2.2:40000 -> 127.0.0.1:15001 iif lo"]
    assert not [s for s in steps if s.kind == "chain" and s.chain == N.PREROUTING]


def test_missing_headers_and_sockets_never_match_even_negated() -> None:
    rs = render(cfg(), V6)
    # ip daddr != 127.0.0.1 does not hold for IPv6: only the v6 twin of the in-redirect rule can match.
    result = explain(rs, out("2001:db8::2", 8080, uid=1337))
    assert N.counter_name(N.ISTIO_OUTPUT, N.per_family(N.UID.in_redirect, 6)) in result.matched()
    assert N.counter_name(N.ISTIO_OUTPUT, N.UID.in_redirect) not in result.matched()
    tried = next(s for s in result.steps if s.rule == N.UID.in_redirect)
    assert tried.reason == "not an IPv4 packet (ip daddr does not apply)"
    # tcp dport != {53, 15008} does not hold for UDP.
    udp = explain(render(cfg(redirect_dns="true", capture_all_dns="true"), V4), out(POD, 8080, uid=1337,
                                                                                    proto="udp"))
    assert N.counter_name(N.ISTIO_OUTPUT, N.UID.in_redirect) not in udp.matched()
    # An inbound packet has no socket: skuid tests fail both ways.
    rule = Rule("owner", (Match("skuid", 1000, negate=True),), ())
    rs2 = Ruleset("t", (Chain("pre", (rule,), Hook("nat", "prerouting", -100)),))
    step = next(s for s in explain(rs2, inbound(80)).steps if s.kind == "rule")
    assert not step.matched and "no local socket" in step.reason


def test_sets_ranges_prefixes_and_exclusions() -> None:
    config = cfg(service_cidr="198.51.100.0/24", service_exclude_cidr="198.51.100.128/25",
                 outbound_ports="3306", local_outbound_ports_exclude="8000-8100", local_exclude_ports="9000-9100")
    assert verdict(out("198.51.100.1", 80), config)[0] == "redirect"
    assert verdict(out("198.51.100.200", 80), config)[0] == "none"  # -x wins over -i
    assert verdict(out("203.0.113.1", 80), config)[0] == "none"  # not in -i
    assert verdict(out("203.0.113.1", 3306), config)[0] == "redirect"  # -q
    assert verdict(out("198.51.100.1", 8050), config)[0] == "none"  # -o range
    assert verdict(inbound(9050), config)[0] == "none"  # -d range
    assert verdict(inbound(9101), config)[0] == "redirect"
    reason = next(s.reason for s in explain(render(config, V4), out("203.0.113.1", 80)).steps
                  if s.rule == N.RULE_REDIRECT_OUTBOUND_CIDRS)
    assert reason == "ip daddr 203.0.113.1 is not in include-cidrs-v4 {198.51.100.0/24}"


def test_inbound_list_excluded_interface_and_ipv6_off() -> None:
    config = cfg(inbound_ports="80,8000-8080", exclude_interfaces="eth1")
    assert verdict(inbound(8080), config)[0] == "redirect"
    assert verdict(inbound(9090), config)[0] == "none"
    assert verdict(inbound(80, iif="eth1"), config)[0] == "none"
    assert verdict(out(PEER, 80), config)[0] == "redirect"
    # IPv6 off: v6 packets return at the head of every base chain.
    result = explain(render(cfg(), V4), inbound(80, dst="2001:db8::2", src="2001:db8::1"))
    assert result.verdict.action == "none"
    assert N.counter_name(N.PREROUTING, N.RULE_IPV6_DISABLED_RETURN) in result.matched()


def test_dns_capture() -> None:
    facts = HostFacts(ipv6=False, host_ip=POD, dns_v4=(IP("192.0.2.1"),))  # type: ignore[arg-type]
    config = cfg(redirect_dns="true")
    assert verdict(out(PEER, 53, proto="udp"), config, facts) == ("redirect", "127.0.0.1", 15053)
    assert verdict(out("198.51.100.1", 53, proto="udp"), config, facts) == ("none", "198.51.100.1", 53)
    assert verdict(out(PEER, 53, uid=1337, proto="udp"), config, facts)[0] == "none"
    result = explain(render(config, facts), out(PEER, 53, proto="udp"))
    assert N.counter_name(N.RAW_OUTPUT, N.RULE_APP_DNS_ZONE) in result.matched()
    assert verdict(out(PEER, 53, proto="udp"), cfg(redirect_dns="true", local_outbound_ports_exclude="53"),
                   facts)[0] == "none"


def test_tproxy_inbound_and_listener_presence() -> None:
    config = cfg(inbound_interception_mode="TPROXY")
    rs = render(config, V4)
    result = explain(rs, inbound(8080))
    assert result.verdict.action == "tproxy" and result.verdict.port == 15006
    assert N.counter_name(N.ISTIO_TPROXY, N.RULE_TPROXY) in result.matched()
    assert N.counter_name(N.PREROUTING, N.ENTRY) in result.matched()  # accept ends mangle prerouting only
    silent = explain(rs, inbound(8080), tproxy_listening=False)
    assert silent.verdict.action == "none"
    assert N.counter_name(N.ISTIO_TPROXY, N.RULE_TPROXY) not in silent.matched()
    assert explain(rs, inbound(15008)).verdict.action == "none"
    # The proxy calling its own pod over lo: marked 1338 in mangle output, NATed to :15006 by nat output.
    own = explain(rs, out(POD, 8080, uid=1337))
    assert N.counter_name(N.MANGLE_OUTPUT, N.UID.outbound_mark) in own.matched()
    assert own.verdict.action == "redirect"


def test_drop_invalid_is_not_hit_by_a_new_connection() -> None:
    result = explain(render(cfg(drop_invalid="true"), V4), inbound(80))
    step = next(s for s in result.steps if s.rule == N.RULE_DROP_INVALID)
    assert not step.matched and step.reason == "ct state new is not invalid"


def _through_fake_kernel(config: Config, facts: HostFacts) -> Ruleset:
    kernel = FakeKernel()
    kernel.apply(transaction(render(config, facts), Existing.empty()))
    listing = kernel.list_table(config.table)
    assert listing is not None
    for n, item in enumerate(i for i in listing if "rule" in i):
        item["rule"]["handle"] = n + 1
    return parse_listing(config.table, listing)


CONNS = [out(PEER, 9999), out(PEER, 9999, uid=1337), out(POD, 8080, uid=1337), out("127.0.0.2", 80, uid=1337),
         out(PEER, 53, proto="udp"), out("198.51.100.7", 8050), inbound(80), inbound(15008), inbound(9050),
         out("2001:db8::1", 80), out("2001:db8::2", 80, uid=1337), inbound(80, dst="2001:db8::2", src="2001:db8::1")]
CONFIGS = [cfg(), cfg(inbound_interception_mode="TPROXY", local_outbound_ports_exclude="8000-8100"),
           cfg(redirect_dns="true", capture_all_dns="true", service_cidr="198.51.100.0/24,2001:db8::/64",
               service_exclude_cidr="198.51.100.0/28", inbound_ports="80,9000-9100")]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("facts", [V4, V6])
def test_parsed_listing_decides_like_the_rendered_model(config: Config, facts: HostFacts) -> None:
    rendered = render(config, facts)
    parsed = _through_fake_kernel(config, facts)
    assert [c.name for c in parsed.chains] == [c.name for c in rendered.chains]
    for conn in CONNS:
        a, b = explain(rendered, conn), explain(parsed, conn)
        assert (a.matched(), a.verdict) == (b.matched(), b.verdict), conn.describe()
    withwhy = borrow_why(parsed, rendered)
    assert [r.why for c in withwhy.chains for r in c.rules] == [r.why for c in rendered.chains for r in c.rules]


def test_parser_reads_the_kernels_spelling() -> None:
    # What nft 1.0.6 lists: the `meta l4proto tcp` guarding `tcp dport` is hidden, /32 printed as an address.
    rule = {"family": "inet", "table": "t", "chain": "c", "handle": 7, "comment": "r", "expr": [
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "127.0.0.1"}},
        {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                   "right": {"set": [53, {"range": [15000, 15010]}]}}},
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
        {"counter": "c/r"}, {"tproxy": {"family": "ip", "port": 15006}}]}
    rs = parse_listing("t", [{"chain": {"family": "inet", "table": "t", "name": "c", "handle": 1}},
                             {"rule": rule}])
    parsed = rs.chain("c").rules[0]
    assert parsed.matches[0] == Match("ip daddr", parse_cidr("127.0.0.1/32"), True)
    assert parsed.matches[2].value == ("established", "related")
    assert parsed.actions == (TProxy("ip", 15006),)
    assert rule_handles([{"rule": rule}]) == {("c", 7): "r"}
    with pytest.raises(UnexplainableError, match="queue"):
        parse_listing("t", [{"rule": {**rule, "expr": [{"queue": {"num": 1}}]}}])


def _nla(kind: int, payload: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(payload), kind) + payload
    return body + b"\0" * (-len(body) % 4)


def test_trace_messages_are_parsed() -> None:
    attrs = (_nla(1, b"interceptd\0") + _nla(2, b"istio-output\0") + _nla(3 | 0x4000, struct.pack("!Q", 42))
             + _nla(4 | 0x4000, struct.pack("!I", 3)) + _nla(5 | 0x8000, _nla(1, struct.pack("!i", -3))))
    body = struct.pack("=BBH", 1, 0, 0) + attrs
    message = struct.pack("=IHHII", 16 + len(body), NFT_MSG_TRACE, 0, 0, 0) + body
    policy = struct.pack("=IHHII", 16 + 4 + 12, NFT_MSG_TRACE, 0, 0, 0) + struct.pack("=BBH", 1, 0, 0) + \
        _nla(4, struct.pack("!I", 1)) + _nla(1, b"t\0\0")
    events = parse_messages(message + policy)
    assert [(e.table, e.chain, e.handle, e.verdict) for e in events] == [("interceptd", N.ISTIO_OUTPUT, 42, "jump")]


def test_probe_frame_checksums() -> None:
    for src, dst in ((PEER, POD), ("2001:db8::1", "2001:db8::2")):
        conn = inbound(8080, dst=dst, src=src)
        data = frame(conn, 41000, b"\x02" * 6, b"\x04" * 6)
        if conn.family == 4:
            assert internet_checksum(data[14:34]) == 0
            l4 = data[34:]
            pseudo = conn.src.packed + conn.dst.packed + struct.pack("!BBH", 0, 6, len(l4))
        else:
            l4 = data[54:]
            pseudo = conn.src.packed + conn.dst.packed + struct.pack("!IxxxB", len(l4), 6)
        assert internet_checksum(pseudo + l4) == 0
        assert struct.unpack("!HH", l4[:4]) == (41000, 8080)


def test_report_says_where_model_and_kernel_part() -> None:
    model = explain(render(cfg(), V4), out(PEER, 9999))
    same = Report(tuple(model.matched()), Observed(tuple(model.matched()), ("?",) * 6, (), ""))
    assert same.agree and "kernel agrees" in same.text()
    cut = tuple(model.matched()[:3])
    differ = Report(tuple(model.matched()), Observed(cut, ("?",) * 3, ("nat",), ""))
    assert not differ.agree
    assert "DISAGREE" in differ.text() and "first difference at match #4" in differ.text()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_connection_parsing() -> None:
    assert split_hostport("[2001:db8::1]:443", "--dst") == (IP("2001:db8::1"), 443)
    assert split_hostport("2001:db8::1", "--dst") == (IP("2001:db8::1"), None)
    assert split_hostport("10.0.0.1:80", "--dst") == (IP("10.0.0.1"), 80)
    conn = connection(_args("--dst", "198.51.100.1:80", "--src", "192.0.2.2", "--oif", "eth0", "--uid", "0",
                            "--gid", "root", "--protocol", "udp"))
    assert (conn.uid, conn.gid, conn.protocol, conn.oif) == (0, 0, "udp", "eth0")
    conn = connection(_args("--inbound", "--dst-addr", "192.0.2.2", "--dst-port", "8080", "--src",
                            "192.0.2.1:5555", "--iif", "eth0"))
    assert (conn.direction, conn.dport, conn.sport, conn.uid) == ("inbound", 8080, 5555, None)
    for bad, flag in ((["--dst", "300.1.1.1:80"], "--dst"), (["--dst", "10.0.0.1:0"], "--dst"),
                      (["--dst", "10.0.0.1"], "--dst"), (["--dst", "10.0.0.1:80", "--uid", "nosuchuser-x",
                                                          "--oif", "eth0", "--src", "10.0.0.2"], "--uid"),
                      (["--dst", "10.0.0.1:80", "--src", "2001:db8::1", "--oif", "eth0"], "--src")):
        with pytest.raises(ConfigError, match=flag):
            connection(_args(*bad))

