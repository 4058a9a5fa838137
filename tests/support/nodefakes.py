"""A node over fakes, for the node agent's unit tests.

Namespace files are plain files in a temporary directory; `identity` calls a file a namespace (its inode is its
identity) while it has a kernel here. Each namespace gets its own FakeKernel and FakeRouter, kept across node
restarts; the node's own namespace (runtime.hostprobe.OWN_NETNS) has a kernel of its own that records every
document it is sent. No kernel events and no table claims: plain files have neither.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from interceptd.config import Config
from interceptd.ruleset.facts import HostFacts
from interceptd.runtime import nodestate
from interceptd.runtime.hostprobe import OWN_NETNS
from interceptd.runtime.kevents import EventSource
from interceptd.runtime.node import Node, Ports
from interceptd.runtime.podsettings import NO_POD, Pod
from interceptd.runtime.sdnotify import Notifier
from interceptd.system.fake import FakeKernel, FakeRouter
from interceptd.system.netns import Identity

OWN_THREAD_NETNS = "/proc/thread-self/ns/net"  # how the node finds its own namespace, never a pod
OWN_IDENTITY: Identity = (0, 0)


class RecordingKernel(FakeKernel):
    """A FakeKernel that keeps every document it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.documents: list[dict[str, Any]] = []

    def apply(self, document: dict[str, Any]) -> None:
        self.documents.append(document)
        super().apply(document)


class NoClaim:
    """Plain files are no namespaces to claim a table in."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


def no_events(path: str, table: str) -> EventSource:
    raise OSError("kernel events are not used in unit tests")


class FakeNode:
    """The namespaces of a node (files in `netns`) with their kernels, routers and addresses, and the Node over
    them. `dir_config` is a watched-directory namespace's configuration; a subclass says what it is."""

    def __init__(self, netns: Path, state: Path, config: Config, ipv6: bool = False) -> None:
        netns.mkdir(exist_ok=True)
        self.netns, self.state, self.config, self.ipv6 = netns, state, config, ipv6
        self.kernels: dict[str, FakeKernel] = {}
        self.routers: dict[str, FakeRouter] = {}
        self.host = RecordingKernel()  # the node's own namespace
        self.asked: list[str] = []  # every namespace path a kernel was asked for
        self.addresses: dict[str, list[str]] = {}  # path -> what the namespace's interfaces hold

    def add(self, name: str, kernel: FakeKernel | None = None) -> str:
        """A namespace file and its kernel; returns its path."""
        path = self.netns / name
        path.write_text("")
        self.kernels[str(path)] = kernel or FakeKernel()
        return str(path)

    def cni(self, name: str, settings: dict[str, Any], *addresses: str, pod: Pod = NO_POD) -> str:
        """A namespace that interceptd-cni's ADD registered: its state record, as the plugin writes it."""
        path = self.add(name)
        nodestate.write(str(self.state), nodestate.Record(name, path, "cni", settings, [], pod=pod,
                                                          addresses=tuple(addresses)))
        return path

    def kernel(self, name: str) -> FakeKernel:
        return self.kernels[str(self.netns / name)]

    def kernel_at(self, path: str) -> FakeKernel:
        self.asked.append(path)
        return self.host if path == OWN_NETNS else self.kernels[path]

    def router(self, path: str) -> FakeRouter:
        return self.routers.setdefault(path, FakeRouter())

    def identity(self, path: str) -> Identity | None:
        if path == OWN_THREAD_NETNS:
            return OWN_IDENTITY
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if path in self.kernels else None

    def addresses_at(self, path: str) -> Iterable[str]:
        return self.addresses.get(path, [])

    def dir_config(self, name: str) -> Config:
        raise AssertionError(f"no watched-directory namespace in these tests ({name})")

    def node(self) -> Node:
        ports = Ports(kernel=self.kernel_at, router=self.router,
                      facts=lambda _path, _cfg: HostFacts(ipv6=self.ipv6, host_ip=None), events=no_events,
                      identity=self.identity, claim=lambda _path, _table: NoClaim(), addresses=self.addresses_at)
        return Node(self.config, self.dir_config, notifier=Notifier({}), ports=ports)
