"""The configured ruleset against the installed one, as models: chain by chain, rule by rule, element by element.

Why models and not listings: the drift check compares the kernel with a listing the kernel itself printed
after our apply, but `interceptd diff`, `explain` and `doctor` compare it with a configuration that was never
applied. The kernel spells a few things differently from what nftjson sends without changing a decision (it
hides a `meta l4proto tcp` that only guards a `tcp dport`, lists a one-port range as the port): `canonical`
folds those away on both sides, so only real differences remain. The reasons are drift's, so a difference
reads and counts alike wherever it is reported.
"""

from __future__ import annotations

from interceptd.config.values import PortRange
from interceptd.records import replace
from interceptd.ruleset.drift import Difference
from interceptd.ruleset.model import Chain, NamedSet, Rule, Ruleset, Scalar, SetRef, Value
from interceptd.ruleset.nfttext import action_text, match_text, scalar_text


def _scalar(value: Scalar) -> Scalar:
    return value.first if isinstance(value, PortRange) and value.first == value.last else value


def _value(value: Value) -> Value:
    if isinstance(value, tuple):
        return tuple(_scalar(v) for v in value)
    return value if isinstance(value, SetRef) else _scalar(value)


def _text(rule: Rule) -> str:
    """The rule without its counter and comment, which only repeat its name."""
    words = [*(match_text(m) for m in rule.matches), *(action_text(a) for a in rule.actions)]
    return " ".join(words) or "(counts only)"


def _canonical_rule(rule: Rule) -> Rule:
    """Without the `l4proto` guards the kernel hides and with one-port ranges as ports; `why` dropped."""
    keys = [m.key for m in rule.matches]
    matches = tuple(replace(m, value=_value(m.value)) for n, m in enumerate(rule.matches)
                    if not (m.key == "l4proto" and not m.negate and isinstance(m.value, str)
                            and any(k.startswith(f"{m.value} ") for k in keys[n + 1:])))
    return Rule(rule.name, matches, rule.actions)


def _canonical_set(nset: NamedSet) -> NamedSet:
    return replace(nset, elements=tuple(_scalar(e) for e in nset.elements))


def differences(configured: Ruleset, installed: Ruleset | None) -> list[Difference]:
    """Every way `installed` differs from `configured`, in table order; [] when they decide alike."""
    table = f"table {configured.family} {configured.table}"
    if installed is None:
        return [Difference("table missing", f"{table} is not installed")]
    out: list[Difference] = []
    have = {c.name: c for c in installed.chains}
    for chain in configured.chains:
        if chain.name not in have:
            out.append(Difference("chain deleted", f"chain {chain.name}: configured, not installed"))
        else:
            out += _chain(chain, have[chain.name])
    wanted = {c.name for c in configured.chains}
    out += [Difference("chain added", f"chain {c.name}: installed, not configured ({len(c.rules)} rules)")
            for c in installed.chains if c.name not in wanted]
    sets = {s.name: s for s in installed.sets}
    for nset in configured.sets:
        if nset.name not in sets:
            out.append(Difference("set deleted", f"set {nset.name}: configured, not installed"))
        else:
            out += _set(_canonical_set(nset), _canonical_set(sets[nset.name]))
    known = {s.name for s in configured.sets}
    out += [Difference("set added", f"set {s.name}: installed, not configured")
            for s in installed.sets if s.name not in known]
    return out


def _hook(chain: Chain) -> str:
    return f"{chain.hook.type} {chain.hook.hook} priority {chain.hook.priority}" if chain.hook else "regular chain"


def _chain(want: Chain, have: Chain) -> list[Difference]:
    out = []
    if want.hook != have.hook:
        out.append(Difference("chain changed", f"chain {want.name}: configured {_hook(want)}, "
                                               f"installed {_hook(have)}"))
    wanted = [_canonical_rule(r) for r in want.rules]
    held = [_canonical_rule(r) for r in have.rules]
    if wanted == held:
        return out
    if wanted and not held:
        return [*out, Difference("chain flushed", f"chain {want.name}: flushed, its {len(wanted)} rules are not "
                                                  "installed")]
    by_name = {r.name: r for r in held}
    names = {r.name for r in wanted}
    rules: list[Difference] = []
    for rule in wanted:
        other = by_name.get(rule.name)
        if other is None:
            rules.append(Difference("rule removed", f"- {want.name}/{rule.name}: {_text(rule)}"))
        elif other != rule:
            rules.append(Difference("rule changed", f"~ {want.name}/{rule.name}: configured "
                                                  f"{_text(rule)}; installed {_text(other)}"))
    rules += [Difference("rule added", f"+ {have.name}/{r.name}: {_text(r)}")
              for r in held if r.name not in names]
    return out + (rules or [Difference("rules reordered", f"chain {want.name}: the same rules in another order "
                                                          "or duplicated")])


def _set(want: NamedSet, have: NamedSet) -> list[Difference]:
    out = []
    if (want.type, want.interval) != (have.type, have.interval):
        out.append(Difference("set changed", f"set {want.name}: configured type {want.type}, installed "
                                             f"{have.type}{' (interval)' if have.interval else ''}"))
    held = set(have.elements)
    wanted = set(want.elements)
    out += [Difference("set changed", f"- set {want.name} element {scalar_text(e)}")
            for e in want.elements if e not in held]
    out += [Difference("set changed", f"+ set {want.name} element {scalar_text(e)}")
            for e in have.elements if e not in wanted]
    return out
