"""Drift: how a kernel listing differs from the reference listing taken right after our own apply, in words.

Pure: the reference is the normalised listing (control.install.Applied.listing), so the comparison never
depends on how libnftables happens to spell an expression. Deciding to repair is the controller's job.
"""

from __future__ import annotations

from collections import defaultdict

from interceptd.records import record
from interceptd.ruleset.nftjson import Json

# Reasons, most severe first: a repair is counted under the first reason of its differences.
REASONS = ("table missing", "routes missing", "chain deleted", "chain flushed", "chain changed", "chain added",
           "rule removed", "rule added", "rule changed", "rules reordered", "set deleted", "set changed", "set added",
           "counter deleted", "counter added", "object changed")
MAX_DETAILS = 12


@record
class Difference:
    reason: str  # one of REASONS: low cardinality, a metric label
    detail: str  # for the log: names the chain, rule or set

    @property
    def rank(self) -> int:
        return REASONS.index(self.reason)


def primary_reason(differences: list[Difference]) -> str:
    return min(differences, key=lambda d: d.rank).reason


def summary(differences: list[Difference]) -> list[str]:
    """The details for one log event, capped so a flushed table does not produce a giant line."""
    ordered = sorted(differences, key=lambda d: d.rank)
    details = [d.detail for d in ordered[:MAX_DETAILS]]
    if len(ordered) > MAX_DETAILS:
        details.append(f"... and {len(ordered) - MAX_DETAILS} more")
    return details


def _by_kind(listing: list[Json]) -> dict[str, list[Json]]:
    out: dict[str, list[Json]] = defaultdict(list)
    for item in listing:
        ((kind, body),) = item.items()
        out[kind].append(body)
    return out


def compare(reference: list[Json], current: list[Json]) -> list[Difference]:
    """Pure: both arguments are normalised listings of the same table."""
    if reference == current:
        return []
    ref, cur = _by_kind(reference), _by_kind(current)
    out = _compare_chains(ref, cur)
    out += _compare_sets(ref.get("set", []), cur.get("set", []))
    out += _compare_named(ref.get("counter", []), cur.get("counter", []), "counter")
    for kind in sorted((set(ref) | set(cur)) - {"table", "chain", "rule", "set", "counter"}):
        if ref.get(kind) != cur.get(kind):
            out.append(Difference("object changed", f"{kind} objects changed"))
    if not out:  # same objects, but e.g. table flags differ
        out.append(Difference("object changed", "table attributes changed"))
    return sorted(out, key=lambda d: d.rank)


def _compare_named(ref: list[Json], cur: list[Json], kind: str) -> list[Difference]:
    ref_names = {b["name"] for b in ref}
    cur_names = {b["name"] for b in cur}
    return ([Difference(f"{kind} deleted", f"{kind} {n} deleted") for n in sorted(ref_names - cur_names)]
            + [Difference(f"{kind} added", f"foreign {kind} {n} added") for n in sorted(cur_names - ref_names)])


def _compare_chains(ref: dict[str, list[Json]], cur: dict[str, list[Json]]) -> list[Difference]:
    out = _compare_named(ref.get("chain", []), cur.get("chain", []), "chain")
    cur_chains = {b["name"]: b for b in cur.get("chain", [])}
    ref_rules, cur_rules = _rules_by_chain(ref.get("rule", [])), _rules_by_chain(cur.get("rule", []))
    for body in ref.get("chain", []):
        name = body["name"]
        if name not in cur_chains:
            continue
        if cur_chains[name] != body:
            out.append(Difference("chain changed", f"chain {name} changed (hook, priority or policy)"))
        want, have = ref_rules.get(name, []), cur_rules.get(name, [])
        if want and not have:
            out.append(Difference("chain flushed", f"chain {name} flushed ({len(want)} rules gone)"))
        elif want != have:
            out += _compare_rules(name, want, have)
    return out  # rules in foreign chains are covered by "chain added"


def _rules_by_chain(rules: list[Json]) -> dict[str, list[Json]]:
    out: dict[str, list[Json]] = defaultdict(list)
    for rule in rules:
        out[rule["chain"]].append(rule)
    return out


def _compare_rules(chain: str, want: list[Json], have: list[Json]) -> list[Difference]:
    wanted = {r.get("comment", ""): r for r in want}
    held = {r.get("comment", ""): r for r in have}
    out = [Difference("rule removed", f"rule {chain}/{n} removed") for n in wanted if n not in held]
    for rule in have:
        name = rule.get("comment")
        if name is None or name not in wanted:
            what = f"rule {chain}/{name}" if name else f"unnamed rule in chain {chain}"
            out.append(Difference("rule added", f"foreign {what} added"))
        elif rule != wanted[name]:
            out.append(Difference("rule changed", f"rule {chain}/{name} changed"))
    if not out:
        out.append(Difference("rules reordered", f"rules of chain {chain} reordered or duplicated"))
    return out


def _compare_sets(ref: list[Json], cur: list[Json]) -> list[Difference]:
    out = _compare_named(ref, cur, "set")
    cur_sets = {b["name"]: b for b in cur}
    for body in ref:
        have = cur_sets.get(body["name"])
        if have is None or have == body:
            continue
        want_elems, have_elems = _elements(body), _elements(have)
        if {k: v for k, v in body.items() if k != "elem"} != {k: v for k, v in have.items() if k != "elem"}:
            out.append(Difference("set changed", f"set {body['name']} type or flags changed"))
        if want_elems != have_elems:
            gone, extra = len(want_elems - have_elems), len(have_elems - want_elems)
            out.append(Difference("set changed", f"set {body['name']} elements changed ({gone} removed, "
                                                 f"{extra} added)"))
    return out


def _elements(body: Json) -> set[str]:
    return {repr(e) for e in body.get("elem", [])}
