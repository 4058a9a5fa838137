"""`interceptd doctor`'s judgements: from facts read elsewhere to findings, each with what to do. Pure.

Why a separate judge: "is my traffic captured, and if not, why?" is mostly answered by things outside our
table (a neighbour's chain that drops or NATs first, an old istio-init's iptables rules, no proxy listening),
and the same judgements run in the CLI and periodically in the agent, so they must not read anything themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from interceptd.ruleset.explain import LISTENER_ROLE
from interceptd.ruleset.model import CtMarkFromMark, MarkFromCtMark, Redirect, Ruleset, SetMark, TProxy
from interceptd.ruleset.names import RULE_IPV6_DISABLED_RETURN, SET_PROXY_UIDS
from interceptd.ruleset.nftjson import Json
from interceptd.ruleset.status import expr_text

# Statements that take a packet away from our chains when a neighbour's chain runs first. `accept` is not one:
# it ends only that table's base chain, and netfilter still runs ours on the same hook. A payload rewrite
# (kube-proxy's `ip daddr set`) is not one either: the rewritten connection is still captured.
_TAKES = {"drop": "drop", "reject": "reject", "queue": "queue to user space", "dnat": "dnat",
          "redirect": "redirect", "tproxy": "tproxy"}
_FAMILIES = {"ip": (4,), "ip6": (6,), "inet": (4, 6)}
# iptables-nft keeps its rules in these tables, in chains named like its built-ins; the iptables check reports
# them in iptables' own words. A native nft table that happens to be called `ip nat` is judged here.
XTABLES = {"filter", "nat", "mangle", "raw", "security"}
XTABLES_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
_SHOWN = 5
# The checks the agent repeats and exports as interceptd_conflicts{kind}; "table" is drift, the repairs' business.
CONFLICT_KINDS = ("kernel-features", "loopback", "address", "owner", "neighbour-chains", "iptables", "listeners")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Finding:
    check: str  # stable: a metric label and the JSON key
    ok: bool
    verdict: str
    fix: str = ""
    culprits: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, object]:
        return {"check": self.check, "ok": self.ok, "verdict": self.verdict, "fix": self.fix,
                "culprits": list(self.culprits)}


def text(findings: Iterable[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{'ok  ' if f.ok else 'FAIL'}  {f.check}: {f.verdict}")
        lines += [f"        {c}" for c in f.culprits]
        if f.fix:
            lines.append(f"        what to do: {f.fix}")
    return "\n".join(lines)


# -- neighbour tables -------------------------------------------------------------------------------------------
def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON expression, depth first."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key, inner
            yield from _walk(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _walk(inner)


def _uses_marks(ruleset: Ruleset) -> bool:
    marks = (SetMark, MarkFromCtMark, CtMarkFromMark)
    return any(m.key in ("mark", "ct mark") for c in ruleset.chains for r in c.rules for m in r.matches) or any(
        isinstance(a, marks) for c in ruleset.chains for r in c.rules for a in r.actions)


def _takes(expr: list[Json], marks: bool) -> list[str]:
    """What the rule's own statements (and verdict maps) can do to a packet that we care about."""
    out = [_TAKES[key] for key, _ in _walk(expr) if key in _TAKES]
    if marks:
        out += ["set the packet mark" for e in expr if "mangle" in e and e["mangle"]["key"] in
                ({"meta": {"key": "mark"}}, {"ct": {"key": "mark"}})]
    return out


def _cannot_match(expr: list[Json], interfaces: frozenset[str]) -> bool:
    """A rule tied to an interface this namespace does not have never sees a packet here."""
    for e in expr:
        m = e.get("match")
        if m and m["op"] == "==" and m["left"] in ({"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}}) \
                and isinstance(m["right"], str) and "*" not in m["right"] and m["right"] not in interfaces:
            return True
    return False


def _targets(expr: list[Json], maps: dict[str, list[Any]]) -> list[str]:
    """Chains a rule jumps or goes to, also through a verdict map (named or anonymous)."""
    out: list[str] = []
    for key, value in _walk(expr):
        if key in ("jump", "goto") and isinstance(value, dict):
            out.append(str(value["target"]))
        elif key == "vmap" and isinstance(value.get("data"), str) and value["data"].startswith("@"):
            out += [str(v["target"]) for k, v in _walk(maps.get(value["data"][1:], []))
                    if k in ("jump", "goto") and isinstance(v, dict)]
    return out


@dataclass(frozen=True)
class _Table:
    family: str
    name: str
    chains: dict[str, Json]
    rules: dict[str, list[Json]]
    maps: dict[str, list[Any]]


def _table(family: str, name: str, listing: list[Json]) -> _Table:
    chains: dict[str, Json] = {}
    rules: dict[str, list[Json]] = {}
    maps: dict[str, list[Any]] = {}
    for item in listing:
        if "chain" in item:
            chains[item["chain"]["name"]] = item["chain"]
        elif "rule" in item:
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"])
        elif "map" in item:
            maps[item["map"]["name"]] = item["map"].get("elem", [])
    return _Table(family, name, chains, rules, maps)


def _reachable(t: _Table, start: str, interfaces: frozenset[str], marks: bool) -> Iterator[tuple[str, Json, list[str]]]:
    """(chain, rule, what it can do) for every rule reachable from a base chain that can do something to us."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        chain = todo.pop()
        if chain in seen:
            continue
        seen.add(chain)
        for rule in t.rules.get(chain, []):
            expr = rule.get("expr", [])
            if _cannot_match(expr, interfaces):
                continue
            takes = _takes(expr, marks)
            if takes:
                yield chain, rule, takes
            todo += _targets(expr, t.maps)


def captures_ipv6(ruleset: Ruleset) -> bool:
    """Whether the rules capture IPv6: without it, every base chain starts by letting IPv6 through."""
    return not any(r.name == RULE_IPV6_DISABLED_RETURN for c in ruleset.chains for r in c.rules)


def neighbours(ours: Ruleset, ipv6: bool, tables: dict[tuple[str, str], list[Json] | str],
               interfaces: frozenset[str]) -> Finding:
    """Other tables' base chains on our hooks that run before ours, or at the same priority (whose order with
    ours the kernel leaves undefined), and can take our traffic away. A table that could not be read (the
    value is the reason) is named too: nothing can be said about it."""
    hooks: dict[str, int] = {}
    for chain in ours.chains:
        if chain.hook is not None:
            hooks[chain.hook.hook] = max(hooks.get(chain.hook.hook, chain.hook.priority), chain.hook.priority)
    versions = {4, 6} if ipv6 else {4}
    marks = _uses_marks(ours)
    culprits: list[str] = []
    for (family, name), listing in sorted(tables.items()):
        if not versions & set(_FAMILIES.get(family, ())):
            continue
        if isinstance(listing, str):
            culprits.append(f"table {family} {name}: could not be read ({listing})")
            continue
        t = _table(family, name, listing)
        if family in ("ip", "ip6") and name in XTABLES and all(
                c["name"] in XTABLES_CHAINS for c in t.chains.values() if "hook" in c):
            continue
        for body in t.chains.values():
            hook, prio = body.get("hook"), body.get("prio")
            if hook not in hooks or not isinstance(prio, int) or prio > hooks[hook]:
                continue
            when = "at the same priority as ours (their order is undefined)" if prio == hooks[hook] else "before ours"
            for via, rule, takes in _reachable(t, body["name"], interfaces, marks):
                where = f" via chain {via}" if via != body["name"] else ""
                culprits.append(f"table {family} {name} chain {body['name']} ({body.get('type')} {hook} priority "
                                f"{prio}, {when}){where}: `{expr_text(rule.get('expr', []))}` can "
                                f"{' and '.join(dict.fromkeys(takes))} our traffic")
    if not culprits:
        return Finding("neighbour-chains", True, "no other table's chain runs before ours and takes our traffic")
    return Finding("neighbour-chains", False, f"{_count(len(culprits), 'rule')} of other tables can take "
                   "traffic before interceptd sees it", "remove the table if it is a leftover (nft delete table "
                   "FAMILY NAME), or exempt the pod's traffic in it, or give it a priority after ours",
                   tuple(culprits[:_SHOWN]) + ((f"... and {len(culprits) - _SHOWN} more",)
                                               if len(culprits) > _SHOWN else ()))


def iptables(rules: dict[str, list[str]]) -> Finding:
    """`rules`: per flavour (iptables-nft, ip6tables-legacy, ...) the `-A` lines of its save output."""
    found = {flavour: lines for flavour, lines in rules.items() if lines}
    if not found:
        return Finding("iptables", True, "no iptables rules (nft or legacy) in this namespace")
    culprits = []
    for flavour, lines in sorted(found.items()):
        istio = sorted({w for line in lines for w in line.split() if w.startswith("ISTIO_")})
        who = f" (a leftover istio-init: chains {', '.join(istio)})" if istio else ""
        culprits.append(f"{flavour}: {_count(len(lines), 'rule')}{who}, e.g. `{lines[0]}`")
    return Finding("iptables", False, "iptables rules in this namespace run next to interceptd's table and can "
                   "redirect, drop or mark the same traffic", "if they are a leftover init container's or another "
                   "mesh's, flush them (e.g. iptables-nft -t nat -F; iptables-nft -t nat -X); otherwise make sure "
                   "they exempt the pod's traffic", tuple(culprits))


def listener_ports(ruleset: Ruleset) -> tuple[dict[int, str], tuple[int, ...]]:
    """The ports the rules send connections to (port -> role), and the proxy's uids the rules exempt."""
    wanted: dict[int, str] = {}
    for chain in ruleset.chains:
        for rule in chain.rules:
            for action in rule.actions:
                if isinstance(action, Redirect | TProxy):
                    wanted.setdefault(action.port, LISTENER_ROLE.get(chain.name, f"target of {chain.name}"))
    uids = next((tuple(int(e) for e in s.elements if isinstance(e, int)) for s in ruleset.sets
                 if s.name == SET_PROXY_UIDS), ())
    return wanted, uids


def listeners(wanted: dict[int, str], listening: dict[int, set[int]], proxy_uids: tuple[int, ...]) -> Finding:
    """`wanted`: port -> role; `listening`: port -> uids of the sockets listening on it (any address)."""
    if not wanted:
        return Finding("listeners", True, "no rule sends connections to a proxy port")
    culprits = []
    for port, role in sorted(wanted.items()):
        uids = listening.get(port)
        if not uids:
            culprits.append(f":{port} ({role}): nothing listens; captured connections are refused")
        elif proxy_uids and not uids & set(proxy_uids):
            culprits.append(f":{port} ({role}): the listener runs as uid {', '.join(map(str, sorted(uids)))}, not "
                            f"the proxy uid {', '.join(map(str, proxy_uids))}: its own connections are captured "
                            "again (a loop)")
    if not culprits:
        return Finding("listeners", True, "the proxy listens on " + ", ".join(f":{p}" for p in sorted(wanted)))
    return Finding("listeners", False, "the proxy's ports are not served as the rules expect",
                   "start the proxy, as the proxy user (-u), on the ports given by -p and -z", tuple(culprits))


def table(name: str, found: list[str] | None, installed: bool) -> Finding:
    """`found`: the differences between the configured and the installed table, in words; None when no
    configuration was given to compare with (the installed table is then the reference for the other checks)."""
    if not installed:
        return Finding("table", False, f"table inet {name} is not installed: nothing is captured",
                       "run `interceptd apply` (or the agent, `interceptd run`) with this configuration")
    if found is None:
        return Finding("table", True, f"table inet {name} is installed (give the configuration, flags or "
                       "--config, to compare it)")
    if not found:
        return Finding("table", True, f"table inet {name} matches the configuration")
    return Finding("table", False, f"table inet {name} differs from the configuration in {len(found)} places",
                   "re-apply (`interceptd apply`), or check that the configuration given here is the one in use; "
                   "`interceptd diff` lists every difference", tuple(found[:_SHOWN]) + (
                       (f"... and {len(found) - _SHOWN} more",) if len(found) > _SHOWN else ()))


def owner(name: str, flags: tuple[str, ...], wanted: bool, installed: bool) -> Finding:
    if not installed:
        return Finding("owner", True, "no table, no owner")
    if wanted and "owner" not in flags:
        return Finding("owner", False, f"table inet {name} has no owner flag although --own-table is set: any "
                       "process can flush or edit it", "restart the agent (`interceptd run --own-table`)")
    if "owner" in flags and not wanted:
        return Finding("owner", True, f"table inet {name} is owned by a running agent (--own-table): only that "
                       "agent can change it; apply and cleanup from here are refused")
    return Finding("owner", True, f"table inet {name}: owner flag as configured ({'set' if wanted else 'not set'})")
