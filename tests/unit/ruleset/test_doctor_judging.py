"""The pure halves of `diff` and `doctor`: the model comparison and the judgements, without a kernel."""

from __future__ import annotations

from typing import Any

from interceptd.config import load
from interceptd.config.values import PortRange
from interceptd.records import replace
from interceptd.ruleset import doctor
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Hook
from interceptd.ruleset.nftjson import Existing, transaction
from interceptd.ruleset.nftparse import parse_listing
from interceptd.ruleset.render import render
from interceptd.ruleset.tablediff import differences
from interceptd.system.fake import FakeKernel

FACTS = HostFacts(ipv6=True, host_ip="192.0.2.2")
SEED = {"envoy_port": "15001", "inbound_capture_port": "15006", "proxy_uid": "1337", "service_cidr": "*",
        "inbound_ports": "*", "local_exclude_ports": "15090,15021,15020"}
RULESET = render(load(SEED, {}), FACTS)


def test_a_ruleset_equals_itself_read_back_although_the_spelling_differs() -> None:
    kernel = FakeKernel()
    kernel.apply(transaction(RULESET, Existing.empty()))
    listing = kernel.list_table(RULESET.table)
    assert listing is not None
    assert differences(RULESET, parse_listing(RULESET.table, listing)) == []
    # The kernel's spellings: no l4proto guard before `tcp dport`, a one-port range as the port.
    guarded = [(c, r) for c in RULESET.chains for r in c.rules
               if [m.key for m in r.matches][:2] == ["oifname", "l4proto"] or
               any(m.key == "l4proto" and n + 1 < len(r.matches) and r.matches[n + 1].key.startswith("tcp ")
                   for n, m in enumerate(r.matches))]
    assert guarded
    for chain, rule in guarded:
        hidden = replace(rule, matches=tuple(m for m in rule.matches if m.key != "l4proto"))
        spelled = replace(RULESET, chains=tuple(replace(c, rules=tuple(hidden if r is rule else r for r in c.rules))
                                                if c is chain else c for c in RULESET.chains))
        assert differences(RULESET, spelled) == [], rule.name
    nset = next(s for s in RULESET.sets if PortRange(15090, 15090) in s.elements)
    ported = replace(nset, elements=tuple(15090 if e == PortRange(15090, 15090) else e for e in nset.elements))
    assert differences(RULESET, replace(RULESET, sets=tuple(ported if s is nset else s for s in RULESET.sets))) == []
    # A guard that nothing else implies is a real difference.
    chain = next(c for c in RULESET.chains if any(r.matches and r.matches[-1].key == "l4proto" for r in c.rules))
    rule = next(r for r in chain.rules if r.matches and r.matches[-1].key == "l4proto")
    bare = replace(RULESET, chains=tuple(replace(c, rules=tuple(replace(r, matches=r.matches[:-1]) if r is rule
                                                                   else r for r in c.rules)) if c is chain else c
                                         for c in RULESET.chains))
    assert [d.reason for d in differences(RULESET, bare)] == ["rule changed"]


def test_every_kind_of_difference_is_named() -> None:
    first, *rest = RULESET.chains
    nset = RULESET.sets[0]
    changed = replace(RULESET, chains=(replace(first, hook=Hook("nat", first.hook.hook if first.hook else "", -1),
                                               rules=first.rules[1:]), *rest[1:]),
                      sets=(replace(nset, elements=(*nset.elements[1:], PortRange(9, 9))), *RULESET.sets[1:]))
    found = {d.reason: d.detail for d in differences(RULESET, changed)}
    assert found["chain changed"].endswith("installed nat prerouting priority -1")
    assert found["rule removed"].startswith(f"- {first.name}/{first.rules[0].name}")
    assert found["chain deleted"] == f"chain {rest[0].name}: configured, not installed"
    assert "+ set" in " ".join(d.detail for d in differences(RULESET, changed) if d.reason == "set changed")
    assert differences(RULESET, None)[0].reason == "table missing"


def _table(family: str, name: str, hook: str, prio: int, *rules: list[dict[str, Any]],
           extra: list[dict[str, Any]] | None = None) -> dict[tuple[str, str], list[dict[str, Any]] | str]:
    base = {"chain": {"family": family, "table": name, "name": "c", "type": "filter", "hook": hook, "prio": prio}}
    items = [base, *({"rule": {"chain": "c", "expr": expr}} for expr in rules), *(extra or [])]
    return {(family, name): items}


DROP = [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}},
        {"drop": None}]


def test_neighbour_judgement() -> None:
    def judge(tables: dict[tuple[str, str], list[dict[str, Any]] | str], ipv6: bool = True) -> doctor.Finding:
        return doctor.neighbours(RULESET, ipv6, tables, frozenset({"lo", "eth0"}))

    assert not judge(_table("ip", "t", "output", -200, DROP)).ok
    assert judge(_table("ip", "t", "output", 10, DROP)).ok  # after ours
    assert judge(_table("ip", "t", "forward", -200, DROP)).ok  # a hook we do not use
    assert judge(_table("ip", "t", "output", -200, [{"accept": None}])).ok  # ends only its own chain
    assert judge(_table("ip6", "t", "output", -200, DROP), ipv6=False).ok  # IPv6 not captured
    absent = [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth9"}}, {"drop": None}]
    assert judge(_table("ip", "t", "output", -200, absent)).ok
    via_map = [{"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@m"}}]
    found = judge(_table("inet", "t", "output", -100, via_map, extra=[
        {"map": {"name": "m", "elem": [["198.51.100.1", {"goto": {"target": "deny"}}]]}},
        {"chain": {"name": "deny"}}, {"rule": {"chain": "deny", "expr": [{"drop": None}]}}]))
    assert not found.ok and "via chain deny" in found.culprits[0] and "same priority" in found.culprits[0]
    unreadable = judge({("ip", "t"): "libnftables crashed (signal 11) listing it"})
    assert not unreadable.ok and "could not be read" in unreadable.culprits[0]
    # iptables-nft's own tables are the iptables check's; a native table that is merely called `ip nat` is not.
    assert judge(_table("ip", "nat", "output", -200, DROP) | {("ip", "nat"): [
        {"chain": {"name": "OUTPUT", "type": "nat", "hook": "output", "prio": -100}},
        {"rule": {"chain": "OUTPUT", "expr": [{"jump": {"target": "ISTIO_OUTPUT"}}]}},
        {"chain": {"name": "ISTIO_OUTPUT"}}, {"rule": {"chain": "ISTIO_OUTPUT", "expr": [{"redirect": {}}]}}]}).ok
    assert not judge(_table("ip", "nat", "output", -200, DROP)).ok


def test_ipv6_capture_is_read_from_the_rules() -> None:
    assert doctor.captures_ipv6(RULESET)
    assert not doctor.captures_ipv6(render(load(SEED, {}), replace(FACTS, ipv6=False)))


def test_marks_matter_only_when_our_rules_use_them() -> None:
    mark = [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 9}}]
    tproxy = render(load({**SEED, "inbound_interception_mode": "TPROXY"}, {}), FACTS)
    assert doctor.neighbours(RULESET, True, _table("ip", "t", "prerouting", -200, mark), frozenset()).ok
    assert not doctor.neighbours(tproxy, True, _table("ip", "t", "prerouting", -200, mark), frozenset()).ok


def test_iptables_and_listeners() -> None:
    assert doctor.iptables({"iptables-nft": [], "iptables-legacy": []}).ok
    leftover = doctor.iptables({"iptables-nft": ["-A OUTPUT -p tcp -j ISTIO_OUTPUT"]})
    assert not leftover.ok and "leftover istio-init: chains ISTIO_OUTPUT" in leftover.culprits[0]
    wanted, uids = doctor.listener_ports(RULESET)
    assert set(wanted) == {15001, 15006} and uids == (1337,)
    assert doctor.listeners(wanted, {15001: {1337}, 15006: {1337}}, uids).ok
    wrong = doctor.listeners(wanted, {15001: {0}, 15006: {1337}}, uids)
    assert not wrong.ok and "uid 0" in wrong.culprits[0]
    assert "nothing listens" in doctor.listeners(wanted, {}, uids).culprits[0]
