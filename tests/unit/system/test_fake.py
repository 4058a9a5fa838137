"""The fakes are strict: FakeKernel judges documents like the kernel, all or nothing, and accepts every
ruleset interceptd renders; FakeRouter can refuse changes. Its agreement with the real kernel on the same
documents is tests/integration/system/test_fake_equivalence.py."""

from __future__ import annotations

import copy
import inspect
import os
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from support.fuzz_strategies import FACTS, inputs
from support.nftcases import ACCEPTED, AT, REFUSED, TABLE, Case, counter, nset, rule, table

from interceptd.config import load
from interceptd.config import options as config
from interceptd.control import install
from interceptd.errors import ConfigError, KernelRefusedError, PreflightError, RoutingError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.nftjson import Json
from interceptd.ruleset.render import render
from interceptd.system import preflight, routes
from interceptd.system.fake import FakeKernel, FakeRouter
from interceptd.system.kernel import Kernel, NftKernel

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1


def doc(*commands: Json) -> Json:
    return {"nftables": list(commands)}


@pytest.mark.parametrize("case", REFUSED + ACCEPTED, ids=str)
def test_each_case_is_judged_like_the_kernel_and_a_refusal_changes_nothing(case: Case) -> None:
    kernel = FakeKernel()
    if case.setup:
        kernel.apply(doc(*case.setup))
    before, applies = copy.deepcopy(kernel.tables), kernel.applies
    try:
        kernel.check(doc(*case.document))
    except KernelRefusedError:
        assert not case.accepted
    else:
        assert case.accepted
    assert kernel.tables == before  # check mode never commits
    if case.accepted:
        kernel.apply(doc(*case.document))
        assert kernel.applies == applies + 1
    else:
        with pytest.raises(KernelRefusedError, match=r"nothing was changed: .*\(fake\)"):
            kernel.apply(doc(*case.document))
        assert kernel.tables == before and kernel.applies == applies


def test_refusals_name_the_command_like_the_adapter() -> None:
    with pytest.raises(KernelRefusedError, match=r'command 3 of 3 \(add rule inet interceptd-fake a ""\): No such '
                                                 r"file or directory: counter nope"):
        FakeKernel().apply(doc(table(), {"add": {"chain": {**AT, "name": "a"}}}, rule("a", {"counter": "nope"})))


def test_flush_table_keeps_set_elements_and_counter_values() -> None:
    kernel = FakeKernel()
    kernel.apply(doc(table(), nset("s", "inet_service", [80]), counter("c"), {"add": {"chain": {**AT, "name": "a"}}},
                     rule("a", {"counter": "c"})))
    kernel.count(TABLE, "c", 3, 180)
    kernel.apply(doc({"flush": {"table": {"family": "inet", "name": TABLE}}}))
    listing = kernel.list_table(TABLE) or []
    assert not [i for i in listing if "rule" in i]
    assert [i["set"]["elem"] for i in listing if "set" in i] == [[80]]
    assert kernel.list_counters(TABLE) == [{"counter": {**AT, "name": "c", "packets": 3, "bytes": 180}}]


def test_refuse_hook_refuses_whole_applies_then_lets_them_through() -> None:
    kernel = FakeKernel()
    kernel.refuse = 1
    with pytest.raises(KernelRefusedError, match=r"refused the transaction \(fake\)"):
        kernel.apply(doc(table()))
    assert kernel.tables == {} and kernel.applies == 0
    kernel.apply(doc(table()))
    assert kernel.list_table(TABLE) == [{"table": {"family": "inet", "name": TABLE}}] and kernel.applies == 1


def test_own_table_flags_and_version() -> None:
    kernel = FakeKernel()
    assert kernel.table_flags(TABLE) == ()
    assert kernel.own(TABLE) == ("owner", "persist") == kernel.table_flags(TABLE)
    assert kernel.list_table(TABLE) is not None  # a missing table is created owned
    kernel.apply(doc({"delete": {"table": {"family": "inet", "name": TABLE}}}))
    assert kernel.table_flags(TABLE) == ()  # the flags went with the table
    kernel.persist = False
    assert kernel.own(TABLE) == ("owner",)
    assert kernel.version() == "1.0.6"


def test_preflight_probes_pass_the_fake_and_an_old_version_does_not() -> None:
    kernel = FakeKernel()
    everything = load({"inbound_interception_mode": "TPROXY", "redirect_dns": "true", "drop_invalid": "true"}, {})
    preflight.run(everything, True, kernel)
    assert kernel.tables == {}  # probes are checks: nothing committed
    kernel.libnftables_version = "0.9.8"
    with pytest.raises(PreflightError, match="0.9.8 is too old"):
        preflight.run(everything, True, kernel)


def _signature(cls: type[Any], name: str) -> list[tuple[str, Any]]:
    return [(p.name, p.default) for p in inspect.signature(getattr(cls, name)).parameters.values()]


def test_fake_and_adapter_have_every_method_of_the_protocol() -> None:
    methods = [name for name, value in vars(Kernel).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert {"apply", "check", "list_table", "list_counters", "own", "table_flags", "version"} <= set(methods)
    for name in methods:
        assert _signature(FakeKernel, name) == _signature(Kernel, name) == _signature(NftKernel, name), name


def _config_or_none(given_input: tuple[dict[str, str], dict[str, str], dict[str, Any]]) -> config.Config | None:
    flags, env, toml = given_input
    try:
        return config.load(flags, env, toml, "fuzz.toml")
    except ConfigError:
        return None


@settings(max_examples=300 * SCALE)
@given(inputs(hostile=False), inputs(hostile=False), st.sampled_from(FACTS))
@example(({}, {}, {}), ({"exclude_interfaces": "eth1,eth1"}, {}, {}), FACTS[0])  # the kernel lists eth1 once
def test_every_rendered_ruleset_applies_through_the_fake_fresh_and_over_another(
        first: tuple[dict[str, str], dict[str, str], dict[str, Any]],
        second: tuple[dict[str, str], dict[str, str], dict[str, Any]], facts: HostFacts) -> None:
    """install.apply over an empty kernel, then over what another configuration left (stale chains, sets and
    counters deleted, sets flushed or kept): the fake accepts every transaction and holds the ruleset."""
    kernel, router = FakeKernel(), FakeRouter()
    for when, given_input in (("fresh", first), ("over another", second)):
        cfg = _config_or_none(given_input)
        if cfg is None:
            continue
        try:
            ruleset = render(cfg, facts)
        except ConfigError:
            continue
        install.apply(kernel, router, ruleset)
        event(f"applied {when}")
        assert install.holds(ruleset, kernel.list_table(ruleset.table) or [])
        assert router.entries == routes.wanted(ruleset)


def test_router_refuses_the_next_changes_and_changes_nothing() -> None:
    ruleset = render(load({"inbound_interception_mode": "TPROXY", "inbound_ports": "*"}, {}),
                     HostFacts(ipv6=True, host_ip="192.0.2.2"))
    router = FakeRouter()
    router.refuse = 2
    for _ in range(2):
        with pytest.raises(RoutingError, match=r"cannot add .*\(fake\)"):
            routes.add_missing(ruleset, router)
    assert router.entries == set() and router.calls == []
    routes.add_missing(ruleset, router)
    assert router.entries == routes.wanted(ruleset) and len(router.calls) == len(router.entries)
    router.refuse = 1
    with pytest.raises(RoutingError, match="cannot delete"):
        routes.remove(router)
    assert router.entries == routes.wanted(ruleset)
