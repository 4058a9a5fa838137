"""Fixtures of the runtime layer's unit tests."""

from __future__ import annotations

import ctypes
import io
import os
from collections.abc import Iterator

import pytest
from support.nodefakes import FakeNode

from interceptd.runtime import logs
from interceptd.runtime.node import Node

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.fixture
def own_netns() -> Iterator[None]:
    """The test thread in a fresh network namespace of its own, back home afterwards.

    A lock's table claim is a name in the network namespace: taken in a namespace of the test's own, it
    never meets the claims of a parallel test run or of an agent on this host. Without root there is no
    namespace to make; the claims are then taken where the test runs.
    """
    if os.geteuid() != 0:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWNET))
        try:
            yield
        finally:
            _check(_libc.setns(home, CLONE_NEWNET))
    finally:
        os.close(home)


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """The structured log as JSON lines in a buffer, for the test to read."""
    out = io.StringIO()
    logs.configure("info", "json", out)
    yield out
    logs.configure("info", "json")


@pytest.fixture
def node(world: FakeNode) -> Iterator[Node]:
    """The node over the module's `world` fixture (a support.nodefakes.FakeNode), its loop closed afterwards."""
    n = world.node()
    yield n
    n.loop.close()
