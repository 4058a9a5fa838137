"""What Istio itself installs for a config: the one-rule-per-entry layouts interceptd is compared against.

Three renderings of the same rules, from interceptd's Config:
- nft text as Istio's nftables backend feeds it to `nft -f` (add table, flush table, add chain, add rule);
- the same transaction as libnftables JSON (for `nft -j -f`);
- iptables-restore input of Istio's iptables backend (nat table, ISTIO_* chains).

Only what the benchmarks use is covered: REDIRECT mode, IPv4, no DNS capture, `-i '*'`, `-b '*'` or a
port list. Anything else raises, so a benchmark cannot silently compare against the wrong layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from interceptd.config import Config
from interceptd.config.values import PortRange

TABLE = "istio-proxy-nat"
Json = dict[str, Any]


@dataclass(frozen=True)
class Term:
    """One piece of a rule, spelled for nft's text parser, for libnftables JSON and for iptables."""

    nft: str
    json: Json | None  # None: the piece has no JSON expression of its own
    ipt: str


def _match(left: Json, right: Any, negate: bool = False) -> Json:
    return {"match": {"op": "!=" if negate else "==", "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _not(negate: bool) -> str:
    return "!= " if negate else ""


def tcp() -> Term:
    return Term("meta l4proto tcp", _match(_meta("l4proto"), "tcp"), "-p tcp")


def dport(port: int, negate: bool = False) -> Term:
    return Term(f"tcp dport {_not(negate)}{port}", _match(_payload("tcp", "dport"), port, negate),
                f"-m tcp {'! ' if negate else ''}--dport {port}")


def daddr(cidr: str, negate: bool = False) -> Term:
    addr, _, plen = cidr.partition("/")
    right: Any = {"prefix": {"addr": addr, "len": int(plen)}} if plen and plen != "32" else addr
    return Term(f"ip daddr {_not(negate)}{cidr}", _match(_payload("ip", "daddr"), right, negate),
                f"{'! ' if negate else ''}-d {cidr}")


def saddr(cidr: str) -> Term:
    addr, _, plen = cidr.partition("/")
    right: Any = {"prefix": {"addr": addr, "len": int(plen)}} if plen and plen != "32" else addr
    return Term(f"ip saddr {cidr}", _match(_payload("ip", "saddr"), right), f"-s {cidr}")


def oif(name: str) -> Term:
    return Term(f"oifname {name}", _match(_meta("oifname"), name), f"-o {name}")


def owner(key: str, ident: int, negate: bool = False) -> Term:
    flag = "--uid-owner" if key == "skuid" else "--gid-owner"
    return Term(f"{key} {_not(negate)}{ident}", _match(_meta(key), ident, negate),
                f"-m owner {'! ' if negate else ''}{flag} {ident}")


COUNTER = Term("counter", {"counter": None}, "")


def jump(chain: str) -> Term:
    return Term(f"jump {chain}", {"jump": {"target": chain}}, f"-j {IPT_CHAINS.get(chain, chain)}")


RETURN = Term("return", {"return": None}, "-j RETURN")


def redirect(port: int) -> Term:
    return Term(f"redirect to :{port}", {"redirect": {"port": port}}, f"-j REDIRECT --to-ports {port}")


IPT_CHAINS = {"prerouting": "PREROUTING", "output": "OUTPUT", "istio-inbound": "ISTIO_INBOUND",
              "istio-redirect": "ISTIO_REDIRECT", "istio-in-redirect": "ISTIO_IN_REDIRECT",
              "istio-output": "ISTIO_OUTPUT"}
BASE_CHAINS = {"prerouting": "prerouting", "output": "output"}


def _ports(ranges: tuple[PortRange, ...]) -> list[int]:
    return [p for r in ranges for p in range(r.first, r.last + 1)]


def rules(config: Config) -> list[tuple[str, list[Term]]]:
    """(chain, terms) in Istio's build order; every rule carries a counter, as Istio's do."""
    c = config
    if c.tproxy or c.redirect_dns or c.service_cidr is not None or c.outbound_ports or c.exclude_interfaces \
            or c.kube_virt_interfaces or c.local_outbound_ports_exclude or c.outbound_owner_groups is not None \
            or c.outbound_owner_groups_exclude or c.drop_invalid:
        raise ValueError("istio_layout covers only REDIRECT, -i '*', no DNS, -c, -k, -q, -o or owner groups")
    lo4 = str(c.outbound_ipv4_loopback_cidr)
    out: list[tuple[str, list[Term]]] = []

    def add(chain: str, *terms: Term) -> None:
        verdict = terms[-1]
        out.append((chain, [*terms[:-1], COUNTER, verdict]))

    if c.inbound_ports != ():
        add("prerouting", tcp(), jump("istio-inbound"))
    add("output", jump("istio-output"))
    add("istio-inbound", tcp(), dport(c.inbound_tunnel_port), RETURN)
    if c.inbound_ports is None:
        for port in _ports(c.local_exclude_ports):
            add("istio-inbound", tcp(), dport(port), RETURN)
        add("istio-inbound", tcp(), jump("istio-in-redirect"))
    else:
        for port in _ports(c.inbound_ports):
            add("istio-inbound", tcp(), dport(port), jump("istio-in-redirect"))
    add("istio-redirect", tcp(), redirect(c.envoy_port))
    add("istio-in-redirect", tcp(), redirect(c.inbound_capture_port))
    add("istio-output", oif("lo"), saddr("127.0.0.6/32"), RETURN)
    for key, ids in (("skuid", c.proxy_uid), ("skgid", c.proxy_gid)):
        for ident in ids:
            add("istio-output", oif("lo"), tcp(), daddr(lo4, True), dport(c.inbound_tunnel_port, True),
                owner(key, ident), jump("istio-in-redirect"))
            add("istio-output", oif("lo"), owner(key, ident, True), RETURN)
            add("istio-output", owner(key, ident), RETURN)
    add("istio-output", daddr(lo4), RETURN)
    for net in c.service_exclude_cidr:
        if net.version == 4:
            add("istio-output", daddr(str(net)), RETURN)
    add("istio-output", jump("istio-redirect"))
    return out


def _chains(built: list[tuple[str, list[Term]]]) -> list[str]:
    """Chains in order of first use: Istio creates a chain only when it has a rule."""
    names: list[str] = []
    for chain, _ in built:
        if chain not in names:
            names.append(chain)
    return names


def nft_text(config: Config) -> str:
    """The transaction Istio's nftables backend hands to `nft -f -`."""
    built = rules(config)
    lines = [f"add table inet {TABLE}", f"flush table inet {TABLE}"]
    for chain in _chains(built):
        if chain in BASE_CHAINS:
            lines.append(f"add chain inet {TABLE} {chain} {{ type nat hook {chain} priority -100 ; "
                         "policy accept ; }")
        else:
            lines.append(f"add chain inet {TABLE} {chain}")
    lines += [f"add rule inet {TABLE} {chain} {' '.join(t.nft for t in terms)}" for chain, terms in built]
    return "\n".join(lines) + "\n"


def nft_json(config: Config) -> Json:
    """The same transaction as libnftables JSON (what `nft -j -f` reads)."""
    built = rules(config)
    ref = {"family": "inet", "name": TABLE}
    cmds: list[Json] = [{"add": {"table": ref}}, {"flush": {"table": ref}}]
    for chain in _chains(built):
        body: Json = {"family": "inet", "table": TABLE, "name": chain}
        if chain in BASE_CHAINS:
            body.update(type="nat", hook=chain, prio=-100, policy="accept")
        cmds.append({"add": {"chain": body}})
    for chain, terms in built:
        expr = [t.json for t in terms if t.json is not None]
        cmds.append({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": expr}}})
    return {"nftables": cmds}


def iptables_restore(config: Config) -> str:
    """Istio's iptables backend, as one `iptables-restore` nat table."""
    built = rules(config)
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]"]
    lines += [f":{IPT_CHAINS[c]} - [0:0]" for c in _chains(built) if c not in BASE_CHAINS]
    for chain, terms in built:
        # iptables-restore wants matches before the target; counters are implicit.
        lines.append(" ".join(["-A", IPT_CHAINS[chain], *(t.ipt for t in terms if t.ipt)]))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
