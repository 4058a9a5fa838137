"""The agent's steps on the FakeKernel: start, drift repair, retries with backoff, SIGHUP reloads."""

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
from interceptd.errors import ConfigError
from interceptd.ruleset import names as N
from interceptd.ruleset.facts import HostFacts
from interceptd.runtime import logs
from interceptd.runtime.agent import Agent, Backoff
from interceptd.runtime.sdnotify import Notifier
from interceptd.system.fake import FakeKernel

BASE = {"service_cidr": "*", "inbound_ports": "*"}


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.kernel = FakeKernel()
        self.next_config: Config | Exception = config.load(BASE, {})
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(tmp_path / "notify"))
        self.sock.setblocking(False)
        self.log = io.StringIO()
        logs.configure("debug", "json", self.log)
        self.agent = Agent(config.load(BASE, {}), self.load, kernel=self.kernel,
                           facts=lambda _c: HostFacts(ipv6=False, host_ip=None),
                           notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}))

    def load(self) -> Config:
        if isinstance(self.next_config, Exception):
            raise self.next_config
        return self.next_config

    def notes(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode().split("\n")[0])
            except BlockingIOError:
                return out

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    @property
    def table(self) -> dict[str, Any]:
        return self.kernel.tables[("inet", "interceptd")]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.sock.close()


def test_start_applies_and_notifies_ready(h: Harness) -> None:
    assert h.agent.apply_desired("start")
    s = h.agent.state
    assert (s.generation, s.ready, s.applies[("start", "success")], s.apply_durations.count) == (1, True, 1, 1)
    assert h.notes() == ["READY=1"]
    (event,) = h.events()
    assert event["event"] == "start" and event["generation"] == 1 and event["drift"] == [] and event["error"] is None
    assert event["table"] == "interceptd" and event["duration_ms"] >= 0


def test_drift_is_repaired_counted_and_logged(h: Harness) -> None:
    h.agent.apply_desired("start")
    assert h.agent.check("timer") == []
    victim = next(r for r in h.table["rules"] if r["comment"] != N.ENTRY)
    h.table["rules"].remove(victim)
    assert not h.agent.kernel_matches()
    drift = h.agent.check("event")
    assert [d.reason for d in drift] == ["rule removed"]
    s = h.agent.state
    assert s.drift_repairs == {"rule removed": 1}
    assert s.applies[("repair", "success")] == 1 and s.generation == 1 and s.ready
    assert s.reconcile_checks == {("timer", "match"): 1, ("event", "drift"): 1}
    assert h.agent.kernel_matches() and h.agent.check("timer") == []
    repair = next(e for e in h.events() if e["event"] == "repair")
    assert repair["drift"] == [f"rule {victim['chain']}/{victim['comment']} removed"]
    assert repair["seen_by"] == "event" and repair["level"] == "warning"


def test_a_tug_of_war_slows_repairs_down(h: Harness) -> None:
    from interceptd.runtime.agent import REPAIR_BURST

    h.agent.apply_desired("start")
    for _ in range(REPAIR_BURST):
        del h.kernel.tables[("inet", "interceptd")]
        h.agent.check("event")
    assert h.agent.state.applies[("repair", "success")] == REPAIR_BURST and h.agent.retry_at is None
    del h.kernel.tables[("inet", "interceptd")]
    assert h.agent.check("event")  # the burst is full: this repair waits
    assert h.agent.state.applies[("repair", "success")] == REPAIR_BURST and h.agent.retry_at is not None
    deferred = [e for e in h.events() if e["event"] == "repair-deferred"]
    assert len(deferred) == 1 and "keeps rewriting" in deferred[0]["error"]
    assert h.agent.apply_desired("retry")  # the loop's retry repairs it after the delay
    h.agent._repairs.clear()  # calm again: the next repair is immediate
    del h.kernel.tables[("inet", "interceptd")]
    h.agent.check("event")
    assert h.agent.state.applies[("repair", "success")] == REPAIR_BURST + 1 and h.agent.retry_at is None


def test_refused_apply_retries_with_backoff_and_reports_not_ready(h: Harness) -> None:
    h.kernel.refuse = 2
    assert not h.agent.apply_desired("start")
    first = h.agent.backoff.first
    assert h.agent.backoff.delay == 2 * first
    assert not h.agent.apply_desired("retry")
    assert h.agent.backoff.delay == 4 * first
    s = h.agent.state
    assert not s.ready and "refused" in s.last_error and h.agent.retry_at is not None
    assert not h.agent.kernel_matches()
    assert "NOT READY" in h.agent.status_line()
    assert h.notes() == ["STATUS=table inet interceptd generation 0: NOT READY: libnftables refused the "
                         "transaction (fake); 0 repairs, 0 reloads"] * 2
    assert h.agent.apply_desired("retry")
    assert s.ready and s.generation == 1 and h.agent.retry_at is None and h.agent.backoff.delay == first
    assert s.applies == {("start", "error"): 1, ("retry", "error"): 1, ("retry", "success"): 1}
    assert h.notes() == ["READY=1"]


def test_backoff_is_capped() -> None:
    b = Backoff(first=1, cap=5)
    assert [b.next() for _ in range(5)] == [1, 2, 4, 5, 5]
    b.reset()
    assert b.next() == 1


def test_reload_swaps_in_a_new_ruleset(h: Harness) -> None:
    h.agent.apply_desired("start")
    h.notes()
    h.next_config = config.load({**BASE, "outbound_ports": "9999"}, {})
    assert h.agent.reload()
    s = h.agent.state
    assert s.generation == 2 and s.reloads == {"success": 1} and s.last_reload_successful
    assert any("9999" in json.dumps(x) for x in h.table["sets"].values())
    assert h.notes() == ["RELOADING=1", "READY=1"]
    assert h.agent.reload()  # same configuration again: nothing to apply, same generation
    assert s.generation == 2 and h.kernel.applies == 2


@pytest.mark.parametrize("problem", ["config", "kernel", "table"])
def test_bad_reload_keeps_the_running_ruleset(h: Harness, problem: str) -> None:
    h.agent.apply_desired("start")
    before = h.kernel.list_table("interceptd")
    h.notes()
    if problem == "config":
        h.next_config = ConfigError("--config 'x.toml': TOML syntax error: bad")
    elif problem == "kernel":
        h.next_config = config.load({**BASE, "outbound_ports": "9999"}, {})
        h.kernel.refuse = 1
    else:
        h.next_config = config.load({**BASE, "table": "other"}, {})
    assert not h.agent.reload()
    s = h.agent.state
    assert h.kernel.list_table("interceptd") == before and s.generation == 1
    assert s.reloads == {"error": 1} and not s.last_reload_successful and s.ready
    assert h.notes() == ["RELOADING=1", "READY=1"]  # systemd must leave the reloading state either way
    event = h.events()[-1]
    assert event["event"] == "reload" and event["level"] == "error" and event["error"]
    if problem == "table":
        assert "--table (key 'table') cannot change on reload" in event["error"]
    assert h.agent.check("timer") == []
