"""The inverse of nftjson: rebuild a Ruleset from the kernel's JSON listing of interceptd's table.

Why: `explain`, `diff`, `doctor` and `status --explain-top` must reason about what is really installed, with
the same evaluator as the rendered model. The listing differs from what nftjson sends in ways that do not
change decisions (nft hides a `meta l4proto tcp` that only guards a `tcp dport`, prints /32 prefixes as
plain addresses, single ports as numbers); anything interceptd never emits is refused, not guessed.
"""

from __future__ import annotations

from interceptd.config.values import PortRange, parse_cidr
from interceptd.errors import UnexplainableError
from interceptd.ruleset.model import (
    CT_KEYS,
    MARK_BITS,
    META_KEYS,
    PAYLOAD_KEYS,
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
    Value,
)
from interceptd.ruleset.names import unnamed_rule
from interceptd.ruleset.nftjson import Json

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

_ADDRESS_TYPES = ("ipv4_addr", "ipv6_addr")


def _key(left: Json, where: str) -> str:
    if "meta" in left:
        key = str(left["meta"]["key"])
        if key in META_KEYS:
            return key
    elif "ct" in left:
        key = f"ct {left['ct']['key']}"
        if key in CT_KEYS:
            return key
    elif "payload" in left:
        key = f"{left['payload'].get('protocol')} {left['payload'].get('field')}"
        if key in PAYLOAD_KEYS or key in ("tcp sport", "th sport"):
            return key
    raise UnexplainableError(f"{where}: cannot evaluate the match on {left}")


def _scalar(raw: Any, address: bool, where: str) -> Scalar:
    if isinstance(raw, dict):
        if "prefix" in raw:
            return parse_cidr(f"{raw['prefix']['addr']}/{raw['prefix']['len']}")
        if "range" in raw:
            first, last = raw["range"]
            if address:
                raise UnexplainableError(f"{where}: address ranges are not interceptd's")
            return PortRange(int(first), int(last))
        raise UnexplainableError(f"{where}: cannot evaluate the value {raw}")
    if address:
        return parse_cidr(str(raw))
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise UnexplainableError(f"{where}: cannot evaluate the value {raw!r}")
    return raw


def _match(body: Json, where: str) -> Match:
    left, mask = body["left"], None
    if isinstance(left, dict) and "&" in left:  # `meta mark & 0xfff == 0x539`
        left, raw_mask = left["&"]
        if isinstance(raw_mask, bool) or not isinstance(raw_mask, int):
            raise UnexplainableError(f"{where}: cannot evaluate the mask {raw_mask!r}")
        mask = raw_mask
    key = _key(left, where)
    address = key.split()[-1] in ("saddr", "daddr")
    right = body["right"]
    op = body["op"]
    value: Value
    if isinstance(right, str) and right.startswith("@"):
        value = SetRef(right[1:])
    elif key == "ct state":
        value = tuple(right) if isinstance(right, list) else (right,)
    elif isinstance(right, dict) and "set" in right:
        value = tuple(_scalar(v, address, where) for v in right["set"])
    else:
        value = _scalar(right, address, where)
    if op not in ("==", "!=", "in"):
        raise UnexplainableError(f"{where}: cannot evaluate the operator {op!r}")
    return Match(key, value, op == "!=", mask)


def _mangle(body: Json, where: str) -> Action:
    key, value = body["key"], body["value"]
    if key == {"meta": {"key": "mark"}}:
        return MarkFromCtMark() if value == {"ct": {"key": "mark"}} else SetMark(int(value))
    if key == {"ct": {"key": "mark"}} and value == {"meta": {"key": "mark"}}:
        return CtMarkFromMark()
    if key == {"ct": {"key": "zone"}}:
        return SetCtZone(int(value))
    if key == {"ct": {"key": "mark"}} and isinstance(value, dict) and "|" in value:
        kept, bits = value["|"]
        if isinstance(kept, dict) and kept.get("&", [None])[0] == key:  # ct mark & keep | bits
            # The kernel lists `& 0xfffff000 | 0x111` as `& 0xfffff111 | 0x111` (same result): the changed
            # bits are those not kept, plus those set.
            return SetCtMarkBits(int(bits), (MARK_BITS & ~int(kept["&"][1])) | int(bits))
    raise UnexplainableError(f"{where}: cannot evaluate the statement {body}")


def _action(expr: Json, where: str) -> Action | None:
    ((kind, body),) = expr.items()
    simple: dict[str, Action] = {"return": Return(), "accept": Accept(), "drop": Drop()}
    if kind in simple:
        return simple[kind]
    if kind == "jump":
        return Jump(body["target"])
    if kind == "redirect":
        return Redirect(int(body["port"]))
    if kind == "tproxy":
        return TProxy(body["family"], int(body["port"]))
    if kind == "snat" and body.get("family") in ("ip", "ip6") and isinstance(body.get("addr"), str):
        return Snat(body["family"], body["addr"])
    if kind == "mangle":
        return _mangle(body, where)
    if kind == "counter":
        return None
    raise UnexplainableError(f"{where}: cannot evaluate the statement {kind!r}")


def parse_rule(body: Json) -> Rule:
    name = str(body.get("comment", unnamed_rule(body.get("handle"))))
    where = f"rule {body.get('chain')}/{name}"
    matches: list[Match] = []
    actions: list[Action] = []
    for expr in body["expr"]:
        if "match" in expr:
            matches.append(_match(expr["match"], where))
        else:
            action = _action(expr, where)
            if action is not None:
                actions.append(action)
    return Rule(name, tuple(matches), tuple(actions))


def _set(body: Json) -> NamedSet:
    address = body["type"] in _ADDRESS_TYPES
    where = f"set {body['name']}"
    elements = tuple(_scalar(e, address, where) for e in body.get("elem", []))
    return NamedSet(body["name"], body["type"], elements, "interval" in body.get("flags", []))


def parse_listing(table: str, listing: Iterable[Json], family: str = "inet") -> Ruleset:
    """A Ruleset equivalent in every decision to the listed table (rules carry no `why`)."""
    items = list(listing)
    rules: dict[str, list[Rule]] = {}
    chains: list[tuple[str, Hook | None]] = []
    sets: list[NamedSet] = []
    for item in items:
        if "chain" in item:
            c = item["chain"]
            hook = Hook(c["type"], c["hook"], int(c["prio"])) if "hook" in c else None
            chains.append((c["name"], hook))
            rules.setdefault(c["name"], [])
        elif "set" in item:
            sets.append(_set(item["set"]))
        elif "rule" in item:
            rules.setdefault(item["rule"]["chain"], []).append(parse_rule(item["rule"]))
    return Ruleset(table, tuple(Chain(name, tuple(rules[name]), hook) for name, hook in chains),
                   tuple(sets), family)


def rule_handles(listing: Iterable[Json]) -> dict[tuple[str, int], str]:
    """(chain, handle) -> rule name: how a kernel trace event is mapped back to a rule."""
    rules = [item["rule"] for item in listing if "rule" in item and "handle" in item["rule"]]
    return {(r["chain"], int(r["handle"])): str(r.get("comment", unnamed_rule(r["handle"]))) for r in rules}
