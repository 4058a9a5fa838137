"""Pure translation between the rule model and libnftables JSON (libnftables-json(5)).

`transaction` builds the one document that replaces interceptd's table atomically, `update` the one that
rewrites only the sets and rules that differ from what the table holds; `normalise` turns the
kernel's listing of the table into a comparable form (no handles, no counter values).
"""

from __future__ import annotations

import functools
import json

from interceptd.config.values import PortRange, Prefix
from interceptd.records import record
from interceptd.ruleset.model import (
    CT_KEYS,
    MARK_BITS,
    META_KEYS,
    Accept,
    Action,
    Chain,
    CtMarkFromMark,
    Drop,
    Jump,
    MarkFromCtMark,
    Match,
    NamedSet,
    Redirect,
    Return,
    Rule,
    Ruleset,
    Scalar,
    SetCtMarkBits,
    SetCtZone,
    SetMark,
    SetRef,
    Snat,
    TProxy,
)
from interceptd.ruleset.names import counter_name

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    Json = dict[str, Any]
else:
    Json = dict  # the name other modules import; no annotation is evaluated at run time


def _scalar(value: Scalar) -> Any:
    if isinstance(value, Prefix):
        return value.json()
    if isinstance(value, PortRange):
        return value.first if value.first == value.last else {"range": [value.first, value.last]}
    return value


def _left(key: str) -> Json:
    if key in META_KEYS:
        return {"meta": {"key": key}}
    if key in CT_KEYS:
        return {"ct": {"key": key.split()[1]}}
    protocol, fld = key.split()
    return {"payload": {"protocol": protocol, "field": fld}}


def match_json(match: Match) -> Json:
    value = match.value
    right: Any
    if isinstance(value, SetRef):
        right = f"@{value.name}"
    elif isinstance(value, tuple):
        right = list(value) if match.key == "ct state" else {"set": [_scalar(v) for v in value]}
    else:
        right = _scalar(value)
    if match.key == "ct state":
        # conntrack state is a bit mask: "ct state established,related" tests for any of the bits.
        return {"match": {"op": "!=" if match.negate else "in", "left": _left(match.key), "right": right}}
    left = _left(match.key) if match.mask is None else {"&": [_left(match.key), match.mask]}
    return {"match": {"op": "!=" if match.negate else "==", "left": left, "right": right}}


def action_json(action: Action) -> Json:
    mark = {"meta": {"key": "mark"}}
    ctmark = {"ct": {"key": "mark"}}
    match action:
        case Jump(chain):
            return {"jump": {"target": chain}}
        case Return():
            return {"return": None}
        case Accept():
            return {"accept": None}
        case Drop():
            return {"drop": None}
        case Redirect(port):
            return {"redirect": {"port": port}}
        case TProxy(family, port):
            return {"tproxy": {"family": family, "port": port}}
        case Snat(family, address):
            return {"snat": {"family": family, "addr": address}}
        case SetMark(value):
            return {"mangle": {"key": mark, "value": value}}
        case MarkFromCtMark():
            return {"mangle": {"key": mark, "value": ctmark}}
        case CtMarkFromMark():
            return {"mangle": {"key": ctmark, "value": mark}}
        case SetCtZone(zone):
            return {"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}}
        case SetCtMarkBits(bits, mask):
            return {"mangle": {"key": ctmark, "value": {"|": [{"&": [ctmark, MARK_BITS & ~mask]}, bits]}}}
    raise TypeError(action)


def rule_json(table: str, family: str, chain: Chain, rule: Rule) -> Json:
    expr = [match_json(m) for m in rule.matches]
    expr.append({"counter": counter_name(chain.name, rule.name)})
    expr += [action_json(a) for a in rule.actions]
    return {"family": family, "table": table, "chain": chain.name, "comment": rule.name, "expr": expr}


def chain_json(table: str, family: str, chain: Chain) -> Json:
    out: Json = {"family": family, "table": table, "name": chain.name}
    if chain.hook is not None:
        out.update(type=chain.hook.type, hook=chain.hook.hook, prio=chain.hook.priority, policy="accept")
    return out


def set_json(table: str, family: str, nset: NamedSet) -> Json:
    out: Json = {"family": family, "table": table, "name": nset.name, "type": nset.type}
    if nset.interval:
        out["flags"] = ["interval"]
    return out


@record
class Existing:
    """What the kernel's table holds now, as far as the transaction needs to know (names and shapes)."""

    chains: dict[str, Json]  # name -> {"type","hook","prio"} or {} for regular chains
    sets: dict[str, Json]  # name -> {"type","flags"}
    counters: frozenset[str]
    elements: dict[str, list[Any]]  # set name -> elements as listed

    @staticmethod
    def empty() -> Existing:
        return Existing({}, {}, frozenset(), {})

    @staticmethod
    def from_listing(items: Iterable[Json]) -> Existing:
        chains: dict[str, Json] = {}
        sets: dict[str, Json] = {}
        elements: dict[str, list[Any]] = {}
        counters: set[str] = set()
        for item in items:
            if "chain" in item:
                c = item["chain"]
                chains[c["name"]] = {k: c[k] for k in ("type", "hook", "prio") if k in c}
            elif "set" in item:
                s = item["set"]
                sets[s["name"]] = {"type": s["type"], "flags": sorted(s.get("flags", []))}
                elements[s["name"]] = s.get("elem", [])
            elif "counter" in item:
                counters.add(item["counter"]["name"])
        return Existing(chains, sets, frozenset(counters), elements)


def same_elements(listed: list[Any], rendered: list[Any]) -> bool:
    """Does the kernel's listing of a set hold exactly the rendered elements? The kernel lists interval
    sets in address order, as we render them, so plain equality decides 10,000 CIDRs in well under a
    millisecond; hash sets (uids, interface names) may come back in another order."""
    if listed == rendered:
        return True
    if len(listed) != len(rendered):
        return False
    key = functools.partial(json.dumps, sort_keys=True)
    return sorted(map(key, listed)) == sorted(map(key, rendered))


@functools.lru_cache(maxsize=64)
def elements_json(elements: tuple[Scalar, ...]) -> list[Any]:
    """A set's elements as JSON, rendered once per distinct set (the agent re-applies the same sets). The
    elements of a set are all of one type and family: an address set's (up to MAX_SET_ELEMENTS prefixes) are
    spelled from their fields as Prefix.json does, without a type test or a call each."""
    if elements and isinstance(elements[0], Prefix):
        prefixes: tuple[Prefix, ...] = elements  # type: ignore[assignment]  # the first tells the set's type
        host = prefixes[0].max_prefixlen
        return [e.address if e.prefixlen == host else {"prefix": {"addr": e.address, "len": e.prefixlen}}
                for e in prefixes]
    return [_scalar(e) for e in elements]


def _chain_shape(chain: Chain) -> Json:
    if chain.hook is None:
        return {}
    return {"type": chain.hook.type, "hook": chain.hook.hook, "prio": chain.hook.priority}


def transaction(ruleset: Ruleset, existing: Existing) -> Json:
    """One document that turns whatever the table holds into `ruleset`, atomically.

    Named counters are never deleted while still rendered (their values survive); `flush table` removes
    every rule first (and keeps set elements), so chains and sets that are no longer rendered, or whose shape
    changed, can go, and a set whose elements are already right is left as it is.
    """
    t, fam = ruleset.table, ruleset.family
    ref = {"family": fam, "name": t}
    cmds: list[Json] = [{"add": {"table": ref}}, {"flush": {"table": ref}}]
    wanted_sets = {s.name: s for s in ruleset.sets}
    wanted_chains = {c.name: c for c in ruleset.chains}
    for name, shape in existing.chains.items():
        if name not in wanted_chains or shape != _chain_shape(wanted_chains[name]):
            cmds.append({"delete": {"chain": {"family": fam, "table": t, "name": name}}})
    kept = dict(existing.elements)  # elements of sets that survive this transaction
    for name, shape in existing.sets.items():
        want = wanted_sets.get(name)
        if want is None or shape != {"type": want.type, "flags": ["interval"] if want.interval else []}:
            cmds.append({"delete": {"set": {"family": fam, "table": t, "name": name}}})
            kept.pop(name, None)
    wanted_counters = set(ruleset.counter_names())
    for name in sorted(existing.counters - wanted_counters):
        cmds.append({"delete": {"counter": {"family": fam, "table": t, "name": name}}})
    for nset in ruleset.sets:
        # One `add set` carrying its elements: libnftables 1.0.6 loads 10,000 CIDRs that way in half the time
        # of an empty `add set` + `flush set` + `add element`. `flush table` keeps set elements, so a set
        # that survives with the right elements is left alone, and one with other elements is flushed first.
        elem = elements_json(nset.elements)
        if nset.name in kept:
            if same_elements(kept[nset.name], elem):
                continue
            cmds.append({"flush": {"set": {"family": fam, "table": t, "name": nset.name}}})
        body = set_json(t, fam, nset)
        cmds.append({"add": {"set": {**body, "elem": elem} if elem else body}})
    for name in ruleset.counter_names():
        cmds.append({"add": {"counter": {"family": fam, "table": t, "name": name}}})
    for chain in ruleset.chains:
        cmds.append({"add": {"chain": chain_json(t, fam, chain)}})
    for chain in ruleset.chains:
        for rule in chain.rules:
            cmds.append({"add": {"rule": rule_json(t, fam, chain, rule)}})
    return {"nftables": cmds}


def _shape(ruleset: Ruleset) -> tuple[object, ...]:
    """What an incremental update cannot change: the chains with their hooks and rule names in order, and
    the sets' names, types and flags (the named counters follow from the rule names)."""
    return (ruleset.table, ruleset.family,
            tuple((c.name, c.hook, tuple(r.name for r in c.rules)) for c in ruleset.chains),
            tuple((s.name, s.type, s.interval) for s in ruleset.sets))


def update(held: Ruleset, ruleset: Ruleset, listing: Iterable[Json]) -> Json | None:
    """One document that turns the table, which holds `held` now (`listing`: the kernel's, with rule
    handles), into `ruleset` by rewriting only what differs: each changed set gets `delete element` for the
    elements that went and `add element` for those that came (the table holds exactly `held`, so every delete
    finds its element; the node's host probe sets as pods come and go), each changed rule is replaced in
    place (by handle). Every other set and rule is left as it is, and every named
    counter stays, so its value continues; a packet sees the old table or the new one, never a mix.

    None when the shapes differ (a chain, a rule name, a set's type or flags) or a changed rule's handle is
    not listed: then `transaction` is the way.
    """
    if _shape(held) != _shape(ruleset):
        return None
    t, fam = ruleset.table, ruleset.family
    cmds: list[Json] = []
    for old_set, nset in zip(held.sets, ruleset.sets, strict=True):
        ref = {"family": fam, "table": t, "name": nset.name}
        kept, wanted = set(old_set.elements), set(nset.elements)
        gone = tuple(e for e in old_set.elements if e not in wanted)
        came = tuple(e for e in nset.elements if e not in kept)
        if gone:
            cmds.append({"delete": {"element": {**ref, "elem": elements_json(gone)}}})
        if came:
            cmds.append({"add": {"element": {**ref, "elem": elements_json(came)}}})
    handles: dict[tuple[str, str], int | None] = {}
    for item in listing:
        body = item.get("rule")
        if body is not None:
            key = (body["chain"], body.get("comment", ""))
            handles[key] = None if key in handles else body.get("handle")  # a duplicate name: no handle
    for before_chain, chain in zip(held.chains, ruleset.chains, strict=True):
        for old_rule, rule in zip(before_chain.rules, chain.rules, strict=True):
            if (old_rule.matches, old_rule.actions) == (rule.matches, rule.actions):
                continue
            handle = handles.get((chain.name, rule.name))
            if handle is None:
                return None
            cmds.append({"replace": {"rule": {**rule_json(t, fam, chain, rule), "handle": handle}}})
    return {"nftables": cmds}


def deletion(table: str, family: str = "inet") -> Json:
    """Remove the table if it exists: `add` then `delete` (nft 1.0.6 has no `destroy`)."""
    ref = {"family": family, "name": table}
    return {"nftables": [{"add": {"table": ref}}, {"delete": {"table": ref}}]}


def normalise(items: Iterable[Json]) -> list[Json]:
    """The table's listing without handles and counter values: equal iff the rules decide the same way."""
    out: list[Json] = []
    for item in items:
        if "metainfo" in item:
            continue
        ((kind, body),) = item.items()
        body = {k: v for k, v in body.items() if k not in ("handle", "packets", "bytes")}
        out.append({kind: body})
    return sorted(out, key=_sort_key)


def _sort_key(item: Json) -> tuple[str, str, str]:
    ((kind, body),) = item.items()
    # Rules keep their order within a chain (stable sort), everything else sorts by name.
    return (kind, str(body.get("chain", "")), "" if kind == "rule" else str(body.get("name", "")))
