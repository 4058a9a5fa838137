"""The table claim: one agent per table and network namespace whatever its --state-dir, and a name
squatted by a process that cannot keep the table does not stop an agent from starting."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from interceptd.errors import LockedError
from interceptd.runtime.lockfile import GONE, Lock, TableClaim, claim_address

pytestmark = pytest.mark.usefixtures("own_netns")


@contextmanager
def child_holding(take: Callable[[], object]) -> Iterator[int]:
    """A forked process that runs `take` (and keeps what it returns) until the block ends; yields its pid."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _held = take()  # a live local: what it holds (a socket) stays open until the kill
            os.write(ready_w, b"1")
            signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)


def _claimed() -> TableClaim:
    claim = TableClaim("interceptd")
    claim.acquire()
    return claim


def test_the_claim_goes_with_the_process() -> None:
    """SIGKILL releases it: the kernel drops the name with the last descriptor."""
    with child_holding(_claimed) as pid, pytest.raises(LockedError, match=rf"\(pid {pid}\)"):
        TableClaim("interceptd").acquire()
    claim = TableClaim("interceptd")
    assert claim.acquire() is True
    claim.release()


def _squat(listening: bool) -> socket.socket:
    """As uid 65534 without capabilities: bind the table's claim name (and listen, as interceptd does)."""
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(claim_address("interceptd"))
    if listening:
        sock.listen()
    return sock


@pytest.fixture(params=["listening", "bound only"])
def squatter(request: pytest.FixtureRequest) -> Iterator[int]:
    """An unprivileged process holding the table's claim name."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    with child_holding(lambda: _squat(request.param == "listening")) as pid:
        yield pid


def test_a_squatter_without_cap_net_admin_does_not_stop_the_agent(squatter: int, log: io.StringIO,
                                                                   tmp_path: Path) -> None:
    lock = Lock(str(tmp_path / "run"), "interceptd")
    lock.acquire()  # no LockedError: the agent starts, with the file lock
    lock.release()
    (line,) = log.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "table-claim-skipped" and event["level"] == "warning"
    if event["holder_pid"] is not None:
        assert (event["holder_pid"], event["holder_uid"]) == (squatter, 65534)
        assert event["reason"] == "it lacks CAP_NET_ADMIN"
    else:
        assert event["reason"] == GONE  # asked twice: it was no holder that had just exited
