"""Hand-written libnftables JSON documents, each refused or accepted by the real kernel (libnftables 1.0.6).

The unit tests run them through FakeKernel and the integration equivalence test through both NftKernel (in
a lab namespace) and FakeKernel: a fake that drifts from the kernel fails there. Each case starts without
the table; `setup` is applied first (it must be accepted), then `document` is the transaction judged.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from interceptd.config import load
from interceptd.errors import KernelRefusedError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import Existing, Json, deletion, transaction
from interceptd.ruleset.render import render
from interceptd.system.kernel import Kernel

TABLE = "interceptd-fake"
TABLE_REF = {"family": "inet", "name": TABLE}
AT = {"family": "inet", "table": TABLE}
TCP = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
DPORT = {"payload": {"protocol": "tcp", "field": "dport"}}
DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}


@dataclass(frozen=True)
class Case:
    name: str
    accepted: bool
    document: list[Json]
    setup: list[Json] = field(default_factory=list)

    def __str__(self) -> str:
        return self.name


def table() -> Json:
    return {"add": {"table": TABLE_REF}}


def chain(name: str, hook: tuple[str, str, int] | None = None, policy: str = "accept") -> Json:
    body: Json = {**AT, "name": name}
    if hook is not None:
        body.update(type=hook[0], hook=hook[1], prio=hook[2], policy=policy)
    return {"add": {"chain": body}}


def rule(chain_name: str, *expr: Json) -> Json:
    return {"add": {"rule": {**AT, "chain": chain_name, "expr": list(expr)}}}


def nset(name: str, type_: str, elem: list[Any] | None = None, interval: bool = False) -> Json:
    body: Json = {**AT, "name": name, "type": type_}
    if interval:
        body["flags"] = ["interval"]
    if elem is not None:
        body["elem"] = elem
    return {"add": {"set": body}}


def counter(name: str) -> Json:
    return {"add": {"counter": {**AT, "name": name}}}


def match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def jump(target: str, verdict: str = "jump") -> Json:
    return {verdict: {"target": target}}


def prefix(addr: str, length: int) -> Json:
    return {"prefix": {"addr": addr, "len": length}}


def delete(kind: str, name: str) -> Json:
    return {"delete": {kind: {**AT, "name": name}}}


def flush(kind: str, name: str) -> Json:
    return {"flush": {kind: {**AT, "name": name}}}


FILTER_OUT = ("filter", "output", 0)
NAT_OUT = ("nat", "output", -100)
NAT_PRE = ("nat", "prerouting", -100)
MANGLE_PRE = ("filter", "prerouting", -150)
REDIRECT = {"redirect": {"port": 15001}}
TPROXY = {"tproxy": {"family": "ip", "port": 15006}}
FLUSH_TABLE = {"flush": {"table": TABLE_REF}}


def rendered() -> list[Json]:
    """interceptd's own transaction for a configuration that uses every kind of object it renders."""
    config = load({"table": TABLE, "inbound_interception_mode": "TPROXY", "redirect_dns": "true",
                   "service_cidr": "198.51.100.0/24,2001:db8::/64", "service_exclude_cidr": "198.51.100.0/28",
                   "inbound_ports": "80,9000-9100", "local_outbound_ports_exclude": "8000-8100",
                   "exclude_interfaces": "eth1", "proxy_gid": "1337,1338", "drop_invalid": "true"}, {})
    facts = HostFacts(ipv6=True, host_ip="192.0.2.2",
                      dns_v4=(ipaddress.IPv4Address("192.0.2.53"),), dns_v6=(ipaddress.IPv6Address("2001:db8::53"),))
    commands: list[Json] = transaction(render(config, facts), Existing.empty())["nftables"]
    return commands


REFUSED = [
    Case("jump to a missing chain", False, [table(), chain("a"), rule("a", jump("b"))]),
    Case("goto a missing chain", False, [table(), chain("a"), rule("a", jump("b", "goto"))]),
    Case("jump to a chain declared later", False, [table(), chain("a"), rule("a", jump("b")), chain("b")]),
    Case("jump to a base chain", False, [table(), chain("x", FILTER_OUT), chain("a"), rule("a", jump("x"))]),
    Case("jump to a chain deleted before", False, [delete("chain", "b"), rule("a", jump("b"))],
         [table(), chain("a"), chain("b")]),
    Case("rule in an undeclared chain", False, [table(), rule("nope", {"accept": None})]),
    Case("chain in a missing table", False, [chain("a")]),
    Case("set in a missing table", False, [nset("s", "inet_service", [1])]),
    Case("counter in a missing table", False, [counter("c")]),
    Case("lookup of a missing set", False, [table(), chain("a"), rule("a", match(DPORT, "@s"))]),
    Case("lookup of a set declared later", False,
         [table(), chain("a"), rule("a", match(DPORT, "@s")), nset("s", "inet_service", [1])]),
    Case("lookup of an address set by port", False,
         [table(), nset("s", "ipv4_addr", ["192.0.2.1"]), chain("a"), rule("a", match(DPORT, "@s"))]),
    Case("lookup of an ipv4 set by ip6 daddr", False,
         [table(), nset("s", "ipv4_addr", ["192.0.2.1"]), chain("a"),
          rule("a", match({"payload": {"protocol": "ip6", "field": "daddr"}}, "@s"))]),
    Case("IPv6 CIDR in an ipv4_addr interval set", False,
         [table(), nset("s", "ipv4_addr", [prefix("2001:db8::", 32)], interval=True)]),
    Case("IPv4 address in an ipv6_addr set", False, [table(), nset("s", "ipv6_addr", ["192.0.2.1"])]),
    Case("port 65536", False, [table(), nset("s", "inet_service", [65536])]),
    Case("port -1", False, [table(), nset("s", "inet_service", [-1])]),
    Case("range in a non-interval set", False, [table(), nset("s", "inet_service", [{"range": [1, 5]}])]),
    Case("prefix in a non-interval set", False, [table(), nset("s", "ipv4_addr", [prefix("10.0.0.0", 8)])]),
    Case("overlapping intervals in one command", False,
         [table(), nset("s", "ipv4_addr", [prefix("10.0.0.0", 8), prefix("10.1.0.0", 16)], interval=True)]),
    Case("an interval overlapping one the set holds", False,
         [nset("s", "ipv4_addr", [prefix("10.1.0.0", 16)], interval=True)],
         [table(), nset("s", "ipv4_addr", [prefix("10.0.0.0", 8)], interval=True)]),
    Case("range of negative size", False, [table(), nset("s", "inet_service", [{"range": [5, 1]}], interval=True)]),
    Case("prefix length 33", False, [table(), nset("s", "ipv4_addr", [prefix("10.0.0.0", 33)], interval=True)]),
    Case("interface name of 16 bytes", False, [table(), nset("s", "ifname", ["a" * 16])]),
    Case("uid 2**32", False, [table(), nset("s", "uid", [2**32])]),
    Case("empty element list", False, [table(), nset("s", "inet_service", [])]),
    Case("set re-declared with another type", False, [nset("s", "ipv4_addr")],
         [table(), nset("s", "inet_service", [1])]),
    Case("set re-declared with interval", False, [nset("s", "inet_service", interval=True)],
         [table(), nset("s", "inet_service", [1])]),
    Case("missing named counter", False, [table(), chain("a"), rule("a", {"counter": "c"})]),
    Case("named counter declared later", False, [table(), chain("a"), rule("a", {"counter": "c"}), counter("c")]),
    Case("delete a chain still jumped to", False, [delete("chain", "b")],
         [table(), chain("a"), chain("b"), rule("a", jump("b"))]),
    Case("delete a set still looked up", False, [delete("set", "s")],
         [table(), nset("s", "inet_service", [1]), chain("a"), rule("a", match(DPORT, "@s"))]),
    Case("delete a counter still referenced", False, [delete("counter", "c")],
         [table(), counter("c"), chain("a"), rule("a", {"counter": "c"})]),
    Case("delete a missing table", False, [{"delete": {"table": TABLE_REF}}]),
    Case("flush a missing table", False, [FLUSH_TABLE]),
    Case("delete a missing chain", False, [table(), delete("chain", "a")]),
    Case("flush a missing chain", False, [table(), flush("chain", "a")]),
    Case("delete a missing set", False, [table(), delete("set", "s")]),
    Case("flush a missing set", False, [table(), flush("set", "s")]),
    Case("delete a missing counter", False, [table(), delete("counter", "c")]),
    Case("base chain re-declared at another priority", False, [chain("x", ("filter", "output", 10))],
         [table(), chain("x", FILTER_OUT)]),
    Case("base chain re-declared on another hook", False, [chain("x", ("filter", "prerouting", 0))],
         [table(), chain("x", FILTER_OUT)]),
    Case("base chain re-declared with another type", False, [chain("x", NAT_OUT)],
         [table(), chain("x", ("filter", "output", -100))]),
    Case("base chain declared over a regular chain", False, [chain("x", FILTER_OUT)], [table(), chain("x")]),
    Case("nat chain at priority -200", False, [table(), chain("x", ("nat", "output", -200))]),
    Case("nat chain on forward", False, [table(), chain("x", ("nat", "forward", 0))]),
    Case("route chain on prerouting", False, [table(), chain("x", ("route", "prerouting", 0))]),
    Case("unknown chain type", False, [table(), chain("x", ("bogus", "output", 0))]),
    Case("loop reached from a base chain", False,
         [table(), chain("x", FILTER_OUT), chain("a"), chain("b"), rule("x", jump("a")), rule("a", jump("b")),
          rule("b", jump("a"))]),
    Case("redirect in a filter chain", False, [table(), chain("x", FILTER_OUT), rule("x", TCP, REDIRECT)]),
    Case("redirect reached from a filter chain", False,
         [table(), chain("x", FILTER_OUT), chain("a"), rule("a", TCP, REDIRECT), rule("x", jump("a"))]),
    Case("redirect without a transport match", False, [table(), chain("x", NAT_PRE), rule("x", REDIRECT)]),
    Case("tproxy in output", False, [table(), chain("x", ("filter", "output", -150)), rule("x", TCP, TPROXY)]),
    Case("IPv6 literal for ip daddr", False, [table(), chain("a"), rule("a", match(DADDR, "::1"))]),
    Case("port literal 70000", False, [table(), chain("a"), rule("a", match(DPORT, 70000))]),
    Case("unknown protocol", False, [table(), chain("a"), rule("a", match({"meta": {"key": "l4proto"}}, "bogus"))]),
    Case("one bad command refuses the whole transaction", False,
         [table(), chain("a"), counter("c"), nset("s", "inet_service", [80]), rule("a", {"counter": "c"}),
          rule("a", jump("missing"))]),
]

ACCEPTED = [
    Case("interceptd's own rendering", True, rendered()),
    Case("interceptd's own rendering, applied again", True, rendered(), rendered()),
    Case("delete a jumped-to chain after flush table", True, [FLUSH_TABLE, delete("chain", "b")],
         [table(), chain("a"), chain("b"), rule("a", jump("b"))]),
    Case("re-create a deleted chain and jump to it", True,
         [FLUSH_TABLE, delete("chain", "b"), chain("b"), rule("a", jump("b"))],
         [table(), chain("a"), chain("b"), rule("a", jump("b"))]),
    Case("delete a chain that only holds rules", True, [delete("chain", "a")],
         [table(), chain("a"), rule("a", {"accept": None})]),
    Case("delete a set that holds elements", True, [delete("set", "s")], [table(), nset("s", "inet_service", [1])]),
    Case("flush table keeps set elements and counters", True, [FLUSH_TABLE],
         [table(), nset("s", "inet_service", [1, 2]), counter("c"), chain("a"), rule("a", {"counter": "c"})]),
    Case("the same base chain twice", True, [chain("x", FILTER_OUT)], [table(), chain("x", FILTER_OUT)]),
    Case("a base chain's policy changed", True, [chain("x", FILTER_OUT, policy="drop")],
         [table(), chain("x", FILTER_OUT)]),
    Case("a regular declaration of a base chain", True, [chain("x")], [table(), chain("x", FILTER_OUT)]),
    Case("nat chain at priority -199", True, [table(), chain("x", ("nat", "output", -199))]),
    Case("route chain on output", True, [table(), chain("x", ("route", "output", -150))]),
    Case("a loop no base chain reaches", True,
         [table(), chain("a"), chain("b"), rule("a", jump("b")), rule("b", jump("a"))]),
    Case("redirect in nat prerouting", True, [table(), chain("x", NAT_PRE), rule("x", TCP, REDIRECT)]),
    Case("redirect reached from nat output", True,
         [table(), chain("x", NAT_OUT), chain("a"), rule("a", TCP, REDIRECT), rule("x", jump("a"))]),
    Case("redirect in a chain no base chain reaches", True, [table(), chain("a"), rule("a", TCP, REDIRECT)]),
    Case("tproxy in prerouting", True, [table(), chain("x", MANGLE_PRE), rule("x", TCP, TPROXY)]),
    Case("the same interval twice", True, [nset("s", "ipv4_addr", [prefix("10.0.0.0", 8)], interval=True)],
         [table(), nset("s", "ipv4_addr", [prefix("10.0.0.0", 8)], interval=True)]),
    Case("adjacent intervals", True,
         [table(), nset("s", "ipv4_addr", [prefix("10.0.0.0", 8), prefix("11.0.0.0", 8)], interval=True)]),
    Case("duplicate elements of a hash set", True, [nset("s", "inet_service", [1])],
         [table(), nset("s", "inet_service", [1, 1])]),
    Case("prefix with host bits set", True, [table(), nset("s", "ipv4_addr", [prefix("10.0.0.1", 8)], interval=True)]),
    Case("full-length prefix and one-port range", True,
         [table(), nset("s", "ipv4_addr", [prefix("10.0.0.1", 32)], interval=True),
          nset("p", "inet_service", [{"range": [5, 5]}, {"range": [7, 9]}], interval=True)]),
    Case("interface name of 15 bytes", True, [table(), nset("s", "ifname", ["a" * 15])]),
    Case("a re-declared set without elements", True, [nset("s", "ipv4_addr", interval=True)],
         [table(), nset("s", "ipv4_addr", [prefix("10.0.0.0", 8)], interval=True)]),
    Case("the same counter twice", True, [counter("c")], [table(), counter("c")]),
    Case("literals: negated lookup, anonymous sets, ct state", True,
         [table(), nset("s", "inet_service", [1]), chain("a"),
          rule("a", match(DPORT, "@s", "!="), match(DADDR, {"set": [prefix("10.0.0.0", 8), "192.0.2.1"]}),
               match(DPORT, {"set": [53, {"range": [15000, 15010]}]}),
               match({"ct": {"key": "state"}}, ["established", "related"], "in"))]),
]


def outcome(kernel: Kernel, case: Case) -> str | None:
    """Run the case from a namespace without the table: None if the document was accepted, else the error."""
    kernel.apply(deletion(TABLE))
    if case.setup:
        kernel.apply({"nftables": case.setup})
    try:
        kernel.apply({"nftables": case.document})
    except KernelRefusedError as exc:
        return str(exc)
    return None


def summary(kernel: Kernel) -> dict[str, Any]:
    """What a listing of the table holds, in a form the fake and the kernel spell alike."""
    listing = kernel.list_table(TABLE) or []
    body = [next(iter(item.items())) for item in listing]
    return {"chains": sorted(b["name"] for k, b in body if k == "chain"),
            "rules": sorted((b["chain"], b.get("comment", "")) for k, b in body if k == "rule"),
            "sets": {b["name"]: sorted(map(json.dumps, b.get("elem", []))) for k, b in body if k == "set"},
            # Names only: the real kernel also counts whatever packets cross the lab's namespace meanwhile
            # (an IPv6 neighbour solicitation on its veth was counted once on a fresh machine).
            "counters": sorted(b["name"] for k, b in body if k == "counter")}
