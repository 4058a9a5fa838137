"""Read interceptd's table back from a kernel listing: chains, rules, counters, for humans and machines.

Rules are matched to their counters by name (the rule's comment is its stable name), so the same names
appear in `status`, in metrics and in `explain`.
"""

from __future__ import annotations

from dataclasses import dataclass

from interceptd.ruleset.names import ENTRY
from interceptd.ruleset.nftjson import Json


@dataclass(frozen=True)
class RuleStat:
    chain: str
    rule: str
    packets: int
    bytes: int
    text: str


@dataclass(frozen=True)
class ChainStat:
    name: str
    hook: str  # "" for a regular chain, else "nat prerouting priority -100"
    packets: int  # traffic that entered the chain (its entry counter)
    bytes: int
    rules: tuple[RuleStat, ...]


def counters(listing: list[Json]) -> dict[str, tuple[int, int]]:
    return {c["counter"]["name"]: (c["counter"].get("packets", 0), c["counter"].get("bytes", 0))
            for c in listing if "counter" in c}


def chain_stats(listing: list[Json]) -> list[ChainStat]:
    values = counters(listing)
    out: list[ChainStat] = []
    for item in listing:
        if "chain" not in item:
            continue
        c = item["chain"]
        hook = f"{c['type']} {c['hook']} priority {c['prio']}" if "hook" in c else ""
        rules: list[RuleStat] = []
        entry = (0, 0)
        for r in (i["rule"] for i in listing if "rule" in i and i["rule"]["chain"] == c["name"]):
            name = r.get("comment", "")
            counter = next((e["counter"] for e in r["expr"] if "counter" in e), None)
            pkts, nbytes = values.get(counter, (0, 0)) if isinstance(counter, str) else (0, 0)
            if name == ENTRY:
                entry = (pkts, nbytes)
                continue
            rules.append(RuleStat(c["name"], name, pkts, nbytes, expr_text(r["expr"])))
        out.append(ChainStat(c["name"], hook, entry[0], entry[1], tuple(rules)))
    return out


def _value_text(value: object) -> str:
    if isinstance(value, dict):
        if "set" in value:
            return "{ " + ", ".join(_value_text(v) for v in value["set"]) + " }"
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "range" in value:
            return f"{value['range'][0]}-{value['range'][1]}"
        if "meta" in value:
            return f"meta {value['meta']['key']}"
        if "ct" in value:
            return f"ct {value['ct']['key']}"
        for op in ("&", "|"):  # ambient's masked marks: `mark & 0xfff`, `ct mark & 0xfffff000 | 0x111`
            if op in value:
                inner, bits = value[op]
                return f"{_value_text(inner)} {op} {bits:#x}"
    if isinstance(value, list):
        return ",".join(_value_text(v) for v in value)
    return str(value)


def _left_text(left: Json) -> str:
    if "meta" in left:
        return str(left["meta"]["key"])
    if "ct" in left:
        return f"ct {left['ct']['key']}"
    if "payload" in left:
        return f"{left['payload']['protocol']} {left['payload']['field']}"
    return _value_text(left)


def expr_text(expr: list[Json]) -> str:
    """A compact nft-like rendering of a rule's expressions (without the counter)."""
    words: list[str] = []
    for e in expr:
        if "match" in e:
            m = e["match"]
            if isinstance(m["left"], dict) and "&" in m["left"]:
                words.append(f"{_value_text(m['left'])} {m['op']} {m['right']:#x}")
                continue
            op = "" if m["op"] in ("==", "in") else f"{m['op']} "
            words.append(f"{_left_text(m['left'])} {op}{_value_text(m['right'])}")
        elif "jump" in e:
            words.append(f"jump {e['jump']['target']}")
        elif "redirect" in e:
            words.append(f"redirect to :{e['redirect']['port']}")
        elif "tproxy" in e:
            words.append(f"tproxy {e['tproxy']['family']} to :{e['tproxy']['port']}")
        elif "snat" in e:
            words.append(f"snat {e['snat'].get('family', '')} to {e['snat'].get('addr')}")
        elif "mangle" in e:
            words.append(f"{_left_text(e['mangle']['key'])} set {_value_text(e['mangle']['value'])}")
        elif "counter" in e:
            continue
        else:
            words.append(next(iter(e)))
    return " ".join(words)


def format_table(table: str, stats: list[ChainStat], sets: dict[str, list[str]]) -> str:
    """Like `iptables -t nat -nvL`: per chain its entry count, then pkts/bytes per deciding rule."""
    lines = [f"table inet {table}"]
    for c in stats:
        kind = f" ({c.hook})" if c.hook else ""
        lines.append(f"\nChain {c.name}{kind}: {c.packets} packets, {c.bytes} bytes entered")
        lines.append(f"{'pkts':>10} {'bytes':>12}  {'rule':<34} match")
        for r in c.rules:
            lines.append(f"{r.packets:>10} {r.bytes:>12}  {r.rule:<34} {r.text}")
    if sets:
        lines.append("\nSets:")
        for name, elems in sets.items():
            shown = ", ".join(elems[:8]) + (f", ... ({len(elems)} in all)" if len(elems) > 8 else "")
            lines.append(f"  @{name}: {{ {shown} }}")
    lines.append("\nnat chains see only the first packet of a connection: their packet counts are connections.")
    return "\n".join(lines)


def set_elements(listing: list[Json]) -> dict[str, list[str]]:
    return {s["set"]["name"]: [_value_text(e) for e in s["set"].get("elem", [])] for s in listing if "set" in s}


def as_json(table: str, stats: list[ChainStat], sets: dict[str, list[str]]) -> Json:
    """What `status` prints, as data: the set contents too (they decide as much as the rules do)."""
    return {"table": table, "sets": sets, "chains": [
        {"name": c.name, "hook": c.hook, "packets": c.packets, "bytes": c.bytes,
         "rules": [{"name": r.rule, "packets": r.packets, "bytes": r.bytes, "match": r.text} for r in c.rules]}
        for c in stats]}
