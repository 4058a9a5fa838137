"""The agent looks around every DOCTOR_EVERY quiet timer checks: conflicts become a metric and /readyz detail,
each new one is logged once; its start and reload events say what it runs and what changed."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest

from interceptd.config import Config, load
from interceptd.ruleset.doctor import Finding
from interceptd.ruleset.facts import HostFacts
from interceptd.runtime import logs
from interceptd.runtime.agent import DOCTOR_EVERY, Agent
from interceptd.runtime.httpd import Request, Response
from interceptd.runtime.metrics import MetricsServer, registry
from interceptd.runtime.sdnotify import Notifier
from interceptd.system.fake import FakeKernel, FakeRouter
from interceptd.system.kernel import Kernel

BASE = {"service_cidr": "*", "inbound_ports": "*"}
LEFTOVER = Finding("iptables", False, "iptables rules", "flush them", ("iptables-nft: 1 rule, e.g. `-A OUTPUT`",))


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.findings: list[Finding] = []
        self.looks = 0
        self.next_config: Config = load({**BASE, "inbound_ports": "80", "metrics_address": "127.0.0.1:15020"}, {})
        self.log = io.StringIO()
        logs.configure("debug", "json", self.log)
        self.agent = Agent(load({**BASE, "metrics_address": "127.0.0.1:15020"}, {}), lambda: self.next_config,
                           kernel=FakeKernel(), router=FakeRouter(), facts=lambda _c: HostFacts(False, None),
                           notifier=Notifier({}), config_path="/etc/interceptd/interceptd.toml",
                           look_around=self.look)

    def look(self, config: Config, kernel: Kernel) -> list[Finding]:
        self.looks += 1
        return list(self.findings)

    def timer(self) -> None:
        self.agent._next_check = 0.0  # due now
        self.agent.tick()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, self.log.getvalue().splitlines()) if e["event"] == name]


def readyz(h: Harness) -> Response:
    """The /readyz answer, without a listening socket."""
    server = MetricsServer.__new__(MetricsServer)
    server.state = h.agent.controller.state
    return server.answer(Request("GET", "/readyz", {}))


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.agent.close()


def test_conflicts_are_looked_for_periodically_exported_and_logged_once(h: Harness) -> None:
    h.agent.tick()
    (start,) = h.events("start")
    assert (start["mode"], start["config"], start["metrics_address"]) == (
        "REDIRECT", "/etc/interceptd/interceptd.toml", "127.0.0.1:15020")
    assert h.looks == 0  # not on the start's path
    h.findings = [LEFTOVER, Finding("table", False, "differs")]  # drift is the repairs' business
    h.timer()
    assert h.looks == 1 and h.agent.controller.state.conflicts == {"iptables": list(LEFTOVER.culprits)}
    for _ in range(DOCTOR_EVERY):
        h.timer()
    assert h.looks == 2 and len(h.events("conflict")) == 1  # the same conflict again: not logged again
    body = readyz(h).body.decode()
    assert body.startswith("ready\n") and "conflict (iptables): iptables-nft: 1 rule" in body
    text = generate_latest(registry(h.agent.controller.kernel, h.agent.controller.state)).decode()
    assert 'interceptd_conflicts{kind="iptables"} 1.0' in text and 'interceptd_conflicts{kind="listeners"} 0.0' in text
    h.findings = []
    for _ in range(DOCTOR_EVERY):
        h.timer()
    assert h.looks == 3 and h.agent.controller.state.conflicts == {}


def test_readyz_says_what_differs_and_a_reload_what_changed(h: Harness) -> None:
    h.agent.tick()
    kernel = h.agent.controller.kernel
    assert isinstance(kernel, FakeKernel)
    chain = {"family": "inet", "table": "interceptd", "name": "istio-output"}
    kernel.apply({"nftables": [{"flush": {"chain": chain}}]})
    response = readyz(h)
    assert response.code == 503 and "chain istio-output flushed" in response.body.decode(), response.body
    h.agent.tick()  # the repair /readyz asked for
    assert h.agent.reload()
    (reload,) = h.events("reload")
    assert reload["changed"] == ["--istio-inbound-ports"]
    assert any("inbound" in line for line in reload["rules"]), reload["rules"]
