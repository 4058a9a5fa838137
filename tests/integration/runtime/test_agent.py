"""`interceptd run` keeps interception in place, tested against a running agent in the pod namespace.

The agent runs as a subprocess (`ip netns exec POD interceptd run ...`) with a NOTIFY_SOCKET the test
binds, so every test waits on the agent's own READY=1 instead of sleeping. Drift is injected with `nft`
inside the pod namespace; "intercepted again" is a real connection landing on the pod's proxy port.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.netlab import INTERCEPTD, Lab, sh, wait_until

# Outbound capture only to 198.51.100.0/24 (a named set), inbound all but the exempt ports.
ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "198.51.100.0/24", "-x", "",
        "-b", "*", "-d", "15090,15021,15020"]
APP_UID = 1000


class Agent:
    """One `interceptd run` in the lab's pod namespace, its notify socket and its JSON log."""

    def __init__(self, lab: Lab, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.lab, self.tmp = lab, tmp
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))
        self.log_path = tmp / "agent.log"
        self.args = ["run", *args, "--state-dir", str(tmp / "run"), "--metrics-address", ""]
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NOTIFY_SOCKET": str(tmp / "notify"),
                    **(env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", lab.pod, INTERCEPTD, *self.args], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.messages: list[str] = []

    def wait_note(self, field: str, timeout: float = 10.0) -> list[str]:
        """Receive notify datagrams until one carries `field` (e.g. READY=1); returns all received so far."""
        end = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # then only what is already queued counts
            self.notify.settimeout(0 if exited else max(0.0, end - time.monotonic()))
            try:
                message = self.notify.recv(4096).decode()
            except (TimeoutError, BlockingIOError):
                if exited or time.monotonic() >= end:
                    raise AssertionError(f"no {field} from the agent (exit {self.proc.poll()}): "
                                         f"{self.log_text()}") from None
                continue
            self.messages.append(message)
            if field in message.split("\n"):
                return self.messages

    def log_text(self) -> str:
        return self.log_path.read_text()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event["event"] == name:
                    out.append(event)
        return out

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> float:
        """SIGTERM; returns how long the agent took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


@pytest.fixture
def pod(lab: Lab) -> Lab:
    lab.serve(lab.pod, "pod", tcp=(15001, 15006, 80))
    lab.serve(lab.peer, "peer", tcp=[9999])
    return lab


@pytest.fixture
def start(pod: Lab, tmp_path: Path) -> Iterator[Any]:
    agents: list[Agent] = []

    def _start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> Agent:
        agent = Agent(pod, tmp_path, *args, env=env)
        agents.append(agent)
        if ready:
            agent.wait_note("READY=1")
        return agent

    yield _start
    for agent in agents:
        agent.close()


def intercepted(lab: Lab, host: str = "198.51.100.1") -> bool:
    answer = lab.request(lab.pod, host, 9999, uid=APP_UID, gid=APP_UID)
    if answer.startswith("pod 15001 "):
        return True
    assert answer.startswith("peer 9999 "), answer
    return False


def inbound_intercepted(lab: Lab) -> bool:
    return lab.request(lab.peer, lab.pod_ip, 80).startswith("pod 15006 ")


def nft(lab: Lab, *cmd: str) -> subprocess.CompletedProcess[str]:
    return sh("nft", *cmd, ns=lab.pod)


def rule_handle(lab: Lab, chain: str, comment: str) -> int:
    listing = json.loads(nft(lab, "-j", "-a", "list", "chain", "inet", "interceptd", chain).stdout)["nftables"]
    return next(i["rule"]["handle"] for i in listing if "rule" in i and i["rule"].get("comment") == comment)


def without_counts(listing: str) -> list[dict[str, Any]]:
    return [{kind: {k: v for k, v in body.items() if k not in ("packets", "bytes")} for kind, body in item.items()}
            for item in json.loads(listing)["nftables"]]


def utc(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


# What each drift does to decisions, and how the agent names it.
DRIFTS: dict[str, tuple[str, Any]] = {
    "flush-table": ("chain flushed", lambda lab: nft(lab, "flush", "table", "inet", "interceptd")),
    "delete-table": ("table missing", lambda lab: nft(lab, "delete", "table", "inet", "interceptd")),
    "delete-rule": ("rule removed", lambda lab: nft(lab, "delete", "rule", "inet", "interceptd", "output",
                                                    "handle", str(rule_handle(lab, "output", "output-jump")))),
    "foreign-rule": ("rule added", lambda lab: nft(lab, "insert", "rule", "inet", "interceptd", "istio-output",
                                                   "tcp", "dport", "9999", "return")),
    "set-element": ("set changed", lambda lab: nft(lab, "delete", "element", "inet", "interceptd",
                                                   "include-cidrs-v4", "{", "198.51.100.0/24", "}")),
}


def inject_and_wait_repair(agent: Agent, drift: str, timeout: float) -> tuple[float, float, dict[str, Any]]:
    """Inject one drift; return (wall time before, wall time after the nft command, the repair event)."""
    reason, inject = DRIFTS[drift]
    before = len(agent.events("repair"))
    t0 = time.time()
    inject(agent.lab)
    t1 = time.time()
    assert wait_until(lambda: len(agent.events("repair")) > before, timeout=timeout), agent.log_text()
    event = agent.events("repair")[before]
    assert event["error"] is None and any(d.startswith(DRIFT_WORD[reason]) for d in event["drift"]), event
    return t0, t1, event


# The first words of the detail the agent logs for each reason.
DRIFT_WORD = {"chain flushed": "chain ", "table missing": "table inet interceptd is missing",
              "rule removed": "rule output/output-jump removed", "rule added": "foreign unnamed rule in chain "
              "istio-output", "set changed": "set include-cidrs-v4 elements changed (1 removed"}


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_drift_is_repaired_at_once_by_kernel_events(start: Any, pod: Lab, drift: str) -> None:
    agent = start(*ARGS, "--reconcile-interval", "60")
    assert intercepted(pod) and inbound_intercepted(pod)
    t0, _, event = inject_and_wait_repair(agent, drift, timeout=2.0)
    assert event["seen_by"] == "event"
    latency = utc(event["timestamp"]) - t0
    assert latency < 1.0, f"repair took {latency:.3f} s"
    assert intercepted(pod) and inbound_intercepted(pod)
    assert agent.proc.poll() is None


@pytest.mark.parametrize("drift", ["delete-table", "foreign-rule"])
def test_without_events_the_timer_repairs_within_one_interval(start: Any, pod: Lab, drift: str) -> None:
    interval = 0.5
    agent = start(*ARGS, "--kernel-events=false", "--reconcile-interval", str(interval), "--log-level", "debug")
    t0, t1, event = inject_and_wait_repair(agent, drift, timeout=3 * interval + 2)
    assert event["seen_by"] == "timer"
    latency = utc(event["timestamp"]) - t0
    # Load-independent: the first periodic check that began after the injection found it...
    missed = [e for e in agent.events("check") if t1 < utc(e["timestamp"]) < utc(event["timestamp"])]
    assert missed == []
    # ... and on a quiet machine that is one interval (plus the time of a check and an apply).
    assert latency < interval + 1.0, f"repair took {latency:.3f} s with a {interval} s interval"
    assert intercepted(pod)


def write_config(path: Path, text: str) -> None:
    """Atomically, as an operator's config management would: the agent never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


POLL_SCRIPT = """
import select, sys, nftables
nft = nftables.Nftables()
polls = missing = 0
print("go", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    rc, _out, _err = nft.cmd("list table inet interceptd")
    polls += 1
    missing += rc != 0
print(polls, missing, flush=True)
"""


class TablePoller:
    """Lists the table in the pod namespace as fast as libnftables can (a process inside it); counts misses."""

    def __init__(self, lab: Lab) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.pod, "/usr/bin/python3", "-c", POLL_SCRIPT],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "go\n"

    def finish(self) -> tuple[int, int]:
        """(polls, times the table was missing)."""
        out, _ = self.proc.communicate("stop\n", timeout=10)
        polls, missing = out.split()
        return int(polls), int(missing)


NARROW = 'service_cidr = "198.51.100.0/24"\n'
WIDE = 'service_cidr = "198.51.100.0/24,203.0.113.0/24"\n'


def test_sighup_swaps_config_without_a_gap(start: Any, pod: Lab, tmp_path: Path) -> None:
    conf = tmp_path / "interceptd.toml"
    write_config(conf, NARROW)
    agent = start(*[a for a in ARGS if a != "198.51.100.0/24" and a != "-i"], "--config", str(conf))
    assert intercepted(pod, "198.51.100.1") and not intercepted(pod, "203.0.113.1")
    poller = TablePoller(pod)
    for text in (WIDE, NARROW) * 5 + (WIDE,):
        write_config(conf, text)
        agent.messages.clear()
        agent.signal(signal.SIGHUP)
        assert agent.wait_note("READY=1")[0].startswith("RELOADING=1")
    polls, missing = poller.finish()
    assert intercepted(pod, "203.0.113.1") and intercepted(pod, "198.51.100.1")
    assert polls > 11 and missing == 0
    reloads = agent.events("reload")
    assert [e["error"] for e in reloads] == [None] * 11 and reloads[-1]["generation"] == 12


def test_sighup_burst_converges_on_the_last_config(start: Any, pod: Lab, tmp_path: Path) -> None:
    conf = tmp_path / "interceptd.toml"
    write_config(conf, NARROW)
    agent = start(*[a for a in ARGS if a != "198.51.100.0/24" and a != "-i"], "--config", str(conf))
    poller = TablePoller(pod)
    for n in range(300):
        if n == 150:
            write_config(conf, WIDE)
        agent.signal(signal.SIGHUP)
    assert wait_until(lambda: "203.0.113.0" in nft(pod, "list", "set", "inet", "interceptd",
                                                  "include-cidrs-v4").stdout, timeout=5)
    assert intercepted(pod, "203.0.113.1")
    polls, missing = poller.finish()
    assert agent.proc.poll() is None and polls > 0 and missing == 0
    agent.stop()  # after every pending SIGHUP was handled
    reloads = agent.events("reload")
    assert all(e["error"] is None for e in agent.events()), agent.log_text()
    assert 1 <= len(reloads) < 300 and reloads[-1]["generation"] == 2  # the burst collapsed, one change


@pytest.mark.parametrize("broken", ["service_cidr = [", 'service_cidr = "not-a-cidr"', 'unknown_key = 1',
                                    'table = "other"'])
def test_sighup_with_a_broken_config_keeps_the_old_decisions(start: Any, pod: Lab, tmp_path: Path,
                                                             broken: str) -> None:
    conf = tmp_path / "interceptd.toml"
    write_config(conf, WIDE)
    agent = start(*[a for a in ARGS if a != "198.51.100.0/24" and a != "-i"], "--config", str(conf))
    before = nft(pod, "-j", "list", "table", "inet", "interceptd").stdout
    write_config(conf, NARROW + broken + "\n")
    agent.messages.clear()
    agent.signal(signal.SIGHUP)
    notes = agent.wait_note("READY=1")
    assert notes[0].startswith("RELOADING=1")
    (event,) = agent.events("reload")
    assert event["level"] == "error" and event["error"], event
    assert agent.proc.poll() is None
    assert intercepted(pod, "203.0.113.1")  # still the wide config
    after = nft(pod, "-j", "list", "table", "inet", "interceptd").stdout
    assert without_counts(after) == without_counts(before)


def test_notify_socket_sees_the_lifecycle_and_watchdog(start: Any, pod: Lab) -> None:
    agent = start(*ARGS, env={"WATCHDOG_USEC": "200000"})
    ready = next(m for m in agent.messages if m.startswith("READY=1"))
    assert "STATUS=table inet interceptd generation 1: ready" in ready
    agent.messages.clear()
    assert agent.wait_note("WATCHDOG=1", timeout=1)
    agent.signal(signal.SIGHUP)
    notes = agent.wait_note("READY=1")
    assert any(n.startswith("RELOADING=1\nMONOTONIC_USEC=") for n in notes)
    agent.stop()
    assert agent.wait_note("STOPPING=1", timeout=1)
    pings = [n for n in agent.messages if n == "WATCHDOG=1"]
    assert pings


def test_second_instance_is_refused(start: Any, pod: Lab, tmp_path: Path) -> None:
    first = start(*ARGS)
    second = subprocess.run(["ip", "netns", "exec", pod.pod, INTERCEPTD, *first.args], capture_output=True,
                            text=True, timeout=10, env={"PATH": first.env["PATH"]})
    assert second.returncode == 1
    assert f"another interceptd (pid {first.proc.pid}) already keeps table inet interceptd" in second.stderr
    assert first.proc.poll() is None and intercepted(pod)


def test_sigterm_stops_quickly_and_leaves_the_rules(start: Any, pod: Lab) -> None:
    agent = start(*ARGS)
    assert agent.stop() < 2.0
    assert agent.proc.returncode == 0
    assert intercepted(pod)  # fail closed: the proxy is not bypassed while the agent restarts
    assert agent.events("stop")[0]["removed"] is False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cleanup_on_exit_removes_the_rules(start: Any, pod: Lab, sig: int) -> None:
    agent = start(*ARGS, "--cleanup-on-exit")
    started = time.monotonic()
    agent.signal(sig)
    agent.proc.wait(timeout=5)
    assert time.monotonic() - started < 2.0 and agent.proc.returncode == 0
    assert sh("nft", "list", "table", "inet", "interceptd", ns=pod.pod, check=False).returncode != 0
    assert not intercepted(pod)


def test_deleted_tproxy_policy_rule_is_repaired_by_events(start: Any, pod: Lab) -> None:
    agent = start("-m", "TPROXY", "-b", "*", "-i", "198.51.100.0/24", "--reconcile-interval", "60")
    rule = ["ip", "rule", "del", "fwmark", "1337", "lookup", "133"]
    assert "lookup 133" in sh("ip", "rule", "show", ns=pod.pod).stdout
    before = len(agent.events("repair"))
    t0 = time.time()
    sh(*rule, ns=pod.pod)
    assert wait_until(lambda: len(agent.events("repair")) > before, timeout=2.0), agent.log_text()
    event = agent.events("repair")[before]
    assert event["seen_by"] == "event" and "`ip rule fwmark 1337 lookup 133` is missing" in event["drift"], event
    assert utc(event["timestamp"]) - t0 < 1.0
    assert "fwmark 0x539 lookup 133" in sh("ip", "rule", "show", ns=pod.pod).stdout
    assert intercepted(pod)  # outbound capture is REDIRECT in TPROXY mode too
