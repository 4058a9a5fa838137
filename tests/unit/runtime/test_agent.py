"""The agent's part on top of its table controller: when steps run (the loop's tick), and what systemd hears."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from interceptd.config import Config
from interceptd.config import options as config
from interceptd.ruleset.facts import HostFacts
from interceptd.runtime import logs
from interceptd.runtime.agent import Agent
from interceptd.runtime.sdnotify import Notifier
from interceptd.system.fake import FakeKernel, FakeRouter

BASE = {"service_cidr": "*", "inbound_ports": "*"}


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.kernel = FakeKernel()
        self.next_config: Config = config.load(BASE, {})
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(tmp_path / "notify"))
        self.sock.setblocking(False)
        self.log = io.StringIO()
        logs.configure("debug", "json", self.log)
        self.agent = Agent(config.load(BASE, {}), lambda: self.next_config, kernel=self.kernel, router=FakeRouter(),
                           facts=lambda _c: HostFacts(ipv6=False, host_ip=None),
                           notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}))

    def notes(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode().split("\n")[0])
            except BlockingIOError:
                return out

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.agent.close()
    harness.sock.close()


def test_the_first_tick_applies_and_notifies_ready_once(h: Harness) -> None:
    deadline = h.agent.tick()
    assert h.notes() == ["READY=1"]
    (event,) = h.events()
    assert event["event"] == "start" and event["table"] == "interceptd" and event["generation"] == 1
    assert deadline > 0 and h.agent.controller.ready()
    h.agent.tick()  # not due: nothing happens
    assert h.notes() == [] and len(h.events()) == 1


def test_a_refused_start_reports_status_until_a_retry_succeeds(h: Harness) -> None:
    h.kernel.refuse = 1
    retry_at = h.agent.tick()
    assert retry_at == h.agent.controller.retry_at
    assert h.notes() == ["STATUS=table inet interceptd generation 0: NOT READY: libnftables refused the "
                         "transaction (fake); 0 repairs, 0 reloads"]
    h.agent.controller.retry_at = 0.0  # due now
    h.agent.tick()
    assert h.notes() == ["READY=1"] and h.agent.controller.ready()


def test_drift_seen_by_readyz_is_checked_at_the_next_tick(h: Harness) -> None:
    h.agent.tick()
    del h.kernel.tables[("inet", "interceptd")]
    assert not h.agent.controller.kernel_matches()  # what /readyz calls, from another thread
    h.agent.tick()
    assert h.agent.controller.state.drift_repairs == {"table missing": 1}
    assert h.agent.controller.kernel_matches()


def test_reload_tells_systemd_reloading_then_ready_either_way(h: Harness) -> None:
    h.agent.tick()
    h.notes()
    h.next_config = config.load({**BASE, "outbound_ports": "9999"}, {})
    assert h.agent.reload()
    assert h.notes() == ["RELOADING=1", "READY=1"]
    h.next_config = config.load({**BASE, "table": "other"}, {})
    assert not h.agent.reload()
    assert h.notes() == ["RELOADING=1", "READY=1"]  # systemd must leave the reloading state either way
