"""The node agent over fakes: discovery, adoption after a restart, a failing pod, a vanished pod, a slow pod and
a pod that cannot be managed; whatever one namespace does, every other keeps its repairs.

The namespaces are support.nodefakes' files, each with its own FakeKernel and FakeRouter, kept across node
restarts; the `node` fixture (conftest) is this module's World's node.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from support.nodefakes import FakeNode

from interceptd.config import Config
from interceptd.config import options as config
from interceptd.errors import ConfigError, NamespaceError
from interceptd.runtime import nodestate
from interceptd.runtime.node import Node, NodeCollector
from interceptd.system.fake import FakeKernel

BASE = {"service_cidr": "*", "inbound_ports": "*"}
TABLE = ("inet", "interceptd")


class SlowKernel(FakeKernel):
    """A pod whose kernel answers slowly (a busy namespace)."""

    def list_table(self, table: str, family: str = "inet") -> list[dict[str, object]] | None:
        time.sleep(0.02)
        return super().list_table(table, family)


class World(FakeNode):
    """A node's watched directory of namespaces, each with its drop-in configuration (or the error it gives)."""

    def __init__(self, tmp: Path) -> None:
        netns, state = tmp / "netns", tmp / "state"
        super().__init__(netns, state, config.load({**BASE, "netns_dir": str(netns), "state_dir": str(state)}, {}))
        self.bad_config: dict[str, str] = {}  # name -> the error its drop-in gives

    def dir_config(self, name: str) -> Config:
        if name in self.bad_config:
            raise ConfigError(self.bad_config[name])
        return config.load(BASE, {})


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def start(node: Node) -> None:
    node._first_tick()


def test_discovery_applies_every_namespace_and_records_it(world: World, node: Node) -> None:
    for name in ("pod-a", "pod-b", "pod-c"):
        world.add(name)
    start(node)
    assert sorted(node.members) == ["pod-a", "pod-b", "pod-c"] and node.ready()
    for name in ("pod-a", "pod-b", "pod-c"):
        assert TABLE in world.kernel(name).tables
        record = nodestate.read(str(world.state), name)
        assert record is not None and record.source == "dir" and record.listing
    assert node.status_line() == "node: 3 namespaces, 3 ready"


def test_a_restart_adopts_unchanged_tables_untouched_and_repairs_changed_ones(world: World, node: Node) -> None:
    world.add("pod-a")
    world.add("pod-b")
    start(node)
    node.loop.close()
    world.kernel("pod-b").tables[TABLE]["rules"].pop()  # changed while no agent ran
    applies = {name: world.kernel(name).applies for name in ("pod-a", "pod-b")}
    again = world.node()
    try:
        start(again)
        assert world.kernel("pod-a").applies == applies["pod-a"]  # adopted: not written
        assert world.kernel("pod-b").applies == applies["pod-b"] + 1  # not what we applied: applied again
        assert again.ready() and again.members["pod-a"].controller.state.generation == 1
    finally:
        again.loop.close()


def test_a_failing_pod_is_not_ready_and_retried_while_the_others_keep_their_repairs(world: World,
                                                                                     node: Node) -> None:
    for name in ("pod-a", "pod-b", "pod-c"):
        world.add(name)
    world.kernel("pod-b").refuse = 1000
    start(node)
    assert not node.ready() and node.members["pod-b"].controller.retry_at is not None
    assert "pod-b (libnftables refused the transaction (fake))" in node.state.last_error
    del world.kernel("pod-a").tables[TABLE]
    del world.kernel("pod-c").tables[TABLE]
    node.check_all()
    assert TABLE in world.kernel("pod-a").tables and TABLE in world.kernel("pod-c").tables
    world.kernel("pod-b").refuse = 0  # the fault goes away: the next due retry repairs it
    node.members["pod-b"].controller.retry_at = 0.0
    node.tick()
    assert TABLE in world.kernel("pod-b").tables and node.ready()


def test_a_namespace_that_goes_mid_pass_is_retried_then_forgotten(world: World, node: Node) -> None:
    world.add("pod-a")
    world.add("pod-b")
    start(node)
    world.kernel("pod-a").fail_next = NamespaceError("network namespace 'pod-a': cannot enter: No such file")
    del world.kernel("pod-b").tables[TABLE]
    node.check_all()  # pod-a's listing fails: its failure; pod-b is still repaired in the same pass
    assert not node.members["pod-a"].controller.ready() and TABLE in world.kernel("pod-b").tables
    os.unlink(world.netns / "pod-a")
    node.members["pod-a"].controller.retry_at = 0.0
    node.tick()  # the retry finds it gone: forgotten, its record removed, never repaired
    assert "pod-a" not in node.members and nodestate.read(str(world.state), "pod-a") is None
    assert node.ready()


def test_a_slow_pod_delays_but_never_starves_the_others(world: World, node: Node) -> None:
    world.add("pod-a")
    world.add("pod-slow", SlowKernel())
    world.add("pod-z")
    start(node)
    for name in ("pod-a", "pod-slow", "pod-z"):
        del world.kernel(name).tables[TABLE]
    node.check_all()
    assert all(TABLE in world.kernel(n).tables for n in ("pod-a", "pod-slow", "pod-z")) and node.ready()


def test_a_namespace_that_cannot_be_managed_is_reported_until_it_can(world: World, node: Node) -> None:
    world.add("pod-a")
    world.add("pod-bad")
    world.bad_config["pod-bad"] = "--config 'pod-bad.toml': key 'proxy_port': bad value 'x'"
    start(node)
    assert "pod-a" in node.members and "pod-bad" not in node.members
    assert not node.ready() and "pod-bad (--config 'pod-bad.toml'" in node.state.last_error
    families = {f.name: f for f in NodeCollector(node).collect() if f.name.startswith("interceptd_node")}
    (sample,) = families["interceptd_node_namespace_unmanaged"].samples
    assert sample.labels == {"netns": "pod-bad"} and sample.value == 1
    del world.bad_config["pod-bad"]
    node.scan()
    assert "pod-bad" in node.members and node.ready() and not node.failures()


def test_readyz_drift_schedules_a_check_of_that_namespace_only(world: World, node: Node) -> None:
    world.add("pod-a")
    world.add("pod-b")
    start(node)
    del world.kernel("pod-a").tables[TABLE]
    checks_b = dict(node.members["pod-b"].controller.state.reconcile_checks)
    assert not node.members["pod-a"].controller.kernel_matches()  # /readyz, from another thread
    node.tick()
    assert TABLE in world.kernel("pod-a").tables
    assert node.members["pod-b"].controller.state.reconcile_checks == checks_b


def test_an_opted_out_pod_stays_out_whatever_directory_shows_it(world: World, node: Node) -> None:
    path = world.add("cni-late")
    world.add("cni-early")
    nodestate.write(str(world.state), nodestate.Record("cni-early", str(world.netns / "cni-early"), "cni", {}, [],
                                                       opted_out=True))
    start(node)
    assert sorted(node.members) == ["cni-late"] and TABLE not in world.kernel("cni-early").tables
    # The watched directory brought this one in before the CNI plugin said it opted out: the opt-out wins, and
    # the rules it got meanwhile go.
    nodestate.write(str(world.state), nodestate.Record("cni-late", path, "cni", {}, [], opted_out=True))
    assert node.handle({"op": "add", "name": "cni-late"}) == {"ok": True, "ready": True}
    assert node.members == {} and TABLE not in world.kernel("cni-late").tables
    assert node.ready() and nodestate.read(str(world.state), "cni-late") is not None
