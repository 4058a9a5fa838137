"""The per-table controller's steps on the fake kernel and router: start, drift repair, retries with backoff,
reloads, adoption, and every kernel-side failure kind turned into "not ready, retry" for that table only."""

from __future__ import annotations

import json
from typing import Any

import pytest

from interceptd.config import Config
from interceptd.config import options as config
from interceptd.control.controller import REPAIR_BURST, Backoff, TableController
from interceptd.errors import ConfigError, NamespaceError, ResourceError
from interceptd.ruleset.facts import HostFacts
from interceptd.runtime.nodestate import ruleset_digest
from interceptd.system.fake import FakeKernel, FakeRouter

BASE = {"service_cidr": "*", "inbound_ports": "*"}
TPROXY = {**BASE, "inbound_interception_mode": "TPROXY"}


class Events:
    """An EventLog that keeps what was logged (the controller's log is injected)."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    def _log(self, level: str, event: str, **kw: Any) -> None:
        self.logged.append({"level": level, "event": event, **kw})

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, **kw)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logged if e["event"] == name]


class Harness:
    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.kernel = FakeKernel()
        self.router = FakeRouter()
        self.log = Events()
        self.next_config: Config | Exception = config.load(settings or BASE, {})
        self.drift_seen = 0
        self.c = TableController(config.load(settings or BASE, {}), kernel=self.kernel, router=self.router,
                                 facts=lambda _c: HostFacts(ipv6=False, host_ip=None), load=self.load,
                                 log=self.log, on_drift=self._on_drift)

    def _on_drift(self) -> None:
        self.drift_seen += 1

    def load(self) -> Config:
        if isinstance(self.next_config, Exception):
            raise self.next_config
        return self.next_config

    @property
    def table(self) -> dict[str, Any]:
        return self.kernel.tables[("inet", "interceptd")]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_start_applies_and_logs_one_event(h: Harness) -> None:
    assert h.c.apply_desired("start")
    s = h.c.state
    assert (s.generation, s.ready, s.applies[("start", "success")], s.apply_durations.count) == (1, True, 1, 1)
    (event,) = h.log.logged
    assert event["event"] == "start" and event["generation"] == 1 and event["drift"] == [] and event["error"] is None
    assert event["level"] == "info" and event["duration_ms"] >= 0
    assert h.c.ready() and h.c.kernel_matches()


def test_drift_is_repaired_counted_and_logged(h: Harness) -> None:
    h.c.apply_desired("start")
    assert h.c.check("timer") == []
    victim = next(r for r in h.table["rules"] if r["comment"] != "entry")
    h.table["rules"].remove(victim)
    assert not h.c.kernel_matches() and h.drift_seen == 1  # /readyz asks the driver to check now
    drift = h.c.check("event")
    assert [d.reason for d in drift] == ["rule removed"]
    s = h.c.state
    assert s.drift_repairs == {"rule removed": 1}
    assert s.applies[("repair", "success")] == 1 and s.generation == 1 and s.ready
    assert s.reconcile_checks == {("timer", "match"): 1, ("event", "drift"): 1}
    assert h.c.kernel_matches() and h.c.check("timer") == []
    (repair,) = h.log.named("repair")
    assert repair["drift"] == [f"rule {victim['chain']}/{victim['comment']} removed"]
    assert repair["seen_by"] == "event" and repair["level"] == "warning"


def test_a_tug_of_war_slows_repairs_down(h: Harness) -> None:
    h.c.apply_desired("start")
    for _ in range(REPAIR_BURST):
        del h.kernel.tables[("inet", "interceptd")]
        h.c.check("event")
    assert h.c.state.applies[("repair", "success")] == REPAIR_BURST and h.c.retry_at is None
    del h.kernel.tables[("inet", "interceptd")]
    assert h.c.check("event")  # the burst is full: this repair waits
    assert h.c.state.applies[("repair", "success")] == REPAIR_BURST and h.c.retry_at is not None
    deferred = h.log.named("repair-deferred")
    assert len(deferred) == 1 and "keeps rewriting" in deferred[0]["error"]
    assert h.c.apply_desired("retry")  # the driver's retry repairs it after the delay
    h.c._repairs.clear()  # calm again: the next repair is immediate
    del h.kernel.tables[("inet", "interceptd")]
    h.c.check("event")
    assert h.c.state.applies[("repair", "success")] == REPAIR_BURST + 1 and h.c.retry_at is None


def test_refused_apply_retries_with_backoff_and_reports_not_ready(h: Harness) -> None:
    h.kernel.refuse = 2
    assert not h.c.apply_desired("start")
    first = h.c.backoff.first
    assert h.c.backoff.delay == 2 * first
    assert not h.c.apply_desired("retry")
    assert h.c.backoff.delay == 4 * first
    s = h.c.state
    assert not s.ready and "refused" in s.last_error and h.c.retry_at is not None
    assert not h.c.kernel_matches() and not h.c.ready()
    assert "NOT READY" in h.c.status_line()
    errors = h.log.named("start") + h.log.named("retry")
    assert [e["level"] for e in errors] == ["error", "error"] and all(e["retry_in_s"] > 0 for e in errors)
    assert h.c.apply_desired("retry")
    assert s.ready and s.generation == 1 and h.c.retry_at is None and h.c.backoff.delay == first
    assert s.applies == {("start", "error"): 1, ("retry", "error"): 1, ("retry", "success"): 1}


def test_refused_routes_are_a_retry_not_a_crash() -> None:
    h = Harness(TPROXY)
    h.router.refuse = 1
    assert not h.c.apply_desired("start")
    assert not h.c.ready() and "Operation not permitted" in h.c.state.last_error
    assert h.c.apply_desired("retry") and h.c.ready()


@pytest.mark.parametrize("error", [NamespaceError("network namespace '/run/netns/x': cannot open: gone"),
                                   ResourceError("libnftables: no descriptor below 1008 is free")])
def test_every_kernel_side_failure_is_not_ready_and_retried(h: Harness, error: Exception) -> None:
    h.c.apply_desired("start")
    h.kernel.fail_next = error  # the next kernel call raises it (listing or transaction)
    assert h.c.check("timer") == []
    assert not h.c.ready() and h.c.retry_at is not None and str(error) in h.c.state.last_error
    assert h.c.state.reconcile_checks[("timer", "error")] == 1
    assert h.c.apply_desired("retry") and h.c.ready()


def test_backoff_is_capped() -> None:
    b = Backoff(first=1, cap=5)
    assert [b.next() for _ in range(5)] == [1, 2, 4, 5, 5]
    b.reset()
    assert b.next() == 1


def test_reload_swaps_in_a_new_ruleset(h: Harness) -> None:
    h.c.apply_desired("start")
    h.next_config = config.load({**BASE, "outbound_ports": "9999"}, {})
    assert h.c.reload() is h.next_config
    s = h.c.state
    assert s.generation == 2 and s.reloads == {"success": 1} and s.last_reload_successful
    assert any("9999" in json.dumps(x) for x in h.table["sets"].values())
    assert h.c.reload() is not None  # same configuration again: nothing to apply, same generation
    assert s.generation == 2 and h.kernel.applies == 2


@pytest.mark.parametrize("problem", ["config", "kernel", "table"])
def test_bad_reload_keeps_the_running_ruleset(h: Harness, problem: str) -> None:
    h.c.apply_desired("start")
    before = h.kernel.list_table("interceptd")
    if problem == "config":
        h.next_config = ConfigError("--config 'x.toml': TOML syntax error: bad")
    elif problem == "kernel":
        h.next_config = config.load({**BASE, "outbound_ports": "9999"}, {})
        h.kernel.refuse = 1
    else:
        h.next_config = config.load({**BASE, "table": "other"}, {})
    assert h.c.reload() is None
    s = h.c.state
    assert h.kernel.list_table("interceptd") == before and s.generation == 1
    assert s.reloads == {"error": 1} and not s.last_reload_successful and s.ready
    event = h.log.logged[-1]
    assert event["event"] == "reload" and event["level"] == "error" and event["error"]
    if problem == "table":
        assert "--table (key 'table') cannot change on reload" in event["error"]
    assert h.c.check("timer") == []


def test_adopt_takes_an_unchanged_table_untouched_and_refuses_a_changed_one(h: Harness) -> None:
    h.c.apply_desired("start")
    assert h.c.applied is not None
    listing, digest = h.c.applied.listing, ruleset_digest(h.c.ruleset)
    applies = h.kernel.applies
    again = Harness()
    again.kernel = h.kernel
    again.c.kernel = h.kernel
    assert again.c.adopt(listing, digest, ruleset_digest) and again.c.ready()
    assert h.kernel.applies == applies  # nothing was written
    h.table["rules"].pop()
    third = Harness()
    third.c.kernel = h.kernel
    assert not third.c.adopt(listing, digest, ruleset_digest)
    assert not third.c.adopt(listing, "another digest", ruleset_digest)
