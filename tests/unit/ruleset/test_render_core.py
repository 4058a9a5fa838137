"""The pure core: render (Config + HostFacts -> Ruleset), the JSON transaction and the in-memory kernel."""

from __future__ import annotations

import ipaddress

from interceptd.config import OPTIONS_BY_KEY, Config, load
from interceptd.config.values import parse_cidr
from interceptd.control import install
from interceptd.errors import ConfigError
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Jump, Redirect, Return, SetRef
from interceptd.ruleset.nftjson import Existing, normalise, transaction
from interceptd.ruleset.render import SET_SOURCE, render
from interceptd.system.fake import FakeKernel, FakeRouter
from interceptd.system.host import decide_ipv6, parse_resolv_conf

V4 = HostFacts(ipv6=False, host_ip="192.0.2.2")
SEED = {"envoy_port": "15001", "inbound_capture_port": "15006", "proxy_uid": "1337",
        "inbound_interception_mode": "REDIRECT", "service_cidr": "*", "service_exclude_cidr": "",
        "inbound_ports": "*", "local_exclude_ports": "15090,15021,15020"}


def cfg(**flags: str) -> Config:
    return load({**SEED, **flags}, {})


def names(config: Config, chain: str, facts: HostFacts = V4) -> list[str]:
    return [r.name for r in render(config, facts).chain(chain).rules]


def test_seed_layout_follows_istio_order() -> None:
    assert names(cfg(), N.ISTIO_OUTPUT) == [
        N.ENTRY, N.RULE_INBOUND_PASSTHROUGH_RETURN,
        N.UID.in_redirect, N.UID.loopback_return, N.UID.proxy_return,
        N.GID.in_redirect, N.GID.loopback_return, N.GID.proxy_return,
        N.RULE_LOOPBACK_RETURN, N.RULE_REDIRECT_OUTBOUND_ALL]
    assert names(cfg(), N.ISTIO_INBOUND) == [N.ENTRY, N.RULE_TUNNEL_PORT_RETURN, N.RULE_EXCLUDE_INBOUND_PORTS,
                                              N.RULE_REDIRECT_INBOUND_ALL]
    assert names(cfg(), N.PREROUTING) == [N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_INBOUND_JUMP]
    rs = render(cfg(), V4)
    assert rs.chain(N.ISTIO_REDIRECT).rules[1].actions == (Redirect(15001),)
    assert rs.chain(N.ISTIO_IN_REDIRECT).rules[1].actions == (Redirect(15006),)
    assert not rs.routes and {c.name for c in rs.chains}.isdisjoint({N.MANGLE_PREROUTING, N.RAW_OUTPUT})


def test_rule_count_does_not_grow_with_lists() -> None:
    small = render(cfg(service_exclude_cidr="10.0.0.0/8", local_exclude_ports="1"), V4)
    many = ",".join(f"10.{i // 128}.{(i % 128) * 2}.0/24" for i in range(5000))  # none adjacent
    ports = ",".join(str(p) for p in range(20000, 21000))
    big = render(cfg(service_exclude_cidr=many, local_exclude_ports=ports), V4)
    count = lambda rs: sum(len(c.rules) for c in rs.chains)  # noqa: E731
    assert count(small) == count(big)
    assert len(big.set(N.SET_EXCLUDE_CIDRS[4]).elements) == 5000
    adjacent = ",".join(f"10.0.{i}.0/24" for i in range(256))
    collapsed = render(cfg(service_exclude_cidr=adjacent + ",10.0.0.1"), V4).set(N.SET_EXCLUDE_CIDRS[4])
    assert collapsed.elements == (parse_cidr("10.0.0.0/16"),)  # interval sets refuse overlaps


def test_inbound_empty_means_no_inbound_jump() -> None:
    assert N.RULE_INBOUND_JUMP not in names(cfg(inbound_ports=""), N.PREROUTING)


def test_inbound_port_list_uses_a_set() -> None:
    rs = render(cfg(inbound_ports="80,8080-8090,81"), V4)
    rule = rs.chain(N.ISTIO_INBOUND).rules[-1]
    assert rule.name == N.RULE_REDIRECT_INBOUND_PORTS and rule.matches[0].value == SetRef(N.SET_INBOUND_PORTS)
    assert [str(p) for p in rs.set(N.SET_INBOUND_PORTS).elements] == ["80-81", "8080-8090"]
    assert rs.set(N.SET_INBOUND_PORTS).interval


def test_ipv6_on_adds_twins_and_drops_the_ipv6_return() -> None:
    v6 = HostFacts(ipv6=True, host_ip="2001:db8::2")
    out = names(cfg(service_exclude_cidr="2001:db8::/48,192.0.2.0/24"), N.ISTIO_OUTPUT, v6)
    assert N.per_family(N.RULE_INBOUND_PASSTHROUGH_RETURN, 6) in out and N.per_family(N.UID.in_redirect, 6) in out
    assert N.per_family(N.RULE_EXCLUDE_CIDRS_RETURN, 6) in out and N.per_family(N.RULE_LOOPBACK_RETURN, 6) in out
    assert N.RULE_IPV6_DISABLED_RETURN not in names(cfg(), N.PREROUTING, v6)
    # With IPv6 off, IPv6 CIDRs are dropped (as Istio does), and IPv6 packets leave at the chain head.
    off = render(cfg(service_exclude_cidr="2001:db8::/48"), V4)
    assert N.per_family(N.RULE_EXCLUDE_CIDRS_RETURN, 6) not in [r.name for r in off.chain(N.ISTIO_OUTPUT).rules]


def test_include_cidr_with_loopback_removes_app_lo_exemption() -> None:
    out = names(cfg(service_cidr="127.0.0.0/8,10.0.0.0/8"), N.ISTIO_OUTPUT)
    assert N.UID.loopback_return not in out and N.RULE_REDIRECT_OUTBOUND_CIDRS in out


def test_owner_groups() -> None:
    out = render(load({**SEED}, {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "0"}), V4)
    assert out.set(N.SET_OWNER_GROUPS_EXCLUDE).elements == (0,)
    empty = render(load({**SEED}, {"ISTIO_OUTBOUND_OWNER_GROUPS": ""}), V4).chain(N.ISTIO_OUTPUT)
    rule = next(r for r in empty.rules if r.name == N.RULE_OWNER_GROUPS_RETURN)
    assert rule.matches[0].negate and rule.actions == (Return(),)


def test_kube_virt_and_exclude_interfaces_lead_prerouting() -> None:
    out = render(cfg(kube_virt_interfaces="virt0,virt1", exclude_interfaces="eth1"), V4).chain(N.PREROUTING)
    assert [r.name for r in out.rules] == [
        N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_KUBE_VIRT_REDIRECT, N.RULE_KUBE_VIRT_RETURN,
        N.RULE_EXCLUDE_INTERFACES_RETURN, N.RULE_INBOUND_JUMP]
    assert out.rules[2].actions == (Jump(N.ISTIO_REDIRECT),)


def test_dns_capture_changes_loopback_rules_and_adds_raw_chains() -> None:
    facts = HostFacts(False, ipaddress.ip_address("192.0.2.2"), dns_v4=(ipaddress.IPv4Address("192.0.2.53"),))
    rs = render(cfg(redirect_dns="true"), facts)
    assert {N.ISTIO_OUTPUT_DNS, N.RAW_OUTPUT, N.RAW_PREROUTING} <= {c.name for c in rs.chains}
    out = [r.name for r in rs.chain(N.ISTIO_OUTPUT).rules]
    assert out.index(N.RULE_DNS_JUMP) < out.index(N.RULE_LOOPBACK_RETURN)
    assert rs.set(N.SET_DNS_SERVERS[4]).elements == (parse_cidr("192.0.2.53/32"),)
    # no servers and no capture-all: DNS capture is silently off, as in Istio
    assert N.ISTIO_OUTPUT_DNS not in {c.name for c in render(cfg(redirect_dns="true"), V4).chains}


def test_metrics_port_exempt_only_when_reachable() -> None:
    assert N.RULE_METRICS_PORT_RETURN not in names(cfg(), N.ISTIO_INBOUND)
    assert N.RULE_METRICS_PORT_RETURN in names(cfg(metrics_address="0.0.0.0:15321"), N.ISTIO_INBOUND)


def test_host_facts() -> None:
    a = ["127.0.0.1", "fe80::1", "192.0.2.2", "2001:db8::2"]
    assert decide_ipv6(a, dual_stack=False) == (False, a[2])
    assert decide_ipv6(a, dual_stack=True) == (True, a[2])
    assert decide_ipv6(a[1:2] + a[3:], dual_stack=False)[0] is True
    v4, v6 = parse_resolv_conf("# c\nnameserver 192.0.2.53\nnameserver ::127.0.0.53\nsearch x\nnameserver bad\n")
    assert [str(x) for x in v4] == ["192.0.2.53"] and [str(x) for x in v6] == ["::7f00:35"]


def test_transaction_is_one_document_and_replaces_stale_objects() -> None:
    kernel = FakeKernel()
    first = install.apply(kernel, FakeRouter(), render(cfg(service_exclude_cidr="192.0.2.0/24"), V4))
    assert kernel.applies == 1
    kernel.count("interceptd", N.counter_name(N.ISTIO_REDIRECT, N.RULE_REDIRECT_OUTBOUND), 5, 300)
    second = install.apply(kernel, FakeRouter(), render(cfg(), V4))
    listing = kernel.list_table("interceptd") or []
    assert not any(i.get("set", {}).get("name") == N.SET_EXCLUDE_CIDRS[4] for i in listing)
    assert not any(i.get("counter", {}).get("name") == N.counter_name(N.ISTIO_OUTPUT, N.RULE_EXCLUDE_CIDRS_RETURN)
               for i in listing)
    counters = {i["counter"]["name"]: i["counter"]["packets"] for i in listing if "counter" in i}
    # named counters survive a re-apply
    assert counters[N.counter_name(N.ISTIO_REDIRECT, N.RULE_REDIRECT_OUTBOUND)] == 5
    assert first.listing != second.listing
    again = install.apply(kernel, FakeRouter(), render(cfg(), V4))
    assert again.listing == second.listing


def test_transaction_deletes_chains_whose_hook_changed() -> None:
    rs = render(cfg(), V4)
    existing = Existing({N.PREROUTING: {"type": "filter", "hook": N.PREROUTING, "prio": 0}}, {}, frozenset(), {})
    doc = transaction(rs, existing)["nftables"]
    assert {"delete": {"chain": {"family": "inet", "table": "interceptd", "name": N.PREROUTING}}} in doc
    assert doc[0] == {"add": {"table": {"family": "inet", "name": "interceptd"}}}
    assert doc[1] == {"flush": {"table": {"family": "inet", "name": "interceptd"}}}


def test_normalise_ignores_handles_and_counter_values() -> None:
    a = [{"counter": {"name": "x", "handle": 1, "packets": 1, "bytes": 2}}, {"metainfo": {}}]
    b = [{"counter": {"name": "x", "handle": 9, "packets": 5, "bytes": 7}}]
    assert normalise(a) == normalise(b)


def test_remove() -> None:
    kernel = FakeKernel()
    install.apply(kernel, FakeRouter(), render(cfg(), V4))
    assert install.remove(kernel, FakeRouter(), "interceptd") is True
    assert kernel.list_table("interceptd") is None
    assert install.remove(kernel, FakeRouter(), "interceptd") is False


def test_a_set_over_the_limit_names_the_flag_and_merged_lists_may_exceed_it() -> None:
    every_other = ",".join(f"{ipaddress.IPv4Address(0xC0000000 + 2 * n)}/32" for n in range(100_001))
    try:
        render(cfg(service_exclude_cidr=every_other), V4)
    except ConfigError as exc:
        assert str(exc) == ("--istio-service-exclude-cidr (key 'service_exclude_cidr'): 100001 elements after "
                            "merging, more than the limit of 100000 per set")
        assert exc.exit_code == 2
    else:
        raise AssertionError("100,001 disjoint prefixes were rendered")
    adjacent = ",".join(f"{ipaddress.IPv4Address(0xC0000000 + n)}/32" for n in range(150_000))
    sets = {s.name: s for s in render(cfg(service_exclude_cidr=adjacent), V4).sets}
    assert len(sets["exclude-cidrs-v4"].elements) < 10


def test_every_set_names_the_option_that_fills_it() -> None:
    everything = cfg(exclude_interfaces="eth9", kube_virt_interfaces="virt0",
                     service_cidr="192.0.2.0/24,2001:db8::/32",
                     service_exclude_cidr="198.51.100.0/24,2001:db8:1::/48", outbound_ports="80",
                     local_outbound_ports_exclude="81", outbound_owner_groups="0", redirect_dns="true",
                     inbound_ports="82", inbound_interception_mode="TPROXY")
    facts = HostFacts(ipv6=True, host_ip="192.0.2.2",
                      dns_v4=(ipaddress.IPv4Address("192.0.2.53"),), dns_v6=(ipaddress.IPv6Address("2001:db8::53"),))
    rendered = {s.name for s in render(everything, facts).sets}
    star = {s.name for s in render(cfg(outbound_owner_groups_exclude="0", local_exclude_ports="15090"), V4).sets}
    assert rendered | star == set(SET_SOURCE)
    assert set(SET_SOURCE.values()) <= set(OPTIONS_BY_KEY)
