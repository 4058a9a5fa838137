"""Drift detection on the FakeKernel: each kind of edit is found and described by name."""

from __future__ import annotations

from typing import Any

from interceptd.config import options as config
from interceptd.control import install, reconcile
from interceptd.control.install import Applied
from interceptd.ruleset import drift
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.render import render
from interceptd.system.fake import FakeKernel, FakeRouter


def setup() -> tuple[FakeKernel, Applied, dict[str, Any]]:
    cfg = config.load({"service_cidr": "*", "inbound_ports": "*", "outbound_ports": "9000,9001"}, {})
    kernel = FakeKernel()
    applied = install.apply(kernel, FakeRouter(), render(cfg, HostFacts(ipv6=False, host_ip=None)))
    return kernel, applied, kernel.tables[("inet", cfg.table)]


def reasons(kernel: FakeKernel, applied: Applied) -> list[str]:
    return [d.reason for d in reconcile.check(kernel, FakeRouter(), applied)]


def test_untouched_table_matches_even_after_traffic() -> None:
    kernel, applied, table = setup()
    name = next(iter(table["counters"]))
    kernel.count(applied.ruleset.table, name, 10, 1000)
    assert reconcile.check(kernel, FakeRouter(), applied) == []


def test_table_deleted() -> None:
    kernel, applied, _ = setup()
    kernel.tables.clear()
    drift = reconcile.check(kernel, FakeRouter(), applied)
    assert [d.reason for d in drift] == ["table missing"]
    assert "inet interceptd" in drift[0].detail


def test_flushed_table_names_every_chain() -> None:
    kernel, applied, table = setup()
    table["rules"] = []
    drift = reconcile.check(kernel, FakeRouter(), applied)
    assert {d.reason for d in drift} == {"chain flushed"}
    assert {d.detail.split()[1] for d in drift} == {c.name for c in applied.ruleset.chains if c.rules}


def test_one_rule_removed_is_named() -> None:
    kernel, applied, table = setup()
    victim = next(r for r in table["rules"] if r["comment"] != N.ENTRY)
    table["rules"].remove(victim)
    drift = reconcile.check(kernel, FakeRouter(), applied)
    assert [(d.reason, d.detail) for d in drift] == [
        ("rule removed", f"rule {victim['chain']}/{victim['comment']} removed")]


def test_foreign_rule_in_our_chain() -> None:
    kernel, applied, table = setup()
    table["rules"].insert(0, {"family": "inet", "table": "interceptd", "chain": N.ISTIO_OUTPUT,
                              "expr": [{"accept": None}]})
    drift = reconcile.check(kernel, FakeRouter(), applied)
    assert [(d.reason, d.detail) for d in drift] == [("rule added", "foreign unnamed rule in chain istio-output added")]


def test_edited_and_reordered_rules() -> None:
    kernel, applied, table = setup()
    rules = [r for r in table["rules"] if r["chain"] == N.ISTIO_OUTPUT]
    rules[1]["expr"] = [{"accept": None}]
    assert reasons(kernel, applied) == ["rule changed"]
    kernel2, applied2, table2 = setup()
    out = [r for r in table2["rules"] if r["chain"] == N.ISTIO_OUTPUT]
    i, j = table2["rules"].index(out[1]), table2["rules"].index(out[2])
    table2["rules"][i], table2["rules"][j] = table2["rules"][j], table2["rules"][i]
    assert reasons(kernel2, applied2) == ["rules reordered"]


def test_set_element_removed() -> None:
    kernel, applied, table = setup()
    name, body = next((n, s) for n, s in table["sets"].items() if len(s["elem"]) >= 1)
    body["elem"] = body["elem"][1:]
    drift = reconcile.check(kernel, FakeRouter(), applied)
    assert [(d.reason, d.detail) for d in drift] == [
        ("set changed", f"set {name} elements changed (1 removed, 0 added)")]


def test_chain_deleted_and_foreign_chain_added_most_severe_first() -> None:
    kernel, applied, table = setup()
    del table["chains"][N.ISTIO_REDIRECT]
    table["rules"] = [r for r in table["rules"] if r["chain"] != N.ISTIO_REDIRECT]
    table["chains"]["mine"] = {"family": "inet", "table": "interceptd", "name": "mine"}
    found = reconcile.check(kernel, FakeRouter(), applied)
    assert [d.reason for d in found] == ["chain deleted", "chain added"]
    assert drift.primary_reason(found) == "chain deleted"


def test_counter_deleted() -> None:
    kernel, applied, table = setup()
    table["counters"].pop(next(iter(table["counters"])))
    assert reasons(kernel, applied) == ["counter deleted"]


def test_repair_by_reapplying_restores_the_reference() -> None:
    kernel, applied, table = setup()
    table["rules"] = table["rules"][3:]
    assert reconcile.check(kernel, FakeRouter(), applied)
    again = install.apply(kernel, FakeRouter(), applied.ruleset)
    assert again.listing == applied.listing
    assert reconcile.check(kernel, FakeRouter(), applied) == []


def test_summary_is_capped() -> None:
    diffs = [drift.Difference("rule removed", f"rule c/r{i} removed") for i in range(30)]
    lines = drift.summary(diffs)
    assert len(lines) == drift.MAX_DETAILS + 1
    assert lines[-1] == f"... and {30 - drift.MAX_DETAILS} more"
