"""Pure rendering: Config + HostFacts -> Ruleset, reproducing istio-iptables' decisions.

The decisions, rule by rule, are described in docs/istio-compatibility.md ("Which connection goes where").

The evaluation order between the groups of rules is Istio's; inside a group, the one-rule-per-entry lists
become named sets, so the number of rules does not depend on the list sizes.
"""

from __future__ import annotations

from operator import attrgetter, le

from interceptd.config import OPTIONS_BY_KEY, Config
from interceptd.config.values import MAX_SET_ELEMENTS, IPNetwork, PortRange, Prefix, address_value
from interceptd.errors import ConfigError
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts, is_loopback
from interceptd.ruleset.model import (
    Accept,
    Action,
    Chain,
    CtMarkFromMark,
    Drop,
    Hook,
    Jump,
    MarkFromCtMark,
    Match,
    NamedSet,
    PolicyRoute,
    Redirect,
    Return,
    Rule,
    Ruleset,
    Scalar,
    SetCtMarkBits,
    SetCtZone,
    SetMark,
    SetRef,
    TProxy,
    address,
    ct_mark,
    ct_state,
    interface,
    mark,
    nfproto,
    owner,
    port,
    protocol,
)

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Iterable

    from interceptd.ruleset.facts import IPAddress
    from interceptd.ruleset.model import InterfaceKey, OwnerKey

DNS_PORT = 53
DNS_AGENT_PORT = 15053
OUTBOUND_MARK = 1338
# parse_cidr("127.0.0.6/32") and so on, written out: parse_cidr reads such spellings with ipaddress, which an
# apply of the usual configuration otherwise never imports.
PASSTHROUGH_V4 = Prefix(4, 0x7F000006, 32, "127.0.0.6")
PASSTHROUGH_V6 = Prefix(6, 6, 128, "::6")
LOOPBACK_V6 = Prefix(6, 1, 128, "::1")

# The base chains, declared once: Istio's tables and priorities (nat -100, mangle -150, raw -300) folded into one
# inet table; the policy is always accept, so a packet no rule decides goes on untouched.
BASE_CHAINS: dict[str, Hook] = {
    N.PREROUTING: Hook("nat", "prerouting", -100),
    N.OUTPUT: Hook("nat", "output", -100),
    N.MANGLE_PREROUTING: Hook("filter", "prerouting", -150),
    N.MANGLE_OUTPUT: Hook("route", "output", -150),  # route: a changed mark re-routes the packet (TPROXY)
    N.RAW_PREROUTING: Hook("filter", "prerouting", -300),  # before conntrack: zones must be set first
    N.RAW_OUTPUT: Hook("filter", "output", -300),
}

TCP = protocol("tcp")
TCP_UDP = protocol("tcp", "udp")
LO_OUT = interface("oifname", "lo")
LO_IN = interface("iifname", "lo")
ENTRY = Rule(N.ENTRY)

# The option whose list fills each named set (without the -v4/-v6 suffix): a set over the limit is reported
# against the flag the user can change.
SET_SOURCE: dict[str, str] = {  # set name -> the option its elements come from (named in a too-large error)
    N.SET_PROXY_UIDS: "proxy_uid", N.SET_PROXY_GIDS: "proxy_gid", N.SET_EXCLUDE_INTERFACES: "exclude_interfaces",
    N.SET_KUBE_VIRT_INTERFACES: "kube_virt_interfaces", N.SET_INBOUND_PORTS: "inbound_ports",
    N.SET_INBOUND_EXCLUDE_PORTS: "local_exclude_ports", N.SET_OUTBOUND_EXCLUDE_PORTS: "local_outbound_ports_exclude",
    N.SET_OUTBOUND_PORTS: "outbound_ports", N.SET_OWNER_GROUPS: "outbound_owner_groups",
    N.SET_OWNER_GROUPS_EXCLUDE: "outbound_owner_groups_exclude",
    **{name: "service_cidr" for name in N.SET_INCLUDE_CIDRS.values()},
    **{name: "service_exclude_cidr" for name in N.SET_EXCLUDE_CIDRS.values()},
    **{name: "resolv_conf" for name in N.SET_DNS_SERVERS.values()},
}


def base_chain(name: str, rules: Iterable[Rule]) -> Chain:
    return Chain(name, tuple(rules), BASE_CHAINS[name])


def rule(name: str, why: str, *parts: Match | Action) -> Rule:
    matches = tuple(p for p in parts if isinstance(p, Match))
    actions = tuple(p for p in parts if not isinstance(p, Match))
    return Rule(name, matches, actions, why)


def merge_ports(ports: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Sorted, de-duplicated, overlapping and adjacent ranges merged (interval sets refuse overlaps)."""
    merged: list[PortRange] = []
    for item in sorted(ports):
        if merged and item.first <= merged[-1].last + 1:
            merged[-1] = PortRange(merged[-1].first, max(merged[-1].last, item.last))
        else:
            merged.append(item)
    return tuple(merged)


def merge_cidrs(nets: Iterable[IPNetwork], version: int) -> tuple[IPNetwork, ...]:
    """Sorted, overlapping and adjacent prefixes merged (interval sets refuse overlaps), like
    ipaddress.collapse_addresses but on the prefixes' integers: a prefix that merges with none is kept as it
    is, so 10,000 CIDRs take a few milliseconds."""
    bits = 32 if version == 4 else 128
    chosen = sorted((n for n in nets if n.version == version), key=_by_address)
    firsts = [n.value for n in chosen]
    ends = [n.value + (1 << (bits - n.prefixlen)) for n in chosen]  # one past each prefix's last address
    if not any(map(le, firsts[1:], ends)):  # the usual list: no prefix overlaps or touches the next one
        return tuple(chosen)
    merged: list[tuple[int, int, IPNetwork | None]] = []  # first, end, the prefix when it is exactly one
    for n, first, end in zip(chosen, firsts, ends, strict=True):
        if merged and first <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end, None)
        else:
            merged.append((first, end, n))
    out: list[IPNetwork] = []
    for first, end, single in merged:
        if single is not None:
            out.append(single)
        else:
            out += _summarize(version, bits, first, end - 1)
    return tuple(out)


_by_address = attrgetter("value", "prefixlen")


def _summarize(version: int, bits: int, first: int, last: int) -> list[IPNetwork]:
    """The fewest prefixes that cover exactly first..last (ipaddress.summarize_address_range on integers):
    each step takes the largest prefix that starts at `first`, is aligned there and ends by `last`."""
    out = []
    while first <= last:
        aligned = (first & -first).bit_length() - 1 if first else bits
        size = min(aligned, (last - first + 1).bit_length() - 1)
        out.append(Prefix.from_int(version, first, bits - size))
        first += 1 << size
    return out


class _Builder:
    """Collects sets while the chains are being written; one instance per render."""

    def __init__(self, config: Config, facts: HostFacts) -> None:
        self.c = config
        self.f = facts
        self.sets: dict[str, NamedSet] = {}

    # -- sets --------------------------------------------------------------------------------------
    def named(self, name: str, type_: str, elements: Iterable[Scalar], interval: bool = False) -> SetRef:
        """Each element once: the kernel lists a set without duplicates, and `install.holds` (the reference's
        read-back) must find exactly the rendered elements there (`-c eth1,eth1` never became ready). At most
        MAX_SET_ELEMENTS: a set is what the kernel must hold and every check reads back."""
        return self.store(name, type_, tuple(dict.fromkeys(elements)), interval)

    def store(self, name: str, type_: str, items: tuple[Scalar, ...], interval: bool) -> SetRef:
        """`named` for elements that are unique already (merged prefixes: no hash of each of 10,000 again)."""
        if len(items) > MAX_SET_ELEMENTS:
            option = OPTIONS_BY_KEY[SET_SOURCE[name]]
            raise ConfigError(f"{option.flag} (key {option.key!r}): {len(items)} elements after merging, more "
                              f"than the limit of {MAX_SET_ELEMENTS} per set")
        self.sets[name] = NamedSet(name, type_, items, interval)
        return SetRef(name)

    def ports(self, name: str, ports: Iterable[PortRange]) -> SetRef:
        merged = merge_ports(ports)
        return self.named(name, "inet_service", merged, any(p.first != p.last for p in merged))

    def cidrs(self, names: dict[int, str], nets: Iterable[IPNetwork], version: int) -> SetRef:
        return self.store(names[version], "ipv4_addr" if version == 4 else "ipv6_addr", merge_cidrs(nets, version),
                          True)

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.f.ipv6 else (4,)

    def base_head(self) -> list[Rule]:
        """Every base chain: leave IPv6 alone when it is off, then count what enters."""
        head = []
        if not self.f.ipv6:
            head.append(rule(N.RULE_IPV6_DISABLED_RETURN, "IPv6 is not captured (no IPv6 in this pod, or off)",
                             nfproto("ipv6"), Return()))
        return [*head, ENTRY]

    def loopback_dst(self, version: int) -> IPNetwork:
        return self.c.outbound_ipv4_loopback_cidr if version == 4 else LOOPBACK_V6

    @property
    def dns_active(self) -> bool:
        return self.c.redirect_dns and (self.c.capture_all_dns or bool(self.f.dns_v4 or self.f.dns_v6))

    def proxy_ids(self, who: N.OwnerRules) -> SetRef:
        ids = self.c.proxy_uid if who is N.UID else self.c.proxy_gid
        return self.named(who.set, who.kind, sorted(ids))

    def exclude_ifaces(self, direction: InterfaceKey) -> list[Rule]:
        if not self.c.exclude_interfaces:
            return []
        ref = self.named(N.SET_EXCLUDE_INTERFACES, "ifname", sorted(self.c.exclude_interfaces))
        return [rule(N.RULE_EXCLUDE_INTERFACES_RETURN, "traffic on an excluded interface (-c) is not captured",
                     interface(direction, ref), Return())]

    def inbound_exempt_ports(self) -> list[Rule]:
        """The tunnel port and (when it is reachable from outside) the metrics port are never captured."""
        out = [rule(N.RULE_TUNNEL_PORT_RETURN,
                    f"the HBONE tunnel port {self.c.inbound_tunnel_port} (-e) is exempt",
                    port("tcp dport", self.c.inbound_tunnel_port), Return())]
        addr = self.c.metrics_address
        if addr is not None and not _is_loopback_host(addr[0]):
            out.append(rule(N.RULE_METRICS_PORT_RETURN, f"interceptd's metrics port {addr[1]} stays reachable",
                            port("tcp dport", addr[1]), Return()))
        return out

    def exclude_inbound_ports(self) -> list[Rule]:
        """-d: with -b '*', these inbound ports are not captured (Istio ignores -d with a port list)."""
        if not self.c.local_exclude_ports:
            return []
        ref = self.ports(N.SET_INBOUND_EXCLUDE_PORTS, self.c.local_exclude_ports)
        return [rule(N.RULE_EXCLUDE_INBOUND_PORTS, "inbound ports excluded by -d are not captured",
                     port("tcp dport", ref), Return())]

    def cidr_families(self, nets: Iterable[IPNetwork]) -> list[int]:
        """The enabled families that have CIDRs in the list (IPv6 ones are dropped when IPv6 is off)."""
        return [version for version in self.families if any(n.version == version for n in nets)]

    def dns_servers(self) -> dict[int, SetRef]:
        """One set per enabled family that has resolv.conf servers."""
        servers: dict[int, tuple[IPAddress, ...]] = {4: self.f.dns_v4, 6: self.f.dns_v6}
        return {version: self.named(N.SET_DNS_SERVERS[version], f"ipv{version}_addr",
                                    [Prefix.of(a) for a in servers[version]])
                for version in self.families if servers[version]}

    def kube_virt(self) -> Match:
        """Arrived on one of the -k interfaces (a VM's or container's, whose traffic is outbound)."""
        names = sorted(self.c.kube_virt_interfaces)
        return interface("iifname", self.named(N.SET_KUBE_VIRT_INTERFACES, "ifname", names))

    # -- nat ---------------------------------------------------------------------------------------
    def nat_prerouting(self) -> Chain:
        rules = self.base_head()
        c = self.c
        if c.kube_virt_interfaces:
            virt = self.kube_virt()
            if c.service_cidr is None:
                rules.append(rule(N.RULE_KUBE_VIRT_REDIRECT, "TCP arriving on a kube-virt interface (-k) is outbound",
                                  virt, Jump(N.ISTIO_REDIRECT)))
            else:
                for version in self.cidr_families(c.service_cidr):
                    cidrs = self.cidrs(N.SET_INCLUDE_CIDRS, c.service_cidr, version)
                    rules.append(rule(N.per_family(N.RULE_KUBE_VIRT_REDIRECT, version),
                                      "TCP from a kube-virt interface (-k) to an included CIDR (-i) is outbound",
                                      virt, address(version, "daddr", cidrs), Jump(N.ISTIO_REDIRECT)))
            rules.append(rule(N.RULE_KUBE_VIRT_RETURN, "other traffic from a kube-virt interface is not captured",
                              virt, Return()))
        rules += self.exclude_ifaces("iifname")
        if not c.tproxy and c.inbound_ports != ():
            rules.append(rule(N.RULE_INBOUND_JUMP, "inbound TCP is checked for capture",
                              TCP, Jump(N.ISTIO_INBOUND)))
        return base_chain(N.PREROUTING, rules)

    def istio_inbound(self) -> Chain:
        rules = [ENTRY, *self.inbound_exempt_ports()]
        c = self.c
        if c.inbound_ports is None:
            rules += self.exclude_inbound_ports()
            rules.append(rule(N.RULE_REDIRECT_INBOUND_ALL, "every other inbound TCP port is captured (-b '*')",
                              TCP, Jump(N.ISTIO_IN_REDIRECT)))
        else:
            ref = self.ports(N.SET_INBOUND_PORTS, c.inbound_ports)
            rules.append(rule(N.RULE_REDIRECT_INBOUND_PORTS, "inbound TCP to a port listed in -b is captured",
                              port("tcp dport", ref), Jump(N.ISTIO_IN_REDIRECT)))
        return Chain(N.ISTIO_INBOUND, tuple(rules))

    def nat_output(self) -> Chain:
        return base_chain(N.OUTPUT, [
            *self.base_head(), *self.exclude_ifaces("oifname"),
            rule(N.RULE_OUTPUT_JUMP, "locally generated traffic is checked for capture", Jump(N.ISTIO_OUTPUT))])

    def owner_block(self, who: N.OwnerRules) -> list[Rule]:
        """Istio's three rules per proxy uid (gid); a set makes every id behave as a lone one would."""
        c, kind, key, ref = self.c, who.kind, _OWNER_KEY[who.kind], self.proxy_ids(who)
        dns = self.dns_active
        # Istio's gid in-redirect rule never excludes port 53 (a quirk kept: valid input, same decision).
        dports = (DNS_PORT, c.inbound_tunnel_port) if dns and who is N.UID else c.inbound_tunnel_port
        rules: list[Rule] = []
        for version in self.families:
            rules.append(rule(N.per_family(who.in_redirect, version),
                              f"the proxy ({kind} in proxy-{kind}s) calling its own pod over lo goes to the "
                              "inbound listener",
                              LO_OUT, TCP, address(version, "daddr", self.loopback_dst(version), True),
                              port("tcp dport", dports, True), owner(key, ref), Jump(N.ISTIO_IN_REDIRECT)))
        if not self._include_has_loopback():
            lo_match = [LO_OUT, TCP, port("tcp dport", DNS_PORT, True)] if dns else [LO_OUT]
            rules.append(rule(who.loopback_return,
                              f"app-to-app traffic over lo ({kind} not in proxy-{kind}s) is not captured",
                              *lo_match, owner(key, ref, True), Return()))
        rules.append(rule(who.proxy_return, f"the proxy's own traffic ({kind} in proxy-{kind}s) goes direct",
                          owner(key, ref), Return()))
        return rules

    def _include_has_loopback(self) -> bool:
        cidrs = self.c.service_cidr or ()
        # ipaddress' is_loopback: 127.0.0.0/8 or ::1
        return any((n.value >> 24 == 127) if n.version == 4 else n.value == 1
                   for n in cidrs if n.version in self.families)

    def passthrough_returns(self, why: str, *head: Match) -> list[Rule]:
        """The proxy's inbound passthrough source (127.0.0.6, ::6) talking to the app over lo is left alone."""
        return [rule(N.per_family(N.RULE_INBOUND_PASSTHROUGH_RETURN, version), why.format(src=src.address),
                     *head, address(version, "saddr", src), Return())
                for version, src in ((4, PASSTHROUGH_V4), (6, PASSTHROUGH_V6)) if version in self.families]

    def istio_output(self) -> Chain:
        c = self.c
        rules = [ENTRY]
        if c.local_outbound_ports_exclude:
            ref = self.ports(N.SET_OUTBOUND_EXCLUDE_PORTS, c.local_outbound_ports_exclude)
            rules.append(rule(N.RULE_EXCLUDE_OUTBOUND_PORTS, "TCP/UDP to a port excluded by -o is not captured",
                              TCP_UDP, port("th dport", ref), Return()))
        rules += self.passthrough_returns("the proxy's passthrough connections to the app (from {src}) are not "
                                          "captured", LO_OUT)
        rules += self.owner_block(N.UID)
        rules += self.owner_block(N.GID)
        if c.outbound_owner_groups is None:
            if c.outbound_owner_groups_exclude:
                ref = self.named(N.SET_OWNER_GROUPS_EXCLUDE, "gid", sorted(c.outbound_owner_groups_exclude))
                rules.append(rule(N.RULE_OWNER_GROUPS_EXCLUDE_RETURN,
                                  "traffic of an excluded owner group is not captured", owner("skgid", ref),
                                  Return()))
        else:
            ref = self.named(N.SET_OWNER_GROUPS, "gid", sorted(c.outbound_owner_groups))
            rules.append(rule(N.RULE_OWNER_GROUPS_RETURN, "only traffic of the listed owner groups is captured",
                              owner("skgid", ref, True), Return()))
        if self.dns_active:
            rules.append(rule(N.RULE_DNS_JUMP, "DNS is checked for capture to the agent", Jump(N.ISTIO_OUTPUT_DNS)))
        for version in self.families:
            rules.append(rule(N.per_family(N.RULE_LOOPBACK_RETURN, version), "loopback destinations are not captured",
                              address(version, "daddr", self.loopback_dst(version)), Return()))
        for version in self.cidr_families(c.service_exclude_cidr):
            ref = self.cidrs(N.SET_EXCLUDE_CIDRS, c.service_exclude_cidr, version)
            rules.append(rule(N.per_family(N.RULE_EXCLUDE_CIDRS_RETURN, version),
                              "destinations excluded by -x are not captured",
                              address(version, "daddr", ref), Return()))
        if c.outbound_ports:
            ref = self.ports(N.SET_OUTBOUND_PORTS, c.outbound_ports)
            rules.append(rule(N.RULE_REDIRECT_OUTBOUND_PORTS, "TCP to a port listed in -q is captured",
                              port("tcp dport", ref), Jump(N.ISTIO_REDIRECT)))
        if c.service_cidr is None:
            rules.append(rule(N.RULE_REDIRECT_OUTBOUND_ALL, "every other outbound TCP is captured (-i '*')",
                              Jump(N.ISTIO_REDIRECT)))
        else:
            for version in self.cidr_families(c.service_cidr):
                ref = self.cidrs(N.SET_INCLUDE_CIDRS, c.service_cidr, version)
                rules.append(rule(N.per_family(N.RULE_REDIRECT_OUTBOUND_CIDRS, version),
                                  "outbound TCP to a CIDR listed in -i is captured",
                                  address(version, "daddr", ref), Jump(N.ISTIO_REDIRECT)))
        return Chain(N.ISTIO_OUTPUT, tuple(rules))

    def istio_output_dns(self) -> Chain:
        rules = [ENTRY]
        redirect = Redirect(DNS_AGENT_PORT)
        why = f"DNS is sent to the agent's DNS proxy :{DNS_AGENT_PORT}"
        if self.c.capture_all_dns:
            rules.append(rule(N.RULE_DNS_REDIRECT, why + " (any server)", TCP_UDP, port("th dport", DNS_PORT),
                              redirect))
        else:
            for version, ref in self.dns_servers().items():
                rules.append(rule(N.per_family(N.RULE_DNS_REDIRECT, version), why + " (resolv.conf servers)",
                                  TCP_UDP, port("th dport", DNS_PORT), address(version, "daddr", ref), redirect))
        return Chain(N.ISTIO_OUTPUT_DNS, tuple(rules))

    # -- mangle (TPROXY, drop-invalid) -------------------------------------------------------------
    def mangle_prerouting(self) -> Chain:
        c = self.c
        rules = self.base_head()
        if c.tproxy:
            rules += self.exclude_ifaces("iifname")
        if c.drop_invalid:
            rules.append(rule(N.RULE_DROP_INVALID, "TCP packets conntrack marks invalid are dropped",
                              TCP, ct_state("invalid"), Drop()))
        if c.tproxy:
            if c.inbound_ports != ():
                rules.append(rule(N.RULE_TPROXY_INBOUND_JUMP, "inbound TCP is checked for TPROXY capture",
                                  TCP, Jump(N.TPROXY_INBOUND)))
            rules.append(rule(N.RULE_SAVE_MARK, "the TPROXY mark is saved on the connection",
                              TCP, mark(c.inbound_tproxy_mark), CtMarkFromMark()))
        return base_chain(N.MANGLE_PREROUTING, rules)

    def tproxy_inbound(self) -> Chain:
        c = self.c
        rules = [ENTRY,
                 rule(N.RULE_TPROXY_MARK_RETURN, "packets already marked for TPROXY are done",
                      TCP, mark(c.inbound_tproxy_mark), Return()),
                 *self.passthrough_returns("the proxy's passthrough connections to the app are not captured",
                                           LO_IN, TCP),
                 rule(N.RULE_APP_LOOPBACK_RETURN, "loopback traffic without the proxy's outbound mark is not "
                      "captured", LO_IN, TCP, mark(OUTBOUND_MARK, True), Return())]
        # Istio TPROXYs the tunnel port; interceptd exempts it in both modes (docs/istio-compatibility.md,
        # "Deliberate differences").
        rules += self.inbound_exempt_ports()
        divert = Jump(N.ISTIO_DIVERT)
        established = ct_state("established", "related")
        if c.inbound_ports is None:
            rules += self.exclude_inbound_ports()
            rules.append(rule(N.RULE_DIVERT_ESTABLISHED, "packets of captured connections go to the listener",
                              TCP, established, divert))
            rules.append(rule(N.RULE_TPROXY_INBOUND_ALL, "every other inbound TCP port is captured (-b '*')",
                              TCP, Jump(N.ISTIO_TPROXY)))
        elif c.inbound_ports:
            ref = self.ports(N.SET_INBOUND_PORTS, c.inbound_ports)
            rules.append(rule(N.RULE_DIVERT_ESTABLISHED, "packets of captured connections go to the listener",
                              port("tcp dport", ref), established, divert))
            rules.append(rule(N.RULE_TPROXY_INBOUND_PORTS, "inbound TCP to a port listed in -b is captured",
                              port("tcp dport", ref), Jump(N.ISTIO_TPROXY)))
        return Chain(N.TPROXY_INBOUND, tuple(rules))

    def istio_divert(self) -> Chain:
        return Chain(N.ISTIO_DIVERT, (ENTRY, rule(N.RULE_DIVERT, "mark the packet and deliver it locally",
                                                  SetMark(self.c.inbound_tproxy_mark), Accept())))

    def istio_tproxy(self) -> Chain:
        rules = [ENTRY]
        for version in self.families:
            rules.append(rule(N.per_family(N.RULE_TPROXY, version),
                              f"captured to the inbound listener :{self.c.inbound_capture_port} (TPROXY, original "
                              "destination kept on the socket)", TCP,
                              address(version, "daddr", self.loopback_dst(version), True),
                              TProxy("ip" if version == 4 else "ip6", self.c.inbound_capture_port),
                              SetMark(self.c.inbound_tproxy_mark), Accept()))
        return Chain(N.ISTIO_TPROXY, tuple(rules))

    def mangle_output(self) -> Chain:
        rules = [*self.base_head(), *self.exclude_ifaces("oifname"),
                 rule(N.RULE_TPROXY_MARK_RETURN, "packets already marked for TPROXY are done",
                      LO_OUT, TCP, mark(self.c.inbound_tproxy_mark), Return())]
        for who in (N.UID, N.GID):
            for version in self.families:
                rules.append(rule(N.per_family(who.outbound_mark, version),
                                  "the proxy calling its own pod over lo is tagged for TPROXY capture",
                                  LO_OUT, TCP, address(version, "daddr", self.loopback_dst(version), True),
                                  owner(_OWNER_KEY[who.kind], self.proxy_ids(who)), SetMark(OUTBOUND_MARK)))
        rules.append(rule(N.RULE_RESTORE_MARK, "replies of TPROXY connections carry the mark back",
                          TCP, ct_mark(self.c.inbound_tproxy_mark), MarkFromCtMark()))
        return base_chain(N.MANGLE_OUTPUT, rules)

    # -- raw (DNS conntrack zones) -----------------------------------------------------------------
    def raw_output(self) -> Chain:
        rules = self.base_head()
        udp53 = port("udp dport", DNS_PORT)
        for who in (N.UID, N.GID):
            ids = owner(_OWNER_KEY[who.kind], self.proxy_ids(who))
            rules.append(rule(who.dns_upstream_zone, "the proxy's queries to resolvers use zone 1",
                              udp53, ids, SetCtZone(1)))
            rules.append(rule(who.dns_agent_zone, "the DNS agent's answers to apps use zone 2",
                              port("udp sport", DNS_AGENT_PORT), ids, SetCtZone(2)))
        if self.c.capture_all_dns:
            rules.append(rule(N.RULE_APP_DNS_ZONE, "apps' DNS queries use zone 2", udp53, SetCtZone(2)))
        else:
            for version, ref in self.dns_servers().items():
                rules.append(rule(N.per_family(N.RULE_APP_DNS_ZONE, version), "apps' DNS queries use zone 2",
                                  udp53, address(version, "daddr", ref), SetCtZone(2)))
        return base_chain(N.RAW_OUTPUT, rules)

    def raw_prerouting(self) -> Chain:
        rules = self.base_head()
        sport = port("udp sport", DNS_PORT)
        if self.c.capture_all_dns:
            rules.append(rule(N.RULE_DNS_REPLY_ZONE, "resolver replies use zone 1", sport, SetCtZone(1)))
        else:
            for version, ref in self.dns_servers().items():
                rules.append(rule(N.per_family(N.RULE_DNS_REPLY_ZONE, version), "resolver replies use zone 1",
                                  sport, address(version, "saddr", ref), SetCtZone(1)))
        return base_chain(N.RAW_PREROUTING, rules)

    def istio_redirect(self) -> Chain:
        port = self.c.envoy_port
        return Chain(N.ISTIO_REDIRECT, (ENTRY, rule(
            N.RULE_REDIRECT_OUTBOUND, f"captured to the proxy's outbound listener :{port}, original destination "
            "kept", TCP, Redirect(port))))

    def istio_in_redirect(self) -> Chain:
        port = self.c.inbound_capture_port
        return Chain(N.ISTIO_IN_REDIRECT, (ENTRY, rule(
            N.RULE_REDIRECT_INBOUND, f"captured to the proxy's inbound listener :{port}, original destination "
            "kept", TCP, Redirect(port))))

    def build(self) -> Ruleset:
        c = self.c
        chains = [
            self.nat_prerouting(), self.nat_output(), self.istio_inbound(), self.istio_redirect(),
            self.istio_in_redirect(), self.istio_output(),
        ]
        if self.dns_active:
            chains += [self.istio_output_dns(), self.raw_prerouting(), self.raw_output()]
        if c.tproxy or c.drop_invalid:
            chains.append(self.mangle_prerouting())
        routes: tuple[PolicyRoute, ...] = ()
        if c.tproxy:
            chains.append(self.mangle_output())
            chains.append(self.tproxy_inbound())
            if c.inbound_ports != ():
                chains += [self.istio_divert(), self.istio_tproxy()]
                routes = tuple(PolicyRoute(v, c.inbound_tproxy_mark, c.inbound_tproxy_route_table)
                               for v in self.families)
        return Ruleset(c.table, tuple(chains), tuple(sorted(self.sets.values(), key=lambda s: s.name)),
                       routes=routes, lo_addresses=(PASSTHROUGH_V6.address,) if self.f.ipv6 else ())


_OWNER_KEY: dict[str, OwnerKey] = {N.UID.kind: "skuid", N.GID.kind: "skgid"}


LOOPBACK_V4 = Prefix(4, 0x7F000001, 32, "127.0.0.1")


class _AmbientBuilder(_Builder):
    """istio-cni's in-pod rules for ambient mode (docs/ambient.md): the pod's TCP goes to a node proxy that listens
    inside the pod's namespace. The proxy is not a local user, so its sockets are told apart by a packet mark
    (`ambient_mark` under `ambient_mark_mask`) instead of an owner; the connections it makes into the pod get a
    conntrack mark so the app's replies are routed back to it (the policy route to `ambient_route_table`)."""

    def proxy_mark(self, negate: bool = False) -> Match:
        return mark(self.c.ambient_mark, negate, self.c.ambient_mark_mask)

    def loopback_dst(self, version: int) -> IPNetwork:
        """Istio's ambient rules exempt 127.0.0.1 and ::1 only (--outbound-ipv4-loopback-cidr is istio-iptables')."""
        return LOOPBACK_V4 if version == 4 else LOOPBACK_V6

    def probe(self, version: int) -> IPNetwork:
        c = self.c
        return c.ambient_probe_address if version == 4 else c.ambient_probe_address_v6

    @property
    def dns_active(self) -> bool:
        """Ambient captures DNS to any server (as Istio's in-pod rules do): resolv.conf is not read."""
        return self.c.redirect_dns

    def nat_prerouting(self) -> Chain:
        rules = self.base_head()
        c = self.c
        if c.kube_virt_interfaces:
            virt = self.kube_virt()
            rules.append(rule(N.RULE_KUBE_VIRT_REDIRECT, "TCP arriving on a virtual interface (-k) is outbound",
                              TCP, virt, Jump(N.ISTIO_REDIRECT)))
            rules.append(rule(N.RULE_KUBE_VIRT_RETURN, "nothing else is done with TCP from a virtual interface",
                              TCP, virt, Return()))
        if not c.ambient_ingress:
            for version in self.families:
                probe = self.probe(version)
                rules.append(rule(N.per_family(N.RULE_PROBE_ACCEPT, version),
                                  f"the node's health probes (SNATed to {probe.address}) are not captured",
                                  TCP, address(version, "saddr", probe), Accept()))
            rules.append(rule(N.RULE_INBOUND_JUMP, "inbound TCP is checked for capture", TCP, Jump(N.ISTIO_INBOUND)))
        return base_chain(N.PREROUTING, rules)

    def istio_inbound(self) -> Chain:
        rules = [ENTRY, *self.inbound_exempt_ports()]
        for version in self.families:
            rules.append(rule(N.per_family(N.RULE_LOOPBACK_RETURN, version), "loopback destinations are not captured",
                              address(version, "daddr", self.loopback_dst(version)), Return()))
        rules.append(rule(N.RULE_PROXY_MARK_RETURN, f"the node proxy's own connections (mark "
                          f"{self.c.ambient_mark:#x}) are not captured", self.proxy_mark(), Return()))
        rules.append(rule(N.RULE_REDIRECT_INBOUND_ALL, "every other inbound TCP is captured", TCP,
                          Jump(N.ISTIO_IN_REDIRECT)))
        return Chain(N.ISTIO_INBOUND, tuple(rules))

    def istio_output(self) -> Chain:
        c = self.c
        rules = [ENTRY]
        for version in self.families:
            probe = self.probe(version)
            rules.append(rule(N.per_family(N.RULE_PROBE_REPLY_ACCEPT, version),
                              f"the pod's answers to the node's health probes ({probe.address}) go direct",
                              TCP, address(version, "daddr", probe), Accept()))
        rules.append(rule(N.RULE_PROXY_MARK_RETURN, f"the node proxy's own connections (mark {c.ambient_mark:#x}) "
                          "go direct", self.proxy_mark(), Return()))
        if self.dns_active:
            rules.append(rule(N.RULE_DNS_JUMP, "DNS is checked for capture to the node proxy's DNS proxy",
                              Jump(N.ISTIO_OUTPUT_DNS)))
        rules.append(rule(N.RULE_PROXIED_ACCEPT, f"TCP carrying the proxied-connection mark {c.ambient_connmark:#x} "
                          "goes direct", TCP, mark(c.ambient_connmark, mask=c.ambient_mark_mask), Accept()))
        for version in self.families:
            rules.append(rule(N.per_family(N.RULE_POD_SELF_ACCEPT, version),
                              "the app calling its own pod over lo stays local",
                              LO_OUT, address(version, "daddr", self.loopback_dst(version), True), Accept()))
        for version in self.families:
            rules.append(rule(N.per_family(N.RULE_LOOPBACK_RETURN, version), "loopback destinations are not captured",
                              address(version, "daddr", self.loopback_dst(version)), Return()))
        rules.append(rule(N.RULE_REDIRECT_OUTBOUND_ALL, "every other outbound TCP is captured", TCP,
                          Jump(N.ISTIO_REDIRECT)))
        return Chain(N.ISTIO_OUTPUT, tuple(rules))

    def istio_output_dns(self) -> Chain:
        port_ = self.c.ambient_dns_port
        redirect = Redirect(port_)
        rules = [ENTRY, rule(N.RULE_DNS_REDIRECT_UDP, f"UDP DNS not sent over lo goes to the DNS proxy :{port_}",
                             interface("oifname", "lo", True), port("udp dport", DNS_PORT), redirect)]
        for version in self.families:
            rules.append(rule(N.per_family(N.RULE_DNS_REDIRECT_TCP, version),
                              f"TCP DNS to a non-loopback server goes to the DNS proxy :{port_}",
                              address(version, "daddr", self.loopback_dst(version), True), port("tcp dport", DNS_PORT),
                              redirect))
        return Chain(N.ISTIO_OUTPUT_DNS, tuple(rules))

    def mangle_prerouting(self) -> Chain:
        c = self.c
        return base_chain(N.MANGLE_PREROUTING, [*self.base_head(), rule(
            N.RULE_SAVE_MARK, f"the node proxy's connections into the pod get conntrack mark {c.ambient_connmark:#x}",
            self.proxy_mark(), SetCtMarkBits(c.ambient_connmark, c.ambient_mark_mask))])

    def mangle_output(self) -> Chain:
        c = self.c
        return base_chain(N.MANGLE_OUTPUT, [*self.base_head(), rule(
            N.RULE_RESTORE_MARK, f"replies on the proxy's connections carry mark {c.ambient_connmark:#x}, which routes "
            f"them back to the proxy (table {c.ambient_route_table})",
            ct_mark(c.ambient_connmark, c.ambient_mark_mask), MarkFromCtMark())])

    def raw_output(self) -> Chain:
        return base_chain(N.RAW_OUTPUT, [*self.base_head(), rule(
            N.RULE_PROXY_DNS_ZONE, "the node proxy's queries to resolvers use zone 1", port("udp dport", DNS_PORT),
            self.proxy_mark(), SetCtZone(1))])

    def raw_prerouting(self) -> Chain:
        return base_chain(N.RAW_PREROUTING, [*self.base_head(), rule(
            N.RULE_DNS_REPLY_ZONE, "resolver replies not carrying the proxy's mark use zone 1",
            port("udp sport", DNS_PORT), self.proxy_mark(True), SetCtZone(1))])

    def build(self) -> Ruleset:
        c = self.c
        chains = [self.nat_prerouting(), self.nat_output()]
        if not c.ambient_ingress:
            chains += [self.istio_inbound(), self.istio_in_redirect()]
        chains += [self.istio_redirect(), self.istio_output()]
        if self.dns_active:
            chains += [self.istio_output_dns(), self.raw_prerouting(), self.raw_output()]
        chains += [self.mangle_prerouting(), self.mangle_output()]
        routes = tuple(PolicyRoute(v, c.ambient_connmark, c.ambient_route_table, c.ambient_mark_mask)
                       for v in self.families)
        return Ruleset(c.table, tuple(chains), tuple(sorted(self.sets.values(), key=lambda s: s.name)),
                       routes=routes)


def _is_loopback_host(host: str) -> bool:
    """ipaddress' is_loopback of the metrics listener's host (127.0.0.1 by default): ipaddress reads only a
    spelling other than its own."""
    plain = address_value(host)
    if plain is not None:
        return is_loopback(*plain)
    import ipaddress

    return ipaddress.ip_address(host).is_loopback


def render(config: Config, facts: HostFacts) -> Ruleset:
    builder = _AmbientBuilder if config.ambient else _Builder
    return builder(config, facts).build()
