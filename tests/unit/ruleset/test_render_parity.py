"""Render variants (TPROXY, DNS, IPv6, interfaces) and the routes/::6 state around the table."""

from __future__ import annotations

import ipaddress

from interceptd.config import Config, load
from interceptd.control import install
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Jump, PolicyRoute, Ruleset, SetCtZone, SetRef, TProxy
from interceptd.ruleset.render import render
from interceptd.system import routes
from interceptd.system.fake import FakeKernel, FakeRouter

V4 = HostFacts(ipv6=False, host_ip="192.0.2.2")
V6 = HostFacts(ipv6=True, host_ip="192.0.2.2")
DNS = HostFacts(ipv6=False, host_ip="192.0.2.2",
                dns_v4=(ipaddress.IPv4Address("203.0.113.1"),))
TPROXY = {"inbound_interception_mode": "TPROXY", "inbound_ports": "*", "service_cidr": "*"}


def cfg(**flags: str) -> Config:
    return load(flags, {})


def names(rs: Ruleset, chain: str) -> list[str]:
    return [r.name for r in rs.chain(chain).rules]


def test_tproxy_layout_follows_istio_order() -> None:
    rs = render(cfg(**TPROXY, local_exclude_ports="15090"), V6)
    assert names(rs, N.MANGLE_PREROUTING) == [N.ENTRY, N.RULE_TPROXY_INBOUND_JUMP, N.RULE_SAVE_MARK]
    assert names(rs, N.TPROXY_INBOUND) == [
        N.ENTRY, N.RULE_TPROXY_MARK_RETURN, N.RULE_INBOUND_PASSTHROUGH_RETURN,
        N.per_family(N.RULE_INBOUND_PASSTHROUGH_RETURN, 6),
        N.RULE_APP_LOOPBACK_RETURN, N.RULE_TUNNEL_PORT_RETURN, N.RULE_EXCLUDE_INBOUND_PORTS, N.RULE_DIVERT_ESTABLISHED,
        N.RULE_TPROXY_INBOUND_ALL]
    assert [a for r in rs.chain(N.ISTIO_TPROXY).rules for a in r.actions if isinstance(a, TProxy)] == [
        TProxy("ip", 15006), TProxy("ip6", 15006)]
    assert names(rs, N.MANGLE_OUTPUT) == [
        N.ENTRY, N.RULE_TPROXY_MARK_RETURN, N.UID.outbound_mark, N.per_family(N.UID.outbound_mark, 6),
        N.GID.outbound_mark, N.per_family(N.GID.outbound_mark, 6), N.RULE_RESTORE_MARK]
    assert N.RULE_INBOUND_JUMP not in names(rs, N.PREROUTING)  # no nat inbound capture in TPROXY mode
    assert rs.routes == (PolicyRoute(4, 1337, 133), PolicyRoute(6, 1337, 133))
    assert rs.lo_addresses == ("::6",)


def test_tproxy_port_list_and_custom_mark_and_table() -> None:
    rs = render(cfg(inbound_interception_mode="TPROXY", inbound_ports="80,8080", local_exclude_ports="22",
                    inbound_tproxy_mark="7", inbound_tproxy_route_table="77"), V4)
    assert names(rs, N.TPROXY_INBOUND)[-2:] == [N.RULE_DIVERT_ESTABLISHED, N.RULE_TPROXY_INBOUND_PORTS]
    assert N.RULE_EXCLUDE_INBOUND_PORTS not in names(rs, N.TPROXY_INBOUND)  # -d only with -b '*'
    assert [e.first for e in rs.set(N.SET_INBOUND_PORTS).elements] == [80, 8080]
    assert rs.routes == (PolicyRoute(4, 7, 77),) and rs.lo_addresses == ()


def test_tproxy_without_inbound_ports_has_no_capture_and_no_routes() -> None:
    rs = render(cfg(inbound_interception_mode="TPROXY", inbound_ports=""), V4)
    chains = {c.name for c in rs.chains}
    assert {N.ISTIO_DIVERT, N.ISTIO_TPROXY}.isdisjoint(chains) and {N.MANGLE_OUTPUT, N.TPROXY_INBOUND} <= chains
    assert names(rs, N.TPROXY_INBOUND) == [N.ENTRY, N.RULE_TPROXY_MARK_RETURN, N.RULE_INBOUND_PASSTHROUGH_RETURN,
                                           N.RULE_APP_LOOPBACK_RETURN, N.RULE_TUNNEL_PORT_RETURN]
    jumps = [a.chain for c in rs.chains for r in c.rules for a in r.actions if isinstance(a, Jump)]
    assert set(jumps) <= chains  # every jump target exists
    assert rs.routes == ()


def test_redirect_mode_has_no_mangle_and_no_routes() -> None:
    rs = render(cfg(inbound_ports="*"), V6)
    assert not {N.MANGLE_PREROUTING, N.MANGLE_OUTPUT} & {c.name for c in rs.chains}
    assert rs.routes == () and rs.lo_addresses == ("::6",)


def test_drop_invalid_alone_and_with_excluded_interfaces() -> None:
    assert names(render(cfg(drop_invalid="true", exclude_interfaces="eth9"), V4), N.MANGLE_PREROUTING) == [
        N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_DROP_INVALID]  # -c reaches mangle only in TPROXY mode
    rs = render(cfg(**TPROXY, drop_invalid="true", exclude_interfaces="eth9"), V4)
    assert names(rs, N.MANGLE_PREROUTING) == [N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_EXCLUDE_INTERFACES_RETURN,
                                              N.RULE_DROP_INVALID, N.RULE_TPROXY_INBOUND_JUMP, N.RULE_SAVE_MARK]
    assert names(rs, N.MANGLE_OUTPUT)[2] == N.RULE_EXCLUDE_INTERFACES_RETURN


def test_dns_sets_only_for_families_with_servers() -> None:
    rs = render(cfg(redirect_dns="true"), DNS)
    assert [s.name for s in rs.sets if s.name.startswith("dns")] == [N.SET_DNS_SERVERS[4]]
    assert names(rs, N.ISTIO_OUTPUT_DNS) == [N.ENTRY, N.RULE_DNS_REDIRECT]
    assert names(rs, N.RAW_PREROUTING) == [N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_DNS_REPLY_ZONE]
    zones = [(r.name, a.zone) for r in rs.chain(N.RAW_OUTPUT).rules for a in r.actions if isinstance(a, SetCtZone)]
    assert zones == [(N.UID.dns_upstream_zone, 1), (N.UID.dns_agent_zone, 2),
                     (N.GID.dns_upstream_zone, 1), (N.GID.dns_agent_zone, 2), (N.RULE_APP_DNS_ZONE, 2)]


def test_dns_without_servers_is_off_and_capture_all_needs_none() -> None:
    rs = render(cfg(redirect_dns="true"), V4)
    assert N.ISTIO_OUTPUT_DNS not in {c.name for c in rs.chains}
    rs = render(cfg(redirect_dns="true", capture_all_dns="true"), V4)
    assert names(rs, N.ISTIO_OUTPUT_DNS) == [N.ENTRY, N.RULE_DNS_REDIRECT]
    assert not [s for s in rs.sets if s.name.startswith("dns")]


def test_kube_virt_cidr_rules_only_for_families_with_cidrs() -> None:
    rs = render(cfg(kube_virt_interfaces="virt0", service_cidr="10.0.0.0/8"), V6)
    assert names(rs, N.PREROUTING) == [N.ENTRY, N.RULE_KUBE_VIRT_REDIRECT, N.RULE_KUBE_VIRT_RETURN]
    rs = render(cfg(kube_virt_interfaces="virt0", service_cidr="10.0.0.0/8,fd00::/8"), V4)
    assert names(rs, N.PREROUTING) == [N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_KUBE_VIRT_REDIRECT,
                                       N.RULE_KUBE_VIRT_RETURN]
    assert N.SET_INCLUDE_CIDRS[6] not in {s.name for s in rs.sets}
    rs = render(cfg(kube_virt_interfaces="virt0", service_cidr=""), V4)
    assert names(rs, N.PREROUTING) == [N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_KUBE_VIRT_RETURN]


def test_several_proxy_uids_share_one_rule_block() -> None:
    rs = render(cfg(proxy_uid="1337,1338", proxy_gid="5,6"), V4)
    assert rs.set(N.SET_PROXY_UIDS).elements == (1337, 1338) and rs.set(N.SET_PROXY_GIDS).elements == (5, 6)
    rule = rs.chain(N.ISTIO_OUTPUT).rules[names(rs, N.ISTIO_OUTPUT).index(N.UID.loopback_return)]
    assert any(m.key == "skuid" and m.value == SetRef(N.SET_PROXY_UIDS) and m.negate for m in rule.matches)


def test_install_syncs_routes_with_the_fake_router() -> None:
    kernel = FakeKernel()
    router = FakeRouter()
    tproxy = render(cfg(**TPROXY), V6)
    install.apply(kernel, router, tproxy)
    install.apply(kernel, router, tproxy)
    assert sorted(map(str, router.entries)) == [
        "ip -6 address ::6 dev lo", "ip -6 route local default dev lo table 133",
        "ip -6 rule fwmark 1337 lookup 133", "ip route local default dev lo table 133",
        "ip rule fwmark 1337 lookup 133"]
    assert routes.missing(tproxy, router) == []
    router.entries.discard(routes.Entry("rule", 6, 133, 1337))
    assert routes.missing(tproxy, router) == ["ip -6 rule fwmark 1337 lookup 133"]
    install.apply(kernel, router, render(cfg(**TPROXY, inbound_tproxy_route_table="140"), V4))
    assert sorted(map(str, router.entries)) == [
        "ip -6 address ::6 dev lo", "ip route local default dev lo table 140", "ip rule fwmark 1337 lookup 140"]
    install.remove(kernel, router, "interceptd")
    assert [str(e) for e in router.entries] == ["ip -6 address ::6 dev lo"]  # ::6 stays, as in Istio
