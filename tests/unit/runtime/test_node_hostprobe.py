"""The node agent's host probe table over fakes: written only with --ambient-host-rules, only its own table in the
node's namespace, its sets following the ambient pods by element changes, repaired and retried like a pod's.

CNI records of ambient and sidecar pods are written as interceptd-cni writes them; namespace files are plain
files whose inode is their identity; the node's own namespace (runtime.hostprobe.OWN_NETNS) has a kernel of its
own, which records every document it is sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from interceptd.config import options as config
from interceptd.errors import KernelRefusedError
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.names import HOST_TABLE
from interceptd.runtime import nodestate
from interceptd.runtime.hostprobe import HOST_NAME, OWN_NETNS
from interceptd.runtime.node import Node, NodeCollector, Ports
from interceptd.runtime.sdnotify import Notifier
from interceptd.system.fake import FakeKernel, FakeRouter
from interceptd.system.netns import Identity

HOST = ("inet", HOST_TABLE)
AMBIENT = {"capture_mode": "ambient"}
SIDECAR = {"service_cidr": "*", "inbound_ports": "*"}


class RecordingKernel(FakeKernel):
    def __init__(self) -> None:
        super().__init__()
        self.documents: list[dict[str, Any]] = []

    def apply(self, document: dict[str, Any]) -> None:
        self.documents.append(document)
        super().apply(document)


class NoClaim:
    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


class World:
    """A node of CNI pods (files under tmp) with a kernel per namespace and one for the node itself."""

    def __init__(self, tmp: Path, host_rules: bool = True) -> None:
        self.tmp = tmp
        self.state = str(tmp / "state")
        self.host = RecordingKernel()
        self.kernels: dict[str, FakeKernel] = {}
        self.asked: list[str] = []
        self.config = config.load({"netns_dir": "", "state_dir": self.state,
                                   "ambient_host_rules": "true" if host_rules else "false"}, {})

    def pod(self, name: str, settings: dict[str, Any], *addresses: str) -> str:
        path = self.tmp / name
        path.write_text("")
        self.kernels[str(path)] = FakeKernel()
        nodestate.write(self.state, nodestate.Record(name, str(path), "cni", settings, addresses=list(addresses)))
        return str(path)

    def kernel(self, path: str) -> FakeKernel:
        self.asked.append(path)
        return self.host if path == OWN_NETNS else self.kernels[path]

    def identity(self, path: str) -> Identity | None:
        if path == "/proc/thread-self/ns/net":
            return (0, 0)
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if path in self.kernels else None

    def no_events(self, path: str, table: str) -> object:
        raise OSError("kernel events are not used in unit tests")

    def node(self) -> Node:
        ports = Ports(kernel=self.kernel, router=lambda _path: FakeRouter(),
                      facts=lambda _path, _cfg: HostFacts(ipv6=True, host_ip=None), events=self.no_events,
                      identity=self.identity, claim=lambda _path, _table: NoClaim())
        return Node(self.config, lambda name: config.load({}, {}), notifier=Notifier({}), ports=ports)

    def probe_sets(self) -> tuple[list[Any], list[Any]]:
        sets = self.host.tables[HOST]["sets"]
        return sets["probe-pods-v4"]["elem"], sets["probe-pods-v6"]["elem"]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
def node(world: World) -> Iterator[Node]:
    n = world.node()
    yield n
    n.loop.close()


def test_the_host_table_holds_the_ambient_pods_addresses_only(world: World, node: Node) -> None:
    world.pod("amb-a", AMBIENT, "192.0.2.10", "2001:db8::10")
    world.pod("amb-b", {**AMBIENT, "ambient_ingress": True}, "192.0.2.11")
    world.pod("side", SIDECAR, "192.0.2.12")
    node._first_tick()
    assert list(world.host.tables) == [HOST]  # the node's namespace gets its own table, nothing else
    assert world.probe_sets() == (["192.0.2.10", "192.0.2.11"], ["2001:db8::10"])
    assert node.ready() and node.host is not None and node.host.ready()


def test_pods_coming_and_going_are_element_changes_in_one_transaction(world: World, node: Node) -> None:
    world.pod("amb-a", AMBIENT, "192.0.2.10")
    node._first_tick()
    sent = len(world.host.documents)
    world.pod("amb-b", AMBIENT, "192.0.2.11", "2001:db8::11")
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
    world.pod("amb-a", AMBIENT, "192.0.2.10")
    world.pod("amb-b", AMBIENT, "192.0.2.11")
    node._first_tick()
    # Someone removed an element behind our back: deleting it is refused, so the whole table goes in instead.
    world.host.tables[HOST]["sets"]["probe-pods-v4"]["elem"].remove("192.0.2.10")
    assert node.handle({"op": "del", "name": "amb-a"}) == {"ok": True}
    node.tick()
    assert world.probe_sets() == (["192.0.2.11"], [])
    assert node.host is not None and node.host.ready()


def test_drift_of_the_host_table_is_repaired_and_a_refusal_retried(world: World, node: Node) -> None:
    world.pod("amb-a", AMBIENT, "192.0.2.10")
    node._first_tick()
    assert node.host is not None
    del world.host.tables[HOST]  # `nft flush ruleset` in the node (a firewalld reload)
    node.host.event_seen = True  # what the node namespace's nftables events say
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
    world.pod("amb-a", AMBIENT, "192.0.2.10")
    node._first_tick()
    families = {f.name: f for f in NodeCollector(node).collect()}
    labels = {s.labels.get("netns") for f in families.values() for s in f.samples}
    assert {HOST_NAME, "amb-a"} <= labels
    rules = {s.labels.get("rule") for s in families["interceptd_rule_packets"].samples
             if s.labels.get("netns") == HOST_NAME}
    assert rules == {"probe-snat", "probe-snat-v6"}  # (entry is the chain counter, interceptd_chain_packets)


def test_without_the_flag_the_node_namespace_is_never_touched(tmp_path: Path) -> None:
    world = World(tmp_path, host_rules=False)
    world.pod("amb-a", AMBIENT, "192.0.2.10")
    node = world.node()
    try:
        node._first_tick()
        del world.kernels[world.tmp.joinpath("amb-a").as_posix()].tables[("inet", "interceptd")]
        node.check_all()
        node.tick()
    finally:
        node.loop.close()
    assert node.host is None and OWN_NETNS not in world.asked and world.host.documents == []


def test_a_refused_host_table_is_the_nodes_readiness_not_its_end(world: World, node: Node) -> None:
    world.pod("amb-a", AMBIENT, "192.0.2.10")
    world.host.fail_next = KernelRefusedError("refused (fake)")
    node._first_tick()
    assert "amb-a" in node.members and node.members["amb-a"].controller.ready()
    assert not node.ready() and "host (refused (fake))" in node.state.last_error
