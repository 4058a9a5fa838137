"""The interception-gap harness: probers open connections without pause while the agent is put through
reloads, restarts and injected drift; every connection is classified as captured or bypassed.

Both configurations capture the probed flows (outbound 198.51.100.1:9999 from an app uid, inbound
192.0.2.2:80 from the peer), so whichever of the two the kernel holds at a given instant, a connection that
reaches the real destination is a bypass: a gap. Used by tests/integration/test_hardening_gap.py (short) and
tests/soak.py (long).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import INTERCEPTD, Lab, enter, sh, wait_until

APP_UID = 1000
CONFIG_A = """envoy_port = 15001
inbound_capture_port = 15006
proxy_uid = "1337"
service_cidr = "198.51.100.0/24"
inbound_ports = "*"
local_exclude_ports = "15090"
metrics_address = ""
"""
CONFIG_B = CONFIG_A.replace('"198.51.100.0/24"', '"198.51.100.0/24,203.0.113.0/24"').replace(
    '"15090"', '"15090,15021"') + 'outbound_ports = "443"\n'


@dataclass
class Samples:
    """One prober's results in order: monotonic time and outcome ('ok', 'bypass' or 'fail')."""

    direction: str
    times: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)

    def count(self, outcome: str, start: float = 0.0, end: float = float("inf")) -> int:
        return sum(1 for t, o in zip(self.times, self.outcomes, strict=True) if o == outcome and start <= t < end)

    def windows(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Each run of non-captured connections, as the time from the last captured one before it to the
        first captured one after it: an upper bound of how long the gap was open."""
        out: list[float] = []
        last_ok: float | None = None
        in_gap = False
        for t, outcome in zip(self.times, self.outcomes, strict=True):
            if not start <= t < end:
                continue
            if outcome == "ok":
                if in_gap and last_ok is not None:
                    out.append(t - last_ok)
                last_ok, in_gap = t, False
            elif outcome == "bypass":
                in_gap = True
        return out


class Prober:
    """A forked process that connects over and over (outbound in the pod, inbound from the peer)."""

    def __init__(self, lab: Lab, direction: str) -> None:
        self.direction = direction
        ns, host, port, ok, bypass, uid = (
            (lab.pod, "198.51.100.1", 9999, "pod 15001 ", "peer 9999 ", APP_UID) if direction == "outbound"
            else (lab.peer, lab.pod_ip, 80, "pod 15006 ", "pod 80 ", None))
        rfd, wfd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: probe until SIGUSR1, then send the samples up the pipe
            try:
                os.close(rfd)
                enter(ns)
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                samples = _probe(host, port, ok, bypass, direction)
                with os.fdopen(wfd, "wb") as out:
                    pickle.dump(samples, out)
            finally:
                os._exit(0)
        os.close(wfd)
        self._rfd = rfd

    def stop(self) -> Samples:
        os.kill(self.pid, signal.SIGUSR1)
        with os.fdopen(self._rfd, "rb") as inp:
            data = inp.read()
        os.waitpid(self.pid, 0)
        samples: Samples = pickle.loads(data)
        return samples


def _probe(host: str, port: int, ok: str, bypass: str, direction: str) -> Samples:
    stop = False

    def _stop(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGUSR1, _stop)
    samples = Samples(direction)
    while not stop:
        answer = "fail"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            with contextlib.suppress(OSError):
                s.connect((host, port))
                data = s.recv(256).decode(errors="replace")
                answer = "ok" if data.startswith(ok) else "bypass" if data.startswith(bypass) else "fail"
        samples.times.append(time.monotonic())
        samples.outcomes.append(answer)
    return samples


class AgentProc:
    """`interceptd run --config FILE` in the pod namespace; one JSON log file per start."""

    def __init__(self, lab: Lab, tmp: Path, *extra: str) -> None:
        self.lab, self.tmp, self.extra = lab, tmp, extra
        self.config = tmp / "agent.toml"
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.tmp / f"agent-{self.starts}.log"

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.pod, INTERCEPTD, "run", "--config", str(self.config),
                 "--state-dir", str(self.tmp / "run"), "--log-format", "json", *self.extra],
                stdout=log, stderr=log, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        if wait:
            assert wait_until(lambda: self.events("start") > 0, timeout=20), self.log.read_text()

    def events(self, name: str) -> int:
        return self.log.read_text().count(f'"event": "{name}"')

    def write_config(self, text: str) -> None:
        tmp = self.config.with_suffix(".new")
        tmp.write_text(text)
        tmp.replace(self.config)

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)


@dataclass
class Report:
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: list[Samples] = field(default_factory=list)
    drift_repairs: list[float] = field(default_factory=list)  # injection -> table seen whole again, seconds

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"connections": sum(len(s.times) for s in self.samples)}
        for phase, (start, end) in self.phases.items():
            row: dict[str, Any] = {}
            for s in self.samples:
                windows = s.windows(start, end)
                row[s.direction] = {"probed": s.count("ok", start, end) + s.count("bypass", start, end)
                                    + s.count("fail", start, end),
                                    "bypass": s.count("bypass", start, end), "fail": s.count("fail", start, end),
                                    "gaps": len(windows), "longest_gap_ms": round(max(windows, default=0) * 1000, 1)}
            out[phase] = row
        if self.drift_repairs:
            ordered = sorted(self.drift_repairs)
            out["drift_repair_ms"] = {"n": len(ordered), "median": round(ordered[len(ordered) // 2] * 1000, 1),
                                      "max": round(ordered[-1] * 1000, 1)}
        return out


def run_gap(lab: Lab, tmp: Path, reloads: int, restarts: int, drifts: int, seed: int = 1) -> Report:
    """The whole scenario; the agent is stopped again at the end (the rules stay)."""
    rng = random.Random(seed)
    lab.serve(lab.pod, "pod", tcp=(15001, 15006, 80))
    lab.serve(lab.peer, "peer", tcp=[9999])
    agent = AgentProc(lab, tmp)
    agent.write_config(CONFIG_A)
    agent.start()
    probers = [Prober(lab, "outbound"), Prober(lab, "inbound")]
    report = Report()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        for n in range(reloads):
            before = agent.events("reload")
            agent.write_config(CONFIG_B if n % 2 == 0 else CONFIG_A)
            agent.send(signal.SIGHUP)
            assert wait_until(lambda b=before: agent.events("reload") > b, timeout=20), agent.log.read_text()
        report.phases["reloads"] = (t0, time.monotonic())
        t0 = time.monotonic()
        for n in range(restarts):
            if n % 2 == 0:
                agent.stop(signal.SIGTERM)
            else:  # in the middle of an apply: a reload to the other config has just begun
                agent.write_config(CONFIG_B if n % 4 == 1 else CONFIG_A)
                agent.send(signal.SIGHUP)
                time.sleep(rng.uniform(0, 0.004))
                agent.stop(signal.SIGKILL)
            agent.start()
        report.phases["restarts"] = (t0, time.monotonic())
        t0 = time.monotonic()
        for n in range(drifts):
            report.drift_repairs.append(_inject(lab, "flush" if n % 2 == 0 else "delete"))
        report.phases["drifts"] = (t0, time.monotonic())
        time.sleep(0.2)
    finally:
        report.samples = [p.stop() for p in probers]
        agent.stop()
    return report


def _inject(lab: Lab, how: str) -> float:
    """Another process flushes or deletes the table; returns how long until the agent put it back."""
    result = sh(*INJECT, how, ns=lab.pod, check=False)
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


# The injector runs as its own process (another libnftables context, like any foreign tool), waits until
# the table holds its rules again and prints the seconds that took.
INJECT = ["/usr/bin/python3", "-c", """
import sys, time, nftables
n = nftables.Nftables()
verb = sys.argv[1]
t0 = time.monotonic()
rc, _, err = n.cmd(f"{verb} table inet interceptd")
assert rc == 0, err
while True:
    rc, out, _ = n.cmd("list chain inet interceptd istio-output")
    if rc == 0 and "redirect-outbound-cidrs" in out:
        break
    time.sleep(0.0005)
print(time.monotonic() - t0)
"""]
