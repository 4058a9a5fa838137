"""The table claim: one agent per table and network namespace whatever its --state-dir, and a name
squatted by a process that cannot keep the table does not stop an agent from starting."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from interceptd.errors import LockedError
from interceptd.runtime import logs
from interceptd.runtime.lockfile import Lock, TableClaim, claim_address

pytestmark = pytest.mark.usefixtures("own_netns")


def test_a_second_agent_with_another_state_dir_is_refused(tmp_path: Path) -> None:
    first = Lock(str(tmp_path / "a"), "interceptd")
    first.acquire()
    second = Lock(str(tmp_path / "b"), "interceptd")
    with pytest.raises(LockedError, match=rf"^another interceptd \(pid {os.getpid()}\) already keeps table inet "
                                          r"interceptd in this network namespace$"):
        second.acquire()
    other = Lock(str(tmp_path / "b"), "other")
    other.acquire()  # another table is another claim
    other.release()
    first.release()
    second.acquire()  # the claim went with the first one's socket
    second.release()


def test_the_claim_goes_with_the_process(tmp_path: Path) -> None:
    """SIGKILL releases it: the kernel drops the name with the last descriptor."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            held = TableClaim("interceptd")
            held.acquire()
            os.write(ready_w, b"1")
            signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(LockedError, match=rf"\(pid {pid}\)"):
            TableClaim("interceptd").acquire()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    claim = TableClaim("interceptd")
    assert claim.acquire() is True
    claim.release()


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure("info", "json", out)
    yield out
    logs.configure("info", "json")


@pytest.fixture(params=["listening", "bound only"])
def squatter(request: pytest.FixtureRequest) -> Iterator[int]:
    """An unprivileged process (uid 65534, no capabilities) holding the table's claim name."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(claim_address("interceptd"))
            if request.param == "listening":
                sock.listen()
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
        assert event["reason"] == "it does not listen, as interceptd does"
