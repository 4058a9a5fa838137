"""A change that lands between our transaction and the listing after it must not become the reference.

Found by the resource soak: a foreign `flush table` right after a repair was taken as the new reference,
so the agent never saw the flushed table as drift and the pod stayed uncaptured.
"""

from __future__ import annotations

from typing import Any

import pytest

from interceptd.config import load
from interceptd.control import install, reconcile
from interceptd.errors import KernelRefusedError
from interceptd.ruleset import drift
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import Json
from interceptd.ruleset.render import render
from interceptd.system.fake import FakeKernel, FakeRouter

RULESET = render(load({"service_cidr": "198.51.100.0/24", "inbound_ports": "*"}, {}),
                 HostFacts(ipv6=False, host_ip="192.0.2.2"))


class RacingKernel(FakeKernel):
    """Another process flushes the table (rules and set elements) right after the next `races` applies."""

    def __init__(self, races: int) -> None:
        super().__init__()
        self.races = races

    def apply(self, document: Json) -> None:
        super().apply(document)
        if self.races:
            self.races -= 1
            table: dict[str, Any] = self.tables[("inet", RULESET.table)]
            table["rules"] = []
            for nset in table["sets"].values():
                nset["elem"] = []


def test_a_flush_right_after_the_apply_is_applied_over() -> None:
    kernel = RacingKernel(races=2)
    applied = install.apply(kernel, FakeRouter(), RULESET)
    assert kernel.applies == 3
    assert install.holds(RULESET, kernel.list_table(RULESET.table) or [])
    assert reconcile.check(kernel, FakeRouter(), applied) == []
    kernel.races = 1  # and a later flush is drift again, as it must be
    kernel.apply({"nftables": []})
    assert drift.primary_reason(reconcile.check(kernel, FakeRouter(), applied)) == "chain flushed"


def test_a_process_that_always_wins_is_reported() -> None:
    with pytest.raises(KernelRefusedError, match="changed by another process"):
        install.apply(RacingKernel(races=99), FakeRouter(), RULESET)


def test_holds_needs_every_chain_rule_and_element() -> None:
    kernel = FakeKernel()
    install.apply(kernel, FakeRouter(), RULESET)
    listing = kernel.list_table(RULESET.table) or []
    assert install.holds(RULESET, listing)
    assert not install.holds(RULESET, [i for i in listing if "rule" not in i or i["rule"]["comment"] != N.ENTRY])
    assert not install.holds(RULESET, [*listing, {"chain": {"name": "foreign"}}])
    assert not install.holds(RULESET, [i for i in listing if "set" not in i])
