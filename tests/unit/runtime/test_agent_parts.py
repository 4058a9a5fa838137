"""The agent's small parts: netlink event filter, sd_notify datagrams, the lock file, logs."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
from pathlib import Path

import pytest

from interceptd.errors import LockedError
from interceptd.runtime import logs
from interceptd.runtime.lockfile import Lock, lock_path
from interceptd.runtime.sdnotify import Notifier
from interceptd.system import events


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(msg: int, family: int, *attrs: bytes, subsys: int = events.NFNL_SUBSYS_NFTABLES) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (subsys << 8) | msg, 0, 1, 0) + body


def test_event_filter_picks_our_table_among_others() -> None:
    inet = events.FAMILIES["inet"]
    ours = message(6, inet, attr(1, b"interceptd\0"), attr(2, b"istio-output\0"))  # NEWRULE
    other = message(3, inet, attr(1, b"firewalld\0"))
    same_name_ip = message(0, events.FAMILIES["ip"], attr(1, b"interceptd\0"))
    prefix = message(0, inet, attr(1, b"interceptd2\0"))
    newgen = message(events.NFT_MSG_NEWGEN, 0, attr(1, struct.pack("=I", 7)))
    assert events.concerns(other + ours + newgen, b"interceptd", inet)
    assert not events.concerns(other + same_name_ip + prefix + newgen, b"interceptd", inet)
    assert not events.concerns(message(0, inet, attr(1, b"interceptd\0"), subsys=1), b"interceptd", inet)


def test_event_filter_survives_truncation() -> None:
    inet = events.FAMILIES["inet"]
    data = message(0, inet, attr(1, b"interceptd\0"))
    assert not events.concerns(data[:20], b"interceptd", inet)
    assert events.concerns(struct.pack("=IHHII", 4, 0, 0, 0, 0), b"interceptd", inet)  # malformed: check


def rt_message(msg_type: int, header: bytes, *attrs: bytes) -> bytes:
    body = header + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, 1, 0) + body


def test_route_event_filter_only_wakes_for_what_interceptd_owns() -> None:
    rule_hdr = struct.pack("=BBBBBBBBI", 2, 0, 0, 0, 133, 0, 0, 1, 0)
    ours = rt_message(events.RTM_DELRULE, rule_hdr, attr(events.FRA_PROTOCOL, bytes([245])))
    foreign = rt_message(events.RTM_DELRULE, rule_hdr, attr(events.FRA_PROTOCOL, bytes([4])))
    route = struct.pack("=BBBBBBBBI", 2, 0, 0, 0, 133, 245, 254, 2, 0)
    kernel_route = struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 2, 253, 1, 0)
    assert events.concerns_routes(foreign + ours)
    assert not events.concerns_routes(foreign + rt_message(events.RTM_NEWROUTE, kernel_route))
    assert events.concerns_routes(rt_message(events.RTM_DELROUTE, route))
    assert events.concerns_routes(rt_message(events.RTM_DELADDR, b"\0" * 8))


def receiver(tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(1)
    return sock, path


def test_notifier_sends_each_state(tmp_path: Path) -> None:
    sock, path = receiver(tmp_path)
    with sock:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        assert n.watchdog_s == 4.0
        n.ready("table inet interceptd generation 1: ready")
        n.reloading()
        n.stopping()
        n.watchdog()
        got = [sock.recv(4096).decode() for _ in range(4)]
    assert got[0] == "READY=1\nSTATUS=table inet interceptd generation 1: ready"
    assert got[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert got[2:] == ["STOPPING=1", "WATCHDOG=1"]


def test_notifier_abstract_address_and_absence() -> None:
    assert Notifier({"NOTIFY_SOCKET": "@sd/notify"}).address == "\0sd/notify"
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready("x")
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/socket"}).ready("x") is False
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_s is None


@pytest.mark.usefixtures("own_netns")
@pytest.mark.parametrize("second_dir", ["run", "elsewhere"])  # the table claim refuses whatever the --state-dir
def test_second_lock_refused_then_free_after_release(tmp_path: Path, second_dir: str) -> None:
    first = Lock(str(tmp_path / "run"), "interceptd")
    first.acquire()
    second = Lock(str(tmp_path / second_dir), "interceptd")
    with pytest.raises(LockedError, match=rf"another interceptd \(pid {os.getpid()}\) already keeps table inet "
                                          r"interceptd"):
        second.acquire()
    other = Lock(str(tmp_path / "run"), "other")
    other.acquire()  # another table is another lock
    other.release()
    first.release()
    second.acquire()
    assert (os.stat(second.path).st_mode & 0o777) == 0o600
    second.release()


@pytest.mark.usefixtures("own_netns")
def test_lock_refuses_symlink_and_fifo(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious")
    os.symlink(target, lock_path(str(tmp_path), "interceptd"))
    with pytest.raises(LockedError, match="cannot open lock file"):
        Lock(str(tmp_path), "interceptd").acquire()
    assert target.read_text() == "precious"
    os.mkfifo(lock_path(str(tmp_path), "t2"))
    with pytest.raises(LockedError, match="is not a regular file"):
        Lock(str(tmp_path), "t2").acquire()


def test_logs_json_lines_filtered_by_level() -> None:
    out = io.StringIO()
    logs.configure("info", "auto", out)  # a StringIO is not a terminal: JSON lines
    log = logs.get(table="t")
    log.debug("hidden")
    log.info("apply", generation=2, duration_ms=1.5, drift=[], error=None)
    (line,) = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "apply" and event["table"] == "t" and event["generation"] == 2
    assert event["level"] == "info" and "timestamp" in event
    console = io.StringIO()
    logs.configure("debug", "console", console)
    logs.get(table="t").debug("check", trigger="timer")
    assert "check" in console.getvalue() and "trigger=timer" in console.getvalue()
    assert not console.getvalue().startswith("{")
