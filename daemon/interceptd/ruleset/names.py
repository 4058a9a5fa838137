"""Every name interceptd's table is made of: chains, base chain hooks, sets, rules and their counters.

Why one module: the names are an interface, not decoration. A rule's name is its nft comment, the suffix of its
named counter, the `rule` label of its metrics, and what `status`, `explain` and the drift log print; renaming
one breaks dashboards and alerts. Writing each name once here makes every renamed or added name visible in one
diff, and lets the renderer, the kernel-listing parser, `explain` and the tests refer to the same constant
instead of repeating a string. The golden renders under tests/golden pin the spelling byte for byte.

Names that exist once per address family or per owner kind are spelled out too (`RULE_LOOPBACK_RETURN_V6`
comes from `per_family`, the uid/gid rules from `UID` and `GID`), so a grep finds every variant.
"""

from __future__ import annotations

from interceptd.records import record

# -- counters ---------------------------------------------------------------------------------------------
# Every rule carries the named counter "<chain>/<rule>"; the rule named ENTRY (first in every chain, no
# statements) only counts, so its counter is the chain's traffic.
COUNTER_SEPARATOR = "/"
ENTRY = "entry"


def counter_name(chain: str, rule: str) -> str:
    return f"{chain}{COUNTER_SEPARATOR}{rule}"


def split_counter_name(name: str) -> tuple[str, str]:
    """(chain, rule) of a counter name; rule names never hold the separator, chain names neither."""
    chain, _, rule = name.partition(COUNTER_SEPARATOR)
    return chain, rule


def unnamed_rule(handle: object) -> str:
    """The name given to a listed rule without a comment (someone else's rule in our table)."""
    return f"handle-{handle}"


def per_family(name: str, version: int) -> str:
    """An IPv4 rule or set keeps its name; its IPv6 twin gets the suffix "-v6"."""
    return name if version == 4 else f"{name}-v6"


# -- base chains (their hooks: render.BASE_CHAINS) ---------------------------------------------------------
PREROUTING = "prerouting"  # nat
OUTPUT = "output"  # nat
MANGLE_PREROUTING = "mangle-prerouting"
MANGLE_OUTPUT = "mangle-output"
RAW_PREROUTING = "raw-prerouting"
RAW_OUTPUT = "raw-output"
POSTROUTING = "postrouting"  # nat, the host probe table's only chain
BASE_CHAIN_POLICY = "accept"

# -- regular chains (Istio's names, so `nft list` reads like Istio's listing) -------------------------------
ISTIO_INBOUND = "istio-inbound"
ISTIO_REDIRECT = "istio-redirect"
ISTIO_IN_REDIRECT = "istio-in-redirect"
ISTIO_OUTPUT = "istio-output"
ISTIO_OUTPUT_DNS = "istio-output-dns"
TPROXY_INBOUND = "tproxy-inbound"  # Istio's mangle istio-inbound; one inet table needs another name
ISTIO_DIVERT = "istio-divert"
ISTIO_TPROXY = "istio-tproxy"

# -- named sets --------------------------------------------------------------------------------------------
SET_PROXY_UIDS = "proxy-uids"
SET_PROXY_GIDS = "proxy-gids"
SET_EXCLUDE_INTERFACES = "exclude-interfaces"
SET_KUBE_VIRT_INTERFACES = "kube-virt-interfaces"
SET_INBOUND_PORTS = "inbound-ports"
SET_INBOUND_EXCLUDE_PORTS = "inbound-exclude-ports"
SET_OUTBOUND_PORTS = "outbound-ports"
SET_OUTBOUND_EXCLUDE_PORTS = "outbound-exclude-ports"
SET_OWNER_GROUPS = "owner-groups"
SET_OWNER_GROUPS_EXCLUDE = "owner-groups-exclude"
# One set per address family: an nft set holds one address type.
SET_INCLUDE_CIDRS = {4: "include-cidrs-v4", 6: "include-cidrs-v6"}
SET_EXCLUDE_CIDRS = {4: "exclude-cidrs-v4", 6: "exclude-cidrs-v6"}
SET_DNS_SERVERS = {4: "dns-servers-v4", 6: "dns-servers-v6"}
SET_PROBE_PODS = {4: "probe-pods-v4", 6: "probe-pods-v6"}  # the host probe table: the ambient pods' addresses

# -- rules -------------------------------------------------------------------------------------------------
# Rules with "-v6" twins are listed under their IPv4 name; per_family(RULE_X, 6) is the twin.

# every base chain
RULE_IPV6_DISABLED_RETURN = "ipv6-disabled-return"
RULE_EXCLUDE_INTERFACES_RETURN = "exclude-interfaces-return"

# nat prerouting
RULE_KUBE_VIRT_REDIRECT = "kube-virt-redirect"  # per family with an -i CIDR list
RULE_KUBE_VIRT_RETURN = "kube-virt-return"
RULE_INBOUND_JUMP = "inbound-jump"

# istio-inbound (nat) and tproxy-inbound (mangle) share the exemptions
RULE_TUNNEL_PORT_RETURN = "tunnel-port-return"
RULE_METRICS_PORT_RETURN = "metrics-port-return"
RULE_EXCLUDE_INBOUND_PORTS = "exclude-inbound-ports"
RULE_REDIRECT_INBOUND_ALL = "redirect-inbound-all"
RULE_REDIRECT_INBOUND_PORTS = "redirect-inbound-ports"

# nat output
RULE_OUTPUT_JUMP = "output-jump"

# istio-output
RULE_EXCLUDE_OUTBOUND_PORTS = "exclude-outbound-ports"
RULE_INBOUND_PASSTHROUGH_RETURN = "inbound-passthrough-return"  # per family; also in tproxy-inbound
RULE_OWNER_GROUPS_EXCLUDE_RETURN = "owner-groups-exclude-return"
RULE_OWNER_GROUPS_RETURN = "owner-groups-return"
RULE_DNS_JUMP = "dns-jump"
RULE_LOOPBACK_RETURN = "loopback-return"  # per family
RULE_EXCLUDE_CIDRS_RETURN = "exclude-cidrs-return"  # per family
RULE_REDIRECT_OUTBOUND_PORTS = "redirect-outbound-ports"
RULE_REDIRECT_OUTBOUND_ALL = "redirect-outbound-all"
RULE_REDIRECT_OUTBOUND_CIDRS = "redirect-outbound-cidrs"  # per family

# istio-redirect, istio-in-redirect, istio-output-dns
RULE_REDIRECT_OUTBOUND = "redirect-outbound"
RULE_REDIRECT_INBOUND = "redirect-inbound"
RULE_DNS_REDIRECT = "dns-redirect"  # per family without --capture-all-dns

# mangle prerouting, tproxy-inbound, istio-divert, istio-tproxy, mangle output
RULE_DROP_INVALID = "drop-invalid"
RULE_TPROXY_INBOUND_JUMP = "tproxy-inbound-jump"
RULE_SAVE_MARK = "save-mark"
RULE_TPROXY_MARK_RETURN = "tproxy-mark-return"  # tproxy-inbound and mangle-output
RULE_APP_LOOPBACK_RETURN = "app-loopback-return"
RULE_DIVERT_ESTABLISHED = "divert-established"
RULE_TPROXY_INBOUND_ALL = "tproxy-inbound-all"
RULE_TPROXY_INBOUND_PORTS = "tproxy-inbound-ports"
RULE_DIVERT = "divert"
RULE_TPROXY = "tproxy"  # per family
RULE_RESTORE_MARK = "restore-mark"

# raw output and prerouting (DNS conntrack zones)
RULE_APP_DNS_ZONE = "app-dns-zone"  # per family without --capture-all-dns
RULE_DNS_REPLY_ZONE = "dns-reply-zone"  # per family without --capture-all-dns

# ambient (--capture-mode ambient) reuses the chains and rule names above where a rule plays the same role
# (inbound-jump, tunnel-port-return, loopback-return, redirect-*-all, dns-jump, save-mark, restore-mark,
# dns-reply-zone, kube-virt-*); these are its own.
RULE_PROBE_ACCEPT = "probe-accept"  # per family; nat prerouting
RULE_PROBE_REPLY_ACCEPT = "probe-reply-accept"  # per family; istio-output
RULE_PROXY_MARK_RETURN = "proxy-mark-return"  # istio-inbound, istio-output
RULE_PROXIED_ACCEPT = "proxied-accept"  # istio-output
RULE_POD_SELF_ACCEPT = "pod-self-accept"  # per family; istio-output
RULE_DNS_REDIRECT_UDP = "dns-redirect-udp"  # istio-output-dns
RULE_DNS_REDIRECT_TCP = "dns-redirect-tcp"  # per family; istio-output-dns
RULE_PROXY_DNS_ZONE = "proxy-dns-upstream-zone"  # raw output

# the host probe table (`interceptd node --ambient-host-rules`): interceptd's only table in the node's own
# namespace, separate from the pods' table name so that nothing rendered for a pod can ever land there.
HOST_TABLE = "interceptd-host"
RULE_PROBE_SNAT = "probe-snat"  # per family; postrouting


@record
class OwnerRules:
    """The rules written once for the proxy's uids and once for its gids (Istio's blocks per -u and -g)."""

    kind: str  # "uid" | "gid"
    set: str
    in_redirect: str  # per family
    loopback_return: str
    proxy_return: str
    outbound_mark: str  # per family (TPROXY)
    dns_upstream_zone: str
    dns_agent_zone: str


UID = OwnerRules("uid", SET_PROXY_UIDS, "proxy-uid-in-redirect", "app-loopback-uid-return", "proxy-uid-return",
                 "proxy-uid-outbound-mark", "proxy-uid-dns-upstream-zone", "proxy-uid-dns-agent-zone")
GID = OwnerRules("gid", SET_PROXY_GIDS, "proxy-gid-in-redirect", "app-loopback-gid-return", "proxy-gid-return",
                 "proxy-gid-outbound-mark", "proxy-gid-dns-upstream-zone", "proxy-gid-dns-agent-zone")
