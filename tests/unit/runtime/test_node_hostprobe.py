"""The node agent's host probe table over fakes: written only with --ambient-host-rules, only its own table in the
node's namespace, its sets following the ambient pods by element changes, repaired and retried like a pod's.

CNI records of ambient and sidecar pods are written as interceptd-cni writes them; the namespaces, and the
node's own with a kernel that records every document it is sent, are support.nodefakes'.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from support.nodefakes import FakeNode

from interceptd.config import Config
from interceptd.config import options as config
from interceptd.errors import KernelRefusedError, NamespaceError
from interceptd.ruleset.names import HOST_TABLE
from interceptd.runtime.hostprobe import HOST_NAME, OWN_NETNS
from interceptd.runtime.node import Node, NodeCollector

HOST = ("inet", HOST_TABLE)
AMBIENT = {"capture_mode": "ambient"}
SIDECAR = {"service_cidr": "*", "inbound_ports": "*"}


class World(FakeNode):
    """A node of CNI pods, or of a watched directory's namespaces, with the host probe table asked for (or not)."""

    def __init__(self, tmp: Path, host_rules: bool = True, watched: bool = False) -> None:
        netns, state = tmp / "netns", tmp / "state"
        super().__init__(netns, state, config.load({"netns_dir": str(netns) if watched else "", "state_dir": str(state),
                                                    "ambient_host_rules": "true" if host_rules else "false"}, {}),
                         ipv6=True)
        self.settings: dict[str, dict[str, Any]] = {}  # a watched namespace's drop-in settings
        self.unreadable: set[str] = set()  # namespaces whose addresses cannot be read (going away)
        self.read: set[str] = set()  # namespaces whose addresses were read

    def dir_config(self, name: str) -> Config:
        return config.load(self.settings.get(name, SIDECAR), {})

    def addresses_at(self, path: str) -> Iterable[str]:
        self.read.add(path)
        if path in self.unreadable:
            raise NamespaceError(f"cannot enter network namespace {path} (fake)")
        return super().addresses_at(path)

    def probe_sets(self) -> tuple[list[Any], list[Any]]:
        sets = self.host.tables[HOST]["sets"]
        return sets["probe-pods-v4"]["elem"], sets["probe-pods-v6"]["elem"]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_the_host_table_holds_the_ambient_pods_addresses_only(world: World, node: Node) -> None:
    world.cni("amb-a", AMBIENT, "192.0.2.10", "2001:db8::10")
    world.cni("amb-b", {**AMBIENT, "ambient_ingress": True}, "192.0.2.11")
    world.cni("side", SIDECAR, "192.0.2.12")
    node._first_tick()
    assert list(world.host.tables) == [HOST]  # the node's namespace gets its own table, nothing else
    assert world.probe_sets() == (["192.0.2.10", "192.0.2.11"], ["2001:db8::10"])
    assert node.ready() and node.host is not None and node.host.ready()


def test_pods_coming_and_going_are_element_changes_in_one_transaction(world: World, node: Node) -> None:
    world.cni("amb-a", AMBIENT, "192.0.2.10")
    node._first_tick()
    sent = len(world.host.documents)
    world.cni("amb-b", AMBIENT, "192.0.2.11", "2001:db8::11")
    assert node.handle({"op": "add", "name": "amb-b"})["ok"]
    node.tick()
    assert world.probe_sets() == (["192.0.2.10", "192.0.2.11"], ["2001:db8::11"])
    assert world.host.documents[sent:] == [{"nftables": [
        {"add": {"element": {"family": "inet", "table": HOST_TABLE, "name": "probe-pods-v4", "elem": ["192.0.2.11"]}}},
        {"add": {"element": {"family": "inet", "table": HOST_TABLE, "name": "probe-pods-v6",
                             "elem": ["2001:db8::11"]}}}]}]
    assert node.handle({"op": "del", "name": "amb-a"}) == {"ok": True}
    node.tick()
    assert world.probe_sets() == (["192.0.2.11"], ["2001:db8::11"])
    (only,) = world.host.documents[-1]["nftables"]
    assert only == {"delete": {"element": {"family": "inet", "table": HOST_TABLE, "name": "probe-pods-v4",
                                           "elem": ["192.0.2.10"]}}}
    node.tick()  # nothing changed: nothing sent
    assert len(world.host.documents) == sent + 2


def test_a_refused_element_change_replaces_the_table(world: World, node: Node) -> None:
    world.cni("amb-a", AMBIENT, "192.0.2.10")
    world.cni("amb-b", AMBIENT, "192.0.2.11")
    node._first_tick()
    # Someone removed an element behind our back: deleting it is refused, so the whole table goes in instead.
    world.host.tables[HOST]["sets"]["probe-pods-v4"]["elem"].remove("192.0.2.10")
    assert node.handle({"op": "del", "name": "amb-a"}) == {"ok": True}
    node.tick()
    assert world.probe_sets() == (["192.0.2.11"], [])
    assert node.host is not None and node.host.ready()


def test_drift_of_the_host_table_is_repaired_and_a_refusal_retried(world: World, node: Node) -> None:
    world.cni("amb-a", AMBIENT, "192.0.2.10")
    node._first_tick()
    assert node.host is not None
    del world.host.tables[HOST]  # `nft flush ruleset` in the node (a firewalld reload)
    node.host.events.seen = True  # what the node namespace's nftables events say
    world.host.refuse = 1
    node.tick()
    assert HOST not in world.host.tables and not node.ready()
    assert "host" in node.state.last_error
    assert node.host.controller.retry_at is not None
    node.host.controller.retry_at = 0.0  # the backoff's delay has passed
    node.tick()
    assert world.probe_sets() == (["192.0.2.10"], []) and node.ready()
    assert sum(node.host.controller.state.drift_repairs.values()) == 0  # the retry put it back, not a repair
    del world.host.tables[HOST]
    node.check_all()  # the periodic pass checks the host table too
    assert world.probe_sets() == (["192.0.2.10"], [])
    assert sum(node.host.controller.state.drift_repairs.values()) == 1


def test_host_table_counters_are_exported_under_netns_host(world: World, node: Node) -> None:
    world.cni("amb-a", AMBIENT, "192.0.2.10")
    node._first_tick()
    families = {f.name: f for f in NodeCollector(node).collect()}
    labels = {s.labels.get("netns") for f in families.values() for s in f.samples}
    assert {HOST_NAME, "amb-a"} <= labels
    rules = {s.labels.get("rule") for s in families["interceptd_rule_packets"].samples
             if s.labels.get("netns") == HOST_NAME}
    assert rules == {"probe-snat", "probe-snat-v6"}  # (entry is the chain counter, interceptd_chain_packets)


def test_without_the_flag_the_node_namespace_is_never_touched(tmp_path: Path) -> None:
    world = World(tmp_path, host_rules=False)
    world.cni("amb-a", AMBIENT, "192.0.2.10")
    node = world.node()
    try:
        node._first_tick()
        del world.kernel("amb-a").tables[("inet", "interceptd")]
        node.check_all()
        node.tick()
    finally:
        node.loop.close()
    assert node.host is None and OWN_NETNS not in world.asked and world.host.documents == []


def test_a_refused_host_table_is_the_nodes_readiness_not_its_end(world: World, node: Node) -> None:
    world.cni("amb-a", AMBIENT, "192.0.2.10")
    world.host.fail_next = KernelRefusedError("refused (fake)")
    node._first_tick()
    assert "amb-a" in node.members and node.members["amb-a"].controller.ready()
    assert not node.ready() and "host (refused (fake))" in node.state.last_error


def test_a_watched_ambient_pod_is_in_the_sets_at_the_addresses_its_interfaces_hold(tmp_path: Path) -> None:
    world = World(tmp_path, watched=True)
    amb = world.add("amb-dir")
    world.settings["amb-dir"] = AMBIENT
    world.addresses[amb] = ["192.0.2.20", "2001:db8::20"]
    side = world.add("side-dir")
    world.addresses[side] = ["192.0.2.21"]  # a sidecar pod: never in the sets, its addresses never read
    node = world.node()
    try:
        node._first_tick()
        assert world.probe_sets() == (["192.0.2.20"], ["2001:db8::20"]) and world.read == {amb}
        # The namespace appeared before its interfaces were given addresses (`ip netns add`, then the
        # bridge plugin): the periodic pass reads them again.
        later = world.add("amb-late")
        world.settings["amb-late"] = AMBIENT
        node.scan()
        assert world.probe_sets() == (["192.0.2.20"], ["2001:db8::20"])
        world.addresses[later] = ["192.0.2.22"]
        node.check_all()
        node.tick()
        assert world.probe_sets() == (["192.0.2.20", "192.0.2.22"], ["2001:db8::20"])
        # Addresses that cannot be read (the namespace going away) leave the sets as they are.
        world.unreadable.add(amb)
        node.check_all()
        node.tick()
        assert world.probe_sets() == (["192.0.2.20", "192.0.2.22"], ["2001:db8::20"])
        # A namespace that went leaves the sets.
        os.unlink(later)
        node.scan()
        node.tick()
        assert world.probe_sets() == (["192.0.2.20"], ["2001:db8::20"])
    finally:
        node.loop.close()
