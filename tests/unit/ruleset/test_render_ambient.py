"""Ambient capture mode (docs/ambient.md): the options, the rendered chains in Istio's order, the round trip
through JSON and the kernel-listing parser, `explain`'s verdicts for ambient connections, and the CNI plugin's
per-pod choice of the mode."""

from __future__ import annotations

import ipaddress

import pytest

from interceptd.cli import cni
from interceptd.cli import main as cli
from interceptd.config import Config, load
from interceptd.errors import ConfigError
from interceptd.ruleset import names as N
from interceptd.ruleset.explain import Connection, borrow_why, explain
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Accept, MarkFromCtMark, PolicyRoute, SetCtMarkBits, SetCtZone
from interceptd.ruleset.nftjson import Existing, transaction
from interceptd.ruleset.nftparse import parse_listing
from interceptd.ruleset.render import render
from interceptd.ruleset.status import expr_text
from interceptd.runtime.nodestate import settings_config

IP = ipaddress.ip_address
POD, PEER, PROBE = "192.0.2.2", "198.51.100.1", "169.254.7.127"
V4 = HostFacts(ipv6=False, host_ip=POD)
V6 = HostFacts(ipv6=True, host_ip=POD)


def cfg(**flags: str) -> Config:
    return load({"capture_mode": "ambient", **flags}, {})


def names(config: Config, chain: str, facts: HostFacts = V4) -> list[str]:
    return [r.name for r in render(config, facts).chain(chain).rules]


def chains(config: Config, facts: HostFacts = V4) -> list[str]:
    return [c.name for c in render(config, facts).chains]


def test_defaults_are_istios() -> None:
    c = cfg()
    assert (c.envoy_port, c.inbound_capture_port, c.inbound_tunnel_port, c.ambient_dns_port) == \
        (15001, 15006, 15008, 15053)
    assert (c.ambient_mark, c.ambient_mark_mask, c.ambient_connmark, c.ambient_route_table) == \
        (0x539, 0xFFF, 0x111, 100)
    assert c.ambient_probe_address.address == PROBE
    assert c.ambient_probe_address_v6.address == "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    assert load({}, {}).capture_mode == "sidecar"


@pytest.mark.parametrize(("flags", "words"), [
    ({"capture_mode": "ztunnel"}, "--capture-mode"),
    ({"inbound_interception_mode": "TPROXY"}, "--istio-inbound-interception-mode TPROXY"),
    ({"run_validation": "true"}, "--run-validation"),
    ({"ambient_mark": "0x1539"}, "--ambient-mark"),
    ({"ambient_connmark": "0x539"}, "--ambient-connmark"),
    ({"ambient_mark": "0xzz"}, "--ambient-mark"),
    ({"ambient_probe_address": "fd00::1"}, "--ambient-probe-address"),
])
def test_bad_ambient_settings_are_one_line_naming_the_flag(flags: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(**flags)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_bad_ambient_flag_exits_2_without_touching_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run_command(["render", "--capture-mode", "ambient", "--ambient-mark", "0x1539"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ambient-mark" in err and "0x1539" in err and "\n" not in err


def test_default_layout_follows_istios_order() -> None:
    c = cfg(redirect_dns="true")
    assert names(c, N.PREROUTING) == [N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_PROBE_ACCEPT,
                                      N.RULE_INBOUND_JUMP]
    assert names(c, N.ISTIO_INBOUND) == [N.ENTRY, N.RULE_TUNNEL_PORT_RETURN, N.RULE_LOOPBACK_RETURN,
                                         N.RULE_PROXY_MARK_RETURN, N.RULE_REDIRECT_INBOUND_ALL]
    assert names(c, N.ISTIO_OUTPUT) == [N.ENTRY, N.RULE_PROBE_REPLY_ACCEPT, N.RULE_PROXY_MARK_RETURN,
                                        N.RULE_DNS_JUMP, N.RULE_PROXIED_ACCEPT, N.RULE_POD_SELF_ACCEPT,
                                        N.RULE_LOOPBACK_RETURN, N.RULE_REDIRECT_OUTBOUND_ALL]
    assert names(c, N.ISTIO_OUTPUT_DNS) == [N.ENTRY, N.RULE_DNS_REDIRECT_UDP, N.RULE_DNS_REDIRECT_TCP]
    assert names(c, N.RAW_OUTPUT)[-1] == N.RULE_PROXY_DNS_ZONE
    assert names(c, N.RAW_PREROUTING)[-1] == N.RULE_DNS_REPLY_ZONE
    rs = render(c, V4)
    assert rs.chain(N.MANGLE_PREROUTING).rules[-1].actions == (SetCtMarkBits(0x111, 0xFFF),)
    assert rs.chain(N.MANGLE_OUTPUT).rules[-1].actions == (MarkFromCtMark(),)
    assert rs.routes == (PolicyRoute(4, 0x111, 100, 0xFFF),)
    assert rs.lo_addresses == ()  # no ::6: ambient has no passthrough source


def test_dual_stack_adds_the_ipv6_twins_and_route() -> None:
    c = cfg(redirect_dns="true")
    assert names(c, N.ISTIO_OUTPUT, V6) == [
        N.ENTRY, N.RULE_PROBE_REPLY_ACCEPT, N.per_family(N.RULE_PROBE_REPLY_ACCEPT, 6), N.RULE_PROXY_MARK_RETURN,
        N.RULE_DNS_JUMP, N.RULE_PROXIED_ACCEPT, N.RULE_POD_SELF_ACCEPT, N.per_family(N.RULE_POD_SELF_ACCEPT, 6),
        N.RULE_LOOPBACK_RETURN, N.per_family(N.RULE_LOOPBACK_RETURN, 6), N.RULE_REDIRECT_OUTBOUND_ALL]
    assert N.RULE_IPV6_DISABLED_RETURN not in names(c, N.PREROUTING, V6)
    assert [r.family for r in render(c, V6).routes] == [4, 6]


def test_dns_off_has_no_dns_chains_and_resolv_conf_does_not_matter() -> None:
    assert not {N.ISTIO_OUTPUT_DNS, N.RAW_OUTPUT, N.RAW_PREROUTING} & set(chains(cfg()))
    assert N.ISTIO_OUTPUT_DNS in chains(cfg(redirect_dns="true"), V4)  # V4 has no resolv.conf servers


def test_ingress_mode_has_no_inbound_capture_and_no_probe_exemption() -> None:
    c = cfg(ambient_ingress="true", kube_virt_interfaces="fake1s0f0,fake1s0f1")
    assert names(c, N.PREROUTING) == [N.RULE_IPV6_DISABLED_RETURN, N.ENTRY, N.RULE_KUBE_VIRT_REDIRECT,
                                      N.RULE_KUBE_VIRT_RETURN]
    assert N.ISTIO_INBOUND not in chains(c) and N.ISTIO_IN_REDIRECT not in chains(c)
    assert N.RULE_PROBE_REPLY_ACCEPT in names(c, N.ISTIO_OUTPUT)  # Istio keeps the answer rule in ingress mode
    assert render(c, V4).set(N.SET_KUBE_VIRT_INTERFACES).elements == ("fake1s0f0", "fake1s0f1")


def test_every_port_mark_and_address_is_configurable() -> None:
    c = cfg(redirect_dns="true", envoy_port="16001", inbound_capture_port="16006", inbound_tunnel_port="16008",
            ambient_dns_port="16053", ambient_mark="0x7a1", ambient_connmark="0x222", ambient_mark_mask="0xff0fff",
            ambient_route_table="101", ambient_probe_address="169.254.7.128")
    rs = render(c, V4)
    text = repr(rs)
    for value in ("16001", "16006", "16008", "16053", str(0x7A1), str(0x222), str(0xFF0FFF), "169.254.7.128"):
        assert value in text
    assert rs.routes == (PolicyRoute(4, 0x222, 101, 0xFF0FFF),)


def conn_out(dst: str, port: int, proto: str = "tcp", mark: int = 0, oif: str = "eth0") -> Connection:
    return Connection("outbound", proto, IP(dst), port, IP(POD if IP(dst).version == 4 else "2001:db8::2"),
                      40000, 1000, 1000, oif=oif, mark=mark)


def conn_in(port: int, src: str = PEER, dst: str = POD) -> Connection:
    return Connection("inbound", "tcp", IP(dst), port, IP(src), 40000, iif="eth0")


@pytest.mark.parametrize(("conn", "action", "port", "rule"), [
    (conn_out(PEER, 80), "redirect", 15001, "istio-redirect/redirect-outbound"),
    (conn_out(PEER, 80, mark=0x539), "none", 80, ""),
    (conn_out(PEER, 80, mark=0xA539), "none", 80, ""),  # only the masked bits count
    (conn_out(PEER, 53, "udp"), "redirect", 15053, "istio-output-dns/dns-redirect-udp"),
    (conn_out(PEER, 53), "redirect", 15053, "istio-output-dns/dns-redirect-tcp"),
    (conn_out(PEER, 53, "udp", mark=0x539), "none", 53, ""),
    (conn_out("127.0.0.53", 53, "udp", oif="lo"), "none", 53, ""),
    (conn_out(PROBE, 8080), "none", 8080, ""),
    (conn_out(POD, 8080, oif="lo"), "none", 8080, ""),
    (conn_in(8080), "redirect", 15006, "istio-in-redirect/redirect-inbound"),
    (conn_in(15008), "none", 15008, ""),
    (conn_in(8080, src=PROBE), "none", 8080, ""),
])
def test_explain_gives_istios_verdict_for_ambient_connections(conn: Connection, action: str, port: int,
                                                              rule: str) -> None:
    verdict = explain(render(cfg(redirect_dns="true"), V4), conn).verdict
    assert (verdict.action, verdict.port, verdict.rule) == (action, port, rule)


def test_explain_follows_the_connmark_of_the_proxys_connection_into_the_pod() -> None:
    """The proxy (mark 0x539) connecting to the app over lo: not captured, and the connection is marked."""
    rs = render(cfg(), V4)
    conn = Connection("outbound", "tcp", IP(POD), 8080, IP(PEER), 40000, 0, 0, oif="lo", mark=0x539)
    result = explain(rs, conn)
    assert result.verdict.action == "none"
    assert "mangle-prerouting/save-mark" in result.matched()
    assert "prerouting/inbound-jump" not in result.matched()  # the looped-back packet's NAT is decided


def test_ambient_rules_survive_the_kernel_listing_round_trip() -> None:
    """What nftjson sends, listed back as the kernel lists it, parses to the same decisions (the kernel writes
    `ct mark & 0xfffff000 | 0x111` as `& 0xfffff111 | 0x111`)."""
    rs = render(cfg(redirect_dns="true", kube_virt_interfaces="k0"), V6)
    items = []
    for cmd in transaction(rs, Existing.empty())["nftables"]:
        ((verb, body),) = cmd.items()
        if verb == "add":
            items.append(body)
    for item in items:
        if "rule" in item:
            for expr in item["rule"]["expr"]:
                mangle = expr.get("mangle", {})
                if isinstance(mangle.get("value"), dict) and "|" in mangle["value"]:
                    kept, bits = mangle["value"]["|"]
                    kept["&"][1] |= bits
    parsed = borrow_why(parse_listing(rs.table, items), rs)
    for chain in rs.chains:
        assert [(r.name, r.matches, r.actions) for r in parsed.chain(chain.name).rules] == \
            [(r.name, r.matches, r.actions) for r in chain.rules]
    assert any(isinstance(a, SetCtZone) for c in parsed.chains for r in c.rules for a in r.actions)
    assert any(isinstance(a, Accept) for r in parsed.chain(N.PREROUTING).rules for a in r.actions)


def test_cni_label_selects_ambient_and_its_annotations() -> None:
    args = {cni.DATAPLANE_MODE_LABEL: "ambient", "ambient.istio.io/dns-capture": "true",
            "ambient.istio.io/bypass-inbound-capture": "true", "istio.io/reroute-virtual-interfaces": "v0, v1",
            "traffic.sidecar.istio.io/kubevirtInterfaces": "ignored0"}
    settings = cni.pod_settings({}, args)
    assert settings is not None
    config = settings_config(settings, "test")
    assert config.ambient and config.redirect_dns and config.ambient_ingress
    assert config.kube_virt_interfaces == ("v0", "v1")
    sidecar = cni.pod_settings({}, {"traffic.sidecar.istio.io/kubevirtInterfaces": "k0"})
    assert sidecar is not None and not settings_config(sidecar, "test").ambient


def test_cni_network_config_can_make_every_pod_ambient_and_bad_annotations_name_themselves() -> None:
    settings = cni.pod_settings({"interceptd": {"capture_mode": "ambient"}}, {})
    assert settings is not None and settings_config(settings, "test").ambient
    assert cni.pod_settings({"interceptd": {"capture_mode": "ambient"}}, {cni.DATAPLANE_MODE_LABEL: "none"}) is None
    with pytest.raises(ConfigError, match="ambient.istio.io/dns-capture"):
        cni.pod_settings({}, {cni.DATAPLANE_MODE_LABEL: "ambient", "ambient.istio.io/dns-capture": "maybe"})


def test_status_prints_masked_marks_as_nft_does() -> None:
    rs = render(cfg(), V4)
    rules = {item["rule"]["comment"]: item["rule"]["expr"] for cmd in transaction(rs, Existing.empty())["nftables"]
             for verb, item in cmd.items() if verb == "add" and "rule" in item and item["rule"]["chain"] in
             (N.MANGLE_PREROUTING, N.ISTIO_INBOUND)}
    assert expr_text(rules[N.RULE_PROXY_MARK_RETURN]) == "meta mark & 0xfff == 0x539 return"
    assert expr_text(rules[N.RULE_SAVE_MARK]) == \
        "meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111"
