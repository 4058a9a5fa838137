"""Strict in-memory stand-ins for the kernel ports (Kernel, Router), for unit tests of everything above them.

A lenient fake hides bugs: a ruleset that jumps to a chain it never declares passes every unit test and
fails on the first real node. So FakeKernel interprets the libnftables JSON commands interceptd emits the
way libnftables 1.0.6 and the kernel do, one command after the other inside one all-or-nothing transaction,
and refuses what they refuse with the real adapter's KernelRefusedError. The integration test
tests/integration/system/test_fake_equivalence.py runs the same good and bad documents through both.

What it refuses, as the kernel does:
- a command on a missing table, chain, set or counter (add rule, flush, delete, a jump or goto target,
  an `@set` lookup, a `counter name` reference): each must exist when its command runs, as in the kernel's
  batch, not merely by the end of the transaction;
- a lookup in a set whose type does not fit the matched key, an element or literal of the wrong type (an
  IPv6 address for `ip daddr`, port 65536, an interface name longer than 15 bytes), a prefix or range in
  a set without `flags interval`, overlapping intervals, `"elem": []`;
- a set re-declared with another type or flags, a base chain re-declared with another type, hook or
  priority, or declared over an existing regular chain; hooks a chain type lacks (nat on forward or at
  priority -200 or lower, route anywhere but output); a jump to a base chain; a redirect or tproxy port
  in a rule that matches no transport protocol before it;
- deleting a chain, set or named counter a rule still refers to (deleting a chain that only holds rules
  is accepted: libnftables 1.0.6 deletes recursively, the rules go with it);
- at commit, seen from each base chain through jumps and gotos (a chain no base chain reaches is not
  checked, as in the kernel): a loop, `redirect` outside nat prerouting/output, `tproxy` outside prerouting.
Anything it does not model (another statement, key or set flag) is refused with a message saying so,
never accepted unchecked.

What it keeps like the kernel: `flush table` removes the rules only (set elements and named counter values
stay), a failed transaction changes nothing, every rule gets a handle (listed) that `replace rule` keeps.

Hooks for tests (the constructors take no arguments):
- `FakeKernel.tables`: (family, name) -> {"chains": {name: obj}, "sets": {name: obj with "elem"},
  "counters": {name: obj with "packets", "bytes"}, "rules": [obj, ...]}; edit it to simulate drift made by
  another process (it is not checked);
- `FakeKernel.refuse`: refuse this many next apply() calls, whatever they hold (check() is not affected);
  `fail_next`: an exception (any failure kind: NamespaceError, ResourceError...) the next apply() or
  list_table() raises;
- `FakeKernel.applies`: transactions committed so far;
- `FakeKernel.count(table, counter, packets, nbytes)`: traffic hitting a named counter;
- `FakeKernel.persist`: whether own() gets the persist flag (as on a kernel that supports it);
- `FakeKernel.libnftables_version`: what version() reports;
- `FakeRouter.entries` and `FakeRouter.calls`: the routing state and the changes made, in order;
- `FakeRouter.refuse`: refuse (RoutingError, nothing changed) this many next add/delete calls.
"""

from __future__ import annotations

import copy
import grp
import ipaddress
import itertools
import pwd
import socket
from collections.abc import Iterator
from typing import Any

from interceptd.errors import KernelRefusedError, RoutingError
from interceptd.ruleset.nftjson import Json
from interceptd.system.kernel import describe_command
from interceptd.system.routes import Entry

Tables = dict[tuple[str, str], dict[str, Any]]

# The datatype nft gives each key interceptd (and preflight) can match or set.
_KEY_TYPES = {
    ("meta", "iifname"): "ifname", ("meta", "oifname"): "ifname", ("meta", "skuid"): "uid",
    ("meta", "skgid"): "gid", ("meta", "mark"): "mark", ("meta", "l4proto"): "inet_proto",
    ("meta", "nfproto"): "nf_proto", ("ct", "mark"): "mark", ("ct", "state"): "ct_state",
    ("ct", "zone"): "ct_zone",
    **{("payload", f"ip {f}"): "ipv4_addr" for f in ("saddr", "daddr")},
    **{("payload", f"ip6 {f}"): "ipv6_addr" for f in ("saddr", "daddr")},
    **{("payload", f"{p} {f}"): "inet_service" for p in ("tcp", "udp", "th") for f in ("sport", "dport")},
}
# A redirect or tproxy port needs one of these matched first in its rule.
_TRANSPORT = {("meta", "l4proto"), *(key for key, type_ in _KEY_TYPES.items() if type_ == "inet_service")}
SET_TYPES = ("ipv4_addr", "ipv6_addr", "inet_service", "ifname", "uid", "gid", "mark", "inet_proto")
_MAX = {"inet_service": 0xFFFF, "uid": 0xFFFFFFFF, "gid": 0xFFFFFFFF, "mark": 0xFFFFFFFF, "ct_zone": 0xFFFF,
        "inet_proto": 0xFF}
_CT_STATES = {"invalid", "established", "related", "new", "untracked"}
_NF_PROTOS = {"ipv4", "ipv6"}
# Chain types and the hooks each has in the inet family (the kernel's hook masks).
_HOOKS = {"filter": {"prerouting", "input", "forward", "output", "postrouting"},
          "nat": {"prerouting", "input", "output", "postrouting"}, "route": {"output"}}
NAT_MIN_PRIORITY = -199  # NF_IP_PRI_CONNTRACK + 1: NAT before conntrack is refused


class Refused(Exception):
    """Why one command is refused; FakeKernel turns it into the adapter's KernelRefusedError."""


_HANDLES = itertools.count(1)  # rule handles, as the kernel lists them (unique, never reused)


def _new_table() -> dict[str, Any]:
    return {"chains": {}, "sets": {}, "counters": {}, "rules": []}


def _key(left: Any) -> tuple[str, str]:
    """("meta", "skuid"), ("payload", "ip daddr"), ("ct", "state"): the matched or mangled field."""
    if isinstance(left, dict) and len(left) == 1:
        ((kind, body),) = left.items()
        if kind in ("meta", "ct") and isinstance(body, dict):
            return kind, str(body.get("key"))
        if kind == "payload" and isinstance(body, dict):
            return kind, f"{body.get('protocol')} {body.get('field')}"
    raise Refused(f"the fake does not model the expression {left!r}")


def _masked(left: Any) -> Any:
    """The field under a bitwise and (`meta mark & 0xfff`), whose mask must be a value of its type."""
    if isinstance(left, dict) and "&" in left:
        if not isinstance(left["&"], list) or len(left["&"]) != 2:
            raise Refused(f"Invalid expression {left!r}")
        field, mask = left["&"]
        _integer(mask, _key_type(field))
        return field
    return left


def _key_type(left: Any) -> str:
    key = _key(left)
    if key not in _KEY_TYPES:
        raise Refused(f"the fake does not model the key {' '.join(key)}")
    return _KEY_TYPES[key]


def _integer(value: Any, type_: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refused(f"{value!r} is not a {type_}")
    if not 0 <= value <= _MAX[type_]:
        raise Refused("Service out of range" if type_ == "inet_service" else f"Value too large: {value}")
    return value


def _named_integer(value: Any, type_: str) -> int:
    """Numbers, or the names nft resolves in user space (services, users, groups, protocols)."""
    if not isinstance(value, str):
        return _integer(value, type_)
    try:
        if type_ == "inet_service":
            return socket.getservbyname(value)
        if type_ == "uid":
            return pwd.getpwnam(value).pw_uid
        if type_ == "gid":
            return grp.getgrnam(value).gr_gid
        if type_ == "inet_proto":
            return socket.getprotobyname(value)
    except (OSError, KeyError):
        pass
    raise Refused(f"cannot resolve {value!r} as {type_}")


def _address(value: Any, type_: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise Refused(f"{value!r} is not an address") from None
    if addr.version != (4 if type_ == "ipv4_addr" else 6):
        raise Refused("Could not resolve hostname: Address family for hostname not supported")
    return addr


def _bounds(value: Any, type_: str) -> tuple[int, int]:
    """The closed interval one scalar covers (a point), refused if it is not a value of the type."""
    if type_ in ("ipv4_addr", "ipv6_addr"):
        point = int(_address(value, type_))
    elif type_ == "ifname":
        if not isinstance(value, str) or not value:
            raise Refused(f"{value!r} is not an interface name")
        if len(value.encode()) > 15:
            raise Refused("String exceeds maximum length of 16")
        point = int.from_bytes(value.encode().ljust(16, b"\0"), "big")
    elif type_ in ("inet_service", "uid", "gid", "inet_proto"):
        point = _named_integer(value, type_)
    elif type_ in ("mark", "ct_zone"):
        point = _integer(value, type_)
    elif type_ == "nf_proto" and value in _NF_PROTOS:
        point = sorted(_NF_PROTOS).index(value)
    elif type_ == "ct_state" and value in _CT_STATES:
        point = sorted(_CT_STATES).index(value)
    else:
        raise Refused(f"{value!r} is not a {type_}")
    return point, point


def _element(value: Any, type_: str, interval: bool) -> tuple[Any, tuple[int, int]]:
    """One set element or literal as the kernel lists it (host bits of a prefix cleared, a full-length
    prefix as an address) and the interval it covers; a prefix or range needs `interval`."""
    if isinstance(value, dict) and ("prefix" in value or "range" in value):
        kind = "prefix" if "prefix" in value else "range"
        if not interval:
            raise Refused(f"You must add 'flags interval' to your set declaration if you want to add {kind} "
                          "elements")
        if kind == "prefix":
            if type_ not in ("ipv4_addr", "ipv6_addr"):
                raise Refused(f"a prefix is not a {type_}")
            body = value["prefix"]
            addr = _address(body.get("addr"), type_)
            length = body.get("len")
            if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= addr.max_prefixlen:
                raise Refused(f"Prefix length {length} is invalid for type of {addr.max_prefixlen} bits width")
            net = ipaddress.ip_network(f"{addr}/{length}", strict=False)
            listed: Any = (str(net.network_address) if length == addr.max_prefixlen
                           else {"prefix": {"addr": str(net.network_address), "len": length}})
            return listed, (int(net.network_address), int(net.broadcast_address))
        pair = value["range"]
        if not isinstance(pair, list) or len(pair) != 2:
            raise Refused(f"{value!r} is not a range")
        low, high = _bounds(pair[0], type_)[0], _bounds(pair[1], type_)[1]
        if low > high:
            raise Refused("Range has zero or negative size")
        return (pair[0] if low == high else value), (low, high)
    return value, _bounds(value, type_)


def _overlap(spans: list[tuple[int, int]]) -> bool:
    ordered = sorted(set(spans))
    return any(a[1] >= b[0] for a, b in itertools.pairwise(ordered))


class _Transaction:
    """The commands of one document, run in order on a copy of the tables: the fake's model of a batch."""

    def __init__(self, tables: Tables) -> None:
        self.tables = copy.deepcopy(tables)

    def table(self, obj: Json) -> dict[str, Any]:
        found = self.tables.get((obj.get("family", ""), obj.get("table", "")))
        if found is None:
            raise Refused(f"No such file or directory: table {obj.get('family')} {obj.get('table')}")
        return found

    def run(self, verb: str, kind: str, obj: Json) -> None:
        handler = getattr(self, f"{verb}_{kind}", None) if verb in ("add", "flush", "delete", "replace") else None
        if handler is None:
            raise Refused(f"the fake does not model `{verb} {kind}`")
        handler(obj)

    # -- tables ------------------------------------------------------------------------------------
    def add_table(self, obj: Json) -> None:
        self.tables.setdefault((obj["family"], obj["name"]), _new_table())

    def _existing_table(self, obj: Json) -> tuple[str, str]:
        key = (obj["family"], obj["name"])
        if key not in self.tables:
            raise Refused(f"No such file or directory: table {key[0]} {key[1]}")
        return key

    def flush_table(self, obj: Json) -> None:
        self.tables[self._existing_table(obj)]["rules"] = []  # set elements and counter values stay

    def delete_table(self, obj: Json) -> None:
        del self.tables[self._existing_table(obj)]

    # -- chains ------------------------------------------------------------------------------------
    def add_chain(self, obj: Json) -> None:
        t, name = self.table(obj), obj["name"]
        new: Json = {k: obj[k] for k in ("type", "hook", "prio") if k in obj}
        if new:
            _check_hook(new)
        old = t["chains"].get(name)
        if old is None:
            t["chains"][name] = copy.deepcopy(obj)
        elif new:
            if "hook" not in old:
                raise Refused(f"Operation not supported: chain {name} exists as a regular chain")
            if old["type"] != new.get("type"):
                raise Refused(f"File exists: chain {name} has type {old['type']}")
            if (old["hook"], old["prio"]) != (new.get("hook"), new.get("prio")):
                raise Refused(f"Operation not supported: chain {name} is hooked at {old['hook']} {old['prio']}")
            if "policy" in obj:
                old["policy"] = obj["policy"]

    def _chain(self, obj: Json) -> tuple[dict[str, Any], str]:
        t = self.table(obj)
        if obj["name"] not in t["chains"]:
            raise Refused(f"No such file or directory: chain {obj['name']}")
        return t, obj["name"]

    def flush_chain(self, obj: Json) -> None:
        t, name = self._chain(obj)
        t["rules"] = [r for r in t["rules"] if r["chain"] != name]

    def delete_chain(self, obj: Json) -> None:
        t, name = self._chain(obj)
        users = [r["chain"] for r in t["rules"] if name in _targets(r)]
        if users:
            raise Refused(f"Device or resource busy: chain {name} is the target of a rule in {users[0]}")
        self.flush_chain(obj)  # libnftables 1.0.6 deletes recursively: the chain's own rules go with it
        del t["chains"][name]

    # -- sets --------------------------------------------------------------------------------------
    def add_set(self, obj: Json) -> None:
        t, name, type_ = self.table(obj), obj["name"], obj.get("type")
        flags = sorted(obj.get("flags", []))
        if type_ not in SET_TYPES:
            raise Refused(f"Invalid datatype {type_!r}")
        if flags not in ([], ["interval"]):
            raise Refused(f"the fake does not model set flags {flags}")
        old = t["sets"].get(name)
        if old is None:
            old = t["sets"][name] = {**copy.deepcopy({k: v for k, v in obj.items() if k != "elem"}), "elem": []}
        elif (old["type"], sorted(old.get("flags", []))) != (type_, flags):
            raise Refused(f"File exists: set {name} is {old['type']} with flags {old.get('flags', [])}")
        if "elem" in obj:
            self._add_elements(old, obj["elem"])

    def add_element(self, obj: Json) -> None:
        self._add_elements(self._set(obj)[1], obj.get("elem"))

    @staticmethod
    def _add_elements(nset: dict[str, Any], elems: Any) -> None:
        if not isinstance(elems, list) or not elems:
            raise Refused("Invalid set elem expression")
        interval = "interval" in nset.get("flags", [])
        new = [_element(e, nset["type"], interval) for e in elems]
        if interval:
            if _overlap([span for _, span in new]):
                raise Refused("conflicting intervals specified")
            have = {span: e for e, span in (_element(e, nset["type"], True) for e in nset["elem"])}
            fresh = [(e, span) for e, span in new if span not in have]
            if _overlap([*have, *(span for _, span in fresh)]):
                raise Refused(f"File exists: an element of {nset['name']} overlaps one it holds")
            merged = [*((e, span) for span, e in have.items()), *fresh]
            nset["elem"] = [e for e, _ in sorted(merged, key=lambda item: item[1])]  # listed in order
        else:
            have_points = {_element(e, nset["type"], False)[1] for e in nset["elem"]}
            for e, span in new:
                if span not in have_points:
                    have_points.add(span)
                    nset["elem"].append(e)

    def delete_element(self, obj: Json) -> None:
        """As the kernel: every element must be there, else the whole batch is refused (ENOENT)."""
        nset = self._set(obj)[1]
        elems = obj.get("elem")
        if not isinstance(elems, list) or not elems:
            raise Refused("Invalid set elem expression")
        interval = "interval" in nset.get("flags", [])
        held = {_element(e, nset["type"], interval)[1]: e for e in nset["elem"]}
        for e in elems:
            span = _element(e, nset["type"], interval)[1]
            if span not in held:
                raise Refused(f"No such file or directory: element {e!r} of set {nset['name']}")
            del held[span]
        nset["elem"] = list(held.values())

    def _set(self, obj: Json) -> tuple[dict[str, Any], dict[str, Any]]:
        t = self.table(obj)
        if obj["name"] not in t["sets"]:
            raise Refused(f"No such file or directory: set {obj['name']}")
        return t, t["sets"][obj["name"]]

    def flush_set(self, obj: Json) -> None:
        self._set(obj)[1]["elem"] = []

    def delete_set(self, obj: Json) -> None:
        t, nset = self._set(obj)
        users = [r["chain"] for r in t["rules"] if nset["name"] in _lookups(r)]
        if users:
            raise Refused(f"Device or resource busy: set {nset['name']} is used by a rule in {users[0]}")
        del t["sets"][nset["name"]]

    # -- counters ----------------------------------------------------------------------------------
    def add_counter(self, obj: Json) -> None:
        self.table(obj)["counters"].setdefault(obj["name"], {**copy.deepcopy(obj), "packets": 0, "bytes": 0})

    def delete_counter(self, obj: Json) -> None:
        t, name = self.table(obj), obj["name"]
        if name not in t["counters"]:
            raise Refused(f"No such file or directory: counter {name}")
        users = [r["chain"] for r in t["rules"] if _counter_of(r) == name]
        if users:
            raise Refused(f"Device or resource busy: counter {name} is used by a rule in {users[0]}")
        del t["counters"][name]

    # -- rules -------------------------------------------------------------------------------------
    def add_rule(self, obj: Json) -> None:
        t = self._checked_rule(obj)
        t["rules"].append({**copy.deepcopy(obj), "handle": next(_HANDLES)})

    def replace_rule(self, obj: Json) -> None:
        """In place, by handle, keeping the handle: as `replace rule ... handle N`."""
        t = self._checked_rule(obj)
        for n, rule in enumerate(t["rules"]):
            if rule["chain"] == obj["chain"] and rule["handle"] == obj.get("handle"):
                t["rules"][n] = copy.deepcopy(obj)
                return
        raise Refused(f"No such file or directory: rule handle {obj.get('handle')} in chain {obj['chain']}")

    def _checked_rule(self, obj: Json) -> dict[str, Any]:
        t = self.table(obj)
        if obj.get("chain") not in t["chains"]:
            raise Refused(f"No such file or directory: chain {obj.get('chain')}")
        expr = obj.get("expr")
        if not isinstance(expr, list):
            raise Refused("a rule needs an expression list")
        transport = False
        for stmt in expr:
            transport = self._statement(t, stmt, transport)
        return t

    def _statement(self, t: dict[str, Any], stmt: Any, transport: bool) -> bool:
        """Check one statement; returns whether a transport protocol has been matched so far."""
        if not isinstance(stmt, dict) or len(stmt) != 1:
            raise Refused(f"Invalid statement {stmt!r}")
        ((kind, body),) = stmt.items()
        if kind == "match":
            self._match(t, body)
            return transport or _key(_masked(body["left"])) in _TRANSPORT
        if kind == "counter":
            if isinstance(body, str) and body not in t["counters"]:
                raise Refused(f"No such file or directory: counter {body}")
        elif kind in ("jump", "goto"):
            target = t["chains"].get(body.get("target"))
            if target is None:
                raise Refused(f"No such file or directory: chain {body.get('target')}")
            if "hook" in target:
                raise Refused(f"Operation not supported: {kind} to base chain {target['name']}")
        elif kind in ("redirect", "tproxy"):
            if not transport:
                raise Refused("transport protocol mapping is only valid after transport protocol match")
            _integer(body.get("port"), "inet_service")
            if kind == "tproxy" and body.get("family") not in ("ip", "ip6"):
                raise Refused(f"tproxy family {body.get('family')!r}")
        elif kind == "snat":
            family = body.get("family")
            if family not in ("ip", "ip6"):
                raise Refused(f"snat family {family!r}")  # an inet table must say which address family
            _address(body.get("addr"), "ipv4_addr" if family == "ip" else "ipv6_addr")
        elif kind == "mangle":
            type_ = _key_type(body["key"])
            if not isinstance(body["value"], dict):
                _element(body["value"], type_, False)
            elif "|" in body["value"]:  # `ct mark set ct mark & KEEP | BITS` (ambient's connmark)
                kept, bits = body["value"]["|"]
                if _key_type(_masked(kept)) != type_:
                    raise Refused(f"datatype mismatch: {type_} set from {kept!r}")
                _element(bits, type_, False)
            elif _key_type(body["value"]) != type_:
                raise Refused(f"datatype mismatch: {type_} set from {_key_type(body['value'])}")
        elif kind not in ("return", "accept", "drop"):
            raise Refused(f"the fake does not model the statement {kind!r}")
        return transport

    @staticmethod
    def _match(t: dict[str, Any], body: Json) -> None:
        type_, right = _key_type(_masked(body["left"])), body["right"]
        if body.get("op") not in ("==", "!=", "in"):
            raise Refused(f"the fake does not model the operator {body.get('op')!r}")
        if isinstance(right, str) and right.startswith("@"):
            nset = t["sets"].get(right[1:])
            if nset is None:
                raise Refused(f"No such file or directory: set {right[1:]}")
            if nset["type"] != type_:
                raise Refused(f"datatype mismatch, expected {type_}, set has type {nset['type']}")
        elif type_ == "ct_state" and isinstance(right, list):
            for state in right:
                _element(state, type_, False)
        elif isinstance(right, dict) and "set" in right:
            spans = [_element(e, type_, True)[1] for e in right["set"]]
            if _overlap(spans):
                raise Refused("conflicting intervals specified")
        else:
            _element(right, type_, True)  # a literal may be a prefix or a range

    # -- commit ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """What the kernel checks when the batch commits: each base chain and every chain it reaches."""
        for (family, name), t in self.tables.items():
            chains = t["chains"]
            by_chain: dict[str, list[Json]] = {c: [] for c in chains}
            for r in t["rules"]:
                by_chain.setdefault(r["chain"], []).append(r)
            for base in (c for c in chains.values() if "hook" in c):
                for chain in _reach(by_chain, base["name"], [], f"{family} {name}"):
                    for r in by_chain[chain]:
                        _check_verdicts(r, base)


def _check_hook(hook: Json) -> None:
    type_, where, prio = hook.get("type"), hook.get("hook"), hook.get("prio")
    if type_ not in _HOOKS:
        raise Refused(f"No such file or directory: chain type {type_!r}")
    if isinstance(prio, bool) or not isinstance(prio, int):
        raise Refused(f"Invalid chain priority {prio!r}")
    if where not in _HOOKS[type_] or (type_ == "nat" and prio < NAT_MIN_PRIORITY):
        raise Refused(f"Operation not supported: a {type_} chain at {where} priority {prio}")


def _targets(rule: Json) -> set[str]:
    return {s[k]["target"] for s in rule.get("expr", []) for k in ("jump", "goto") if k in s}


def _lookups(rule: Json) -> set[str]:
    return {s["match"]["right"][1:] for s in rule.get("expr", [])
            if "match" in s and isinstance(s["match"].get("right"), str) and s["match"]["right"].startswith("@")}


def _counter_of(rule: Json) -> str | None:
    return next((s["counter"] for s in rule.get("expr", []) if isinstance(s.get("counter"), str)), None)


def _reach(by_chain: dict[str, list[Json]], chain: str, path: list[str], where: str) -> Iterator[str]:
    """Every chain reachable from `chain` (itself first); a loop is refused like the kernel's ELOOP."""
    if chain in path:
        raise Refused(f"Too many links: chains {' -> '.join([*path, chain])} of table {where} loop")
    yield chain
    for r in by_chain.get(chain, []):
        for target in sorted(_targets(r)):
            yield from _reach(by_chain, target, [*path, chain], where)


def _check_verdicts(rule: Json, base: Json) -> None:
    """Statements the kernel allows only in some hooks, checked against the base chain that reaches them."""
    for stmt in rule.get("expr", []):
        if "redirect" in stmt and (base["type"] != "nat" or base["hook"] not in ("prerouting", "output")):
            raise Refused(f"Operation not supported: redirect in chain {rule['chain']}, reached from the "
                          f"{base['type']} {base['hook']} chain {base['name']}")
        if "snat" in stmt and (base["type"] != "nat" or base["hook"] not in ("postrouting", "input")):
            raise Refused(f"Operation not supported: snat in chain {rule['chain']}, reached from the "
                          f"{base['type']} {base['hook']} chain {base['name']}")
        if "tproxy" in stmt and base["hook"] != "prerouting":
            raise Refused(f"Operation not supported: tproxy in chain {rule['chain']}, reached from the "
                          f"{base['hook']} chain {base['name']}")


class FakeKernel:
    """An in-memory Kernel that accepts what libnftables 1.0.6 and the kernel accept and refuses the rest
    (see the module docstring for what it models and the hooks tests use)."""

    def __init__(self) -> None:
        self.tables: Tables = {}
        self.refuse = 0  # refuse this many next apply() calls
        self.fail_next: Exception | None = None  # raised by the next apply() or list_table(): any failure kind
        self.applies = 0
        self.persist = True
        self.libnftables_version = "1.0.6"
        self._owned: set[tuple[str, str]] = set()

    def _run(self, document: Json) -> Tables:
        """The tables after the document, or KernelRefusedError naming the command, as NftKernel does."""
        cmds = document["nftables"]
        txn = _Transaction(self.tables)
        for n, cmd in enumerate(cmds, 1):
            try:
                ((verb, body),) = cmd.items()
                ((kind, obj),) = body.items()
                txn.run(verb, kind, obj)
            except Refused as exc:
                raise KernelRefusedError(f"libnftables refused the transaction, nothing was changed: command {n} "
                                         f"of {len(cmds)} ({describe_command(cmd)}): {exc} (fake)") from None
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise KernelRefusedError(f"libnftables refused the transaction, nothing was changed: command {n} "
                                         f"of {len(cmds)} cannot be parsed: {exc!r} (fake)") from None
        try:
            txn.validate()
        except Refused as exc:
            raise KernelRefusedError(f"libnftables refused the transaction, nothing was changed: {exc} (fake)") \
                from None
        return txn.tables

    def _fail(self) -> None:
        error, self.fail_next = self.fail_next, None
        if error is not None:
            raise error

    def apply(self, document: Json) -> None:
        self._fail()
        if self.refuse:
            self.refuse -= 1
            raise KernelRefusedError("libnftables refused the transaction (fake)")
        self.tables = self._run(document)
        self._owned &= set(self.tables)  # a deleted table takes its flags with it
        self.applies += 1

    def check(self, document: Json) -> None:
        self._run(document)

    def own(self, table: str, family: str = "inet") -> tuple[str, ...]:
        self.tables.setdefault((family, table), _new_table())
        self._owned.add((family, table))
        return self.table_flags(table, family)

    def table_flags(self, table: str, family: str = "inet") -> tuple[str, ...]:
        if (family, table) not in self._owned or (family, table) not in self.tables:
            return ()
        return ("owner", "persist") if self.persist else ("owner",)

    def version(self) -> str:
        return self.libnftables_version

    def list_table(self, table: str, family: str = "inet") -> list[Json] | None:
        self._fail()
        t = self.tables.get((family, table))
        if t is None:
            return None
        items: list[Json] = [{"table": {"family": family, "name": table}}]
        items += [{"counter": copy.deepcopy(c)} for c in t["counters"].values()]
        for s in t["sets"].values():
            body = copy.deepcopy(s)
            if not body["elem"]:
                del body["elem"]
            items.append({"set": body})
        items += [{"chain": copy.deepcopy(c)} for c in t["chains"].values()]
        items += [{"rule": copy.deepcopy(r)} for r in t["rules"]]
        return items

    def list_counters(self, table: str, family: str = "inet") -> list[Json] | None:
        t = self.tables.get((family, table))
        return None if t is None else [{"counter": copy.deepcopy(c)} for c in t["counters"].values()]

    def count(self, table: str, counter: str, packets: int, nbytes: int) -> None:
        """Simulate traffic hitting a rule."""
        c = self.tables[("inet", table)]["counters"][counter]
        c["packets"] += packets
        c["bytes"] += nbytes


class FakeRouter:
    """In-memory routing state for unit tests (pairs with FakeKernel); `refuse` fails the next changes."""

    def __init__(self) -> None:
        self.entries: set[Entry] = set()
        self.calls: list[tuple[str, Entry]] = []
        self.refuse = 0  # refuse this many next add/delete calls, as netlink would (RoutingError)

    def owned(self) -> set[Entry]:
        return set(self.entries)

    def _change(self, verb: str, entry: Entry) -> None:
        if self.refuse:
            self.refuse -= 1
            raise RoutingError(f"cannot {verb} `{entry}`: Operation not permitted (fake)")
        self.calls.append((verb, entry))

    def add(self, entry: Entry) -> None:
        self._change("add", entry)
        self.entries.add(entry)

    def delete(self, entry: Entry) -> None:
        self._change("delete", entry)
        self.entries.discard(entry)
