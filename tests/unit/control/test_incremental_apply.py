"""A settings change applied incrementally: only the sets and rules that differ are rewritten, in one
transaction, counters continue; anything else (a new shape, drift, a missing handle) replaces the table.
And the read-back that a CNI ADD must pass before it reports success."""

from __future__ import annotations

from typing import Any

import pytest

from interceptd.config import load
from interceptd.control import install
from interceptd.errors import ReadBackError
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.model import Ruleset
from interceptd.ruleset.nftjson import Json, update
from interceptd.ruleset.render import render
from interceptd.system.fake import FakeKernel, FakeRouter

BASE = {"service_cidr": "*", "inbound_ports": "*", "service_exclude_cidr": "203.0.113.0/25",
        "local_outbound_ports_exclude": "2000"}
TABLE = ("inet", "interceptd")
EXCLUDE_V4 = N.SET_EXCLUDE_CIDRS[4]


def _ruleset(**settings: Any) -> Ruleset:
    return render(load({}, {}, {**BASE, **settings}, "test"), HostFacts(ipv6=False, host_ip=None))


class Recording(FakeKernel):
    """The fake kernel, keeping every document it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.documents: list[Json] = []

    def apply(self, document: Json) -> None:
        self.documents.append(document)
        super().apply(document)


def _verbs(document: Json) -> list[str]:
    return [f"{verb} {kind}" for cmd in document["nftables"] for verb, body in cmd.items() for kind in body]


def _handles(kernel: FakeKernel) -> list[int]:
    return [r["handle"] for r in kernel.tables[TABLE]["rules"]]


def test_a_changed_set_gets_its_element_changes_and_nothing_else_is_sent() -> None:
    kernel, router = Recording(), FakeRouter()
    first = install.apply(kernel, router, _ruleset())
    counter = N.counter_name(N.ISTIO_OUTPUT, N.per_family(N.RULE_EXCLUDE_CIDRS_RETURN, 4))
    kernel.count("interceptd", counter, 5, 500)
    handles = _handles(kernel)
    second = install.apply(kernel, router, _ruleset(service_exclude_cidr="198.51.100.0/24,203.0.113.128/25"),
                           previous=first)
    ref = {"family": "inet", "table": "interceptd", "name": EXCLUDE_V4}
    assert kernel.documents[-1] == {"nftables": [
        {"delete": {"element": {**ref, "elem": [{"prefix": {"addr": "203.0.113.0", "len": 25}}]}}},
        {"add": {"element": {**ref, "elem": [{"prefix": {"addr": "198.51.100.0", "len": 24}},
                                             {"prefix": {"addr": "203.0.113.128", "len": 25}}]}}}]}
    assert _handles(kernel) == handles
    assert kernel.tables[TABLE]["counters"][counter]["packets"] == 5
    assert install.holds(second.ruleset, kernel.list_table("interceptd") or [])


def test_a_changed_rule_is_replaced_in_place_by_its_handle() -> None:
    kernel, router = Recording(), FakeRouter()
    first = install.apply(kernel, router, _ruleset())
    handles = _handles(kernel)
    install.apply(kernel, router, _ruleset(envoy_port="15009"), previous=first)
    verbs = _verbs(kernel.documents[-1])
    assert verbs and set(verbs) == {"replace rule"}
    assert _handles(kernel) == handles
    redirects = [r for r in kernel.tables[TABLE]["rules"] if {"redirect": {"port": 15009}} in r["expr"]]
    assert redirects


def test_an_unchanged_ruleset_sends_nothing() -> None:
    kernel, router = Recording(), FakeRouter()
    first = install.apply(kernel, router, _ruleset())
    install.apply(kernel, router, _ruleset(), previous=first)
    assert len(kernel.documents) == 1


@pytest.mark.parametrize("settings", [
    {"local_outbound_ports_exclude": "2000,2001"},  # a contiguous range: the set becomes an interval set
    {"local_outbound_ports_exclude": ""},  # the set and its rule go
    {"outbound_ports": "443"},  # a new rule and set
])
def test_another_shape_replaces_the_whole_table_in_one_transaction(settings: dict[str, str]) -> None:
    kernel, router = Recording(), FakeRouter()
    first = install.apply(kernel, router, _ruleset())
    assert update(first.ruleset, _ruleset(**settings), kernel.list_table("interceptd") or []) is None
    second = install.apply(kernel, router, _ruleset(**settings), previous=first)
    assert _verbs(kernel.documents[-1])[:2] == ["add table", "flush table"]
    assert install.holds(second.ruleset, kernel.list_table("interceptd") or [])


def test_drift_since_the_last_apply_replaces_the_whole_table() -> None:
    kernel, router = Recording(), FakeRouter()
    first = install.apply(kernel, router, _ruleset())
    kernel.tables[TABLE]["rules"].pop()  # another process removed a rule
    second = install.apply(kernel, router, _ruleset(service_exclude_cidr="198.51.100.0/24"), previous=first)
    assert _verbs(kernel.documents[-1])[:2] == ["add table", "flush table"]
    assert install.holds(second.ruleset, kernel.list_table("interceptd") or [])


def test_a_changed_rule_without_a_listed_handle_is_no_update() -> None:
    kernel = FakeKernel()
    first = install.apply(kernel, FakeRouter(), _ruleset())
    listing = [item for item in kernel.list_table("interceptd") or [] if "rule" not in item]
    assert update(first.ruleset, _ruleset(envoy_port="15009"), listing) is None
    assert update(first.ruleset, _ruleset(service_exclude_cidr="198.51.100.0/24"), listing) is not None


def test_the_fake_refuses_to_replace_a_rule_it_does_not_hold() -> None:
    from interceptd.errors import KernelRefusedError

    kernel = FakeKernel()
    install.apply(kernel, FakeRouter(), _ruleset())
    rule = dict(kernel.tables[TABLE]["rules"][0], handle=999_999_999)
    with pytest.raises(KernelRefusedError, match="handle 999999999"):
        kernel.apply({"nftables": [{"replace": {"rule": rule}}]})


def test_a_refused_update_is_followed_by_the_whole_table_in_one_transaction() -> None:
    kernel, router = Recording(), FakeRouter()
    first = install.apply(kernel, router, _ruleset())
    kernel.refuse = 1  # the update (say a handle went meanwhile); the full transaction after it is taken
    second = install.apply(kernel, router, _ruleset(service_exclude_cidr="198.51.100.0/24"), previous=first)
    assert _verbs(kernel.documents[-2]) == ["delete element", "add element"]
    assert _verbs(kernel.documents[-1])[:2] == ["add table", "flush table"]
    assert install.holds(second.ruleset, kernel.list_table("interceptd") or [])


def test_the_read_back_must_decide_as_rendered() -> None:
    kernel = FakeKernel()
    ruleset = _ruleset()
    applied = install.apply(kernel, FakeRouter(), ruleset)
    assert install.verified(kernel, ruleset, applied).listing == applied.listing
    # Another process replaces a rule right after the apply: same names, another decision.
    rule = next(r for r in kernel.tables[TABLE]["rules"] if {"redirect": {"port": 15001}} in r["expr"])
    rule["expr"] = [e if e != {"redirect": {"port": 15001}} else {"redirect": {"port": 9}} for e in rule["expr"]]
    with pytest.raises(ReadBackError, match=f"read back after the apply differs.*{N.ISTIO_REDIRECT}"):
        install.verified(kernel, ruleset, applied)
    del kernel.tables[TABLE]
    with pytest.raises(ReadBackError, match="table missing|is not installed"):
        install.verified(kernel, ruleset, applied)
