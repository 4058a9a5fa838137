"""TPROXY's rules and routes cannot join the table's transaction: an apply stopped after any of its steps
leaves no table, or a table with the rules and routes its marks need; the next apply completes it."""

from __future__ import annotations

import contextlib

import pytest

from interceptd.config import load
from interceptd.control import install
from interceptd.errors import KernelRefusedError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import Json, normalise
from interceptd.ruleset.render import render
from interceptd.system import routes
from interceptd.system.fake import FakeKernel, FakeRouter
from interceptd.system.routes import Entry

FACTS = HostFacts(ipv6=True, host_ip="192.0.2.2")
TPROXY = {"inbound_interception_mode": "TPROXY", "inbound_ports": "*", "service_cidr": "*"}
OLD = render(load({**TPROXY, "inbound_tproxy_mark": "1337", "inbound_tproxy_route_table": "133"}, {}), FACTS)
NEW = render(load({**TPROXY, "inbound_tproxy_mark": "1338", "inbound_tproxy_route_table": "134"}, {}), FACTS)
REDIRECT = render(load({"inbound_ports": "*", "service_cidr": "*"}, {}), FACTS)


class Killed(BaseException):
    """SIGKILL, as far as the code under test can tell: nothing after it runs."""


class Steps:
    """Counts the changes made to the kernel (transactions, rule/route changes) and stops at `limit`."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.done: list[str] = []

    def step(self, what: str) -> None:
        if self.limit is not None and len(self.done) >= self.limit:
            raise Killed
        self.done.append(what)


class StepKernel(FakeKernel):
    def __init__(self, steps: Steps) -> None:
        super().__init__()
        self.steps = steps

    def apply(self, document: Json) -> None:
        self.steps.step("table")
        super().apply(document)


class StepRouter(FakeRouter):
    def __init__(self, steps: Steps) -> None:
        super().__init__()
        self.steps = steps

    def add(self, entry: Entry) -> None:
        self.steps.step(f"add {entry.kind}")
        super().add(entry)

    def delete(self, entry: Entry) -> None:
        self.steps.step(f"delete {entry.kind}")
        super().delete(entry)


def world(before: Ruleset | None) -> tuple[Steps, StepKernel, StepRouter]:
    steps = Steps()
    kernel, router = StepKernel(steps), StepRouter(steps)
    if before is not None:
        install.apply(kernel, router, before, reference=False)
    steps.done.clear()
    return steps, kernel, router


def table_of(ruleset: Ruleset) -> list[Json]:
    """The table as the kernel lists it once `ruleset` is installed (marks included, unlike install.holds)."""
    kernel = FakeKernel()
    install.apply(kernel, FakeRouter(), ruleset, reference=False)
    return normalise(kernel.list_table(ruleset.table) or [])


def consistent(kernel: FakeKernel, router: FakeRouter, candidates: tuple[Ruleset, ...]) -> bool:
    """No table, or a table exactly as one of the candidates makes it, with every rule and route it needs."""
    listing = kernel.list_table("interceptd")
    if listing is None:
        return True
    held = [r for r in candidates if table_of(r) == normalise(listing)]
    return len(held) == 1 and routes.wanted(held[0]) <= router.owned()


def test_the_order_of_a_change_of_mark() -> None:
    steps, kernel, router = world(OLD)
    install.apply(kernel, router, NEW, reference=False)
    assert steps.done == ["add route", "add route", "add rule", "add rule", "table",
                          "delete rule", "delete rule", "delete route", "delete route"]


@pytest.mark.parametrize(("before", "after"), [(None, NEW), (OLD, NEW), (NEW, REDIRECT), (REDIRECT, OLD)],
                         ids=["fresh", "new-mark", "tproxy-to-redirect", "redirect-to-tproxy"])
def test_killed_after_any_step_the_kernel_is_consistent_and_the_next_apply_completes(
        before: Ruleset | None, after: Ruleset) -> None:
    total = len(_steps_of(before, after))
    for limit in range(total + 1):
        steps, kernel, router = world(before)
        steps.limit = limit
        with pytest.raises(Killed) if limit < total else contextlib.nullcontext():
            install.apply(kernel, router, after, reference=False)
        candidates = (after,) if before is None else (before, after)
        assert consistent(kernel, router, candidates), f"killed after {steps.done}"
        steps.limit = None
        install.apply(kernel, router, after, reference=False)  # the next apply
        assert install.holds(after, kernel.list_table("interceptd") or [])
        assert {e for e in router.owned() if e.kind != "address"} == {
            e for e in routes.wanted(after) if e.kind != "address"}


def _steps_of(before: Ruleset | None, after: Ruleset) -> list[str]:
    steps, kernel, router = world(before)
    install.apply(kernel, router, after, reference=False)
    return steps.done


@pytest.mark.parametrize("before", [None, OLD], ids=["fresh", "new-mark"])
def test_a_refused_transaction_takes_back_the_rules_and_routes_added_for_it(before: Ruleset | None) -> None:
    _steps, kernel, router = world(before)
    tables, entries = kernel.list_table("interceptd"), router.owned()
    kernel.refuse = 1
    with pytest.raises(KernelRefusedError):
        install.apply(kernel, router, NEW)
    assert kernel.list_table("interceptd") == tables
    assert {e for e in router.owned() if e.kind != "address"} == {e for e in entries if e.kind != "address"}
