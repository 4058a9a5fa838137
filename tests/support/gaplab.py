"""The interception-gap harness: probers open connections without pause while the agent is put through
reloads, restarts and injected drift; every connection is classified as captured or bypassed.

Both configurations capture the probed flows (outbound 198.51.100.1:9999 from an app uid, inbound
192.0.2.2:80 from the peer), so whichever of the two the kernel holds at a given instant, a connection that
reaches the real destination is a bypass: a gap. Used by tests/integration/runtime/test_hardening_gap.py (short) and
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

from support.netlab import INTERCEPTD, Lab, call_in, enter, enter_as, wait_until

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
    """One prober's results in order: when each connection began (its first packet decides its path; a
    retransmitted SYN can make it end a second later) and its outcome ('ok', 'bypass' or 'fail')."""

    direction: str
    times: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)

    def count(self, outcome: str, start: float = 0.0, end: float = float("inf")) -> int:
        return sum(1 for t, o in zip(self.times, self.outcomes, strict=True) if o == outcome and start <= t < end)

    def windows(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Each run of bypassed connections in a row, as the time from the first to the last bypass in it:
        how long the probes saw the gap open (a lower bound; the injector's repair time is the upper one).
        A failed connection (one caught by a `delete table` waits out its 1 s timeout) ends a run too, or a
        run would span the drifts that came and went meanwhile."""
        out: list[float] = []
        first: float | None = None
        last = 0.0
        for t, outcome in zip(self.times, self.outcomes, strict=True):
            if not start <= t < end:
                continue
            if outcome == "bypass":
                first = t if first is None else first
                last = t
            elif first is not None:
                out.append(last - first)
                first = None
        return out


class Prober:
    """A forked process that connects over and over (outbound in the pod, inbound from the peer)."""

    def __init__(self, lab: Lab, direction: str, pause: float = 0.0) -> None:
        """`pause`: seconds between connections (several probers on a small machine leave the agent CPU)."""
        self.direction = direction
        ns, host, port, ok, bypass, uid = (
            (lab.pod, "198.51.100.1", 9999, "pod 15001 ", "peer 9999 ", APP_UID) if direction == "outbound"
            else (lab.peer, lab.pod_ip, 80, "pod 15006 ", "pod 80 ", None))
        rfd, wfd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: probe until SIGUSR1, then send the samples up the pipe
            try:
                os.close(rfd)
                enter_as(ns, uid, uid)
                samples = _probe(host, port, ok, bypass, direction, pause)
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


def _probe(host: str, port: int, ok: str, bypass: str, direction: str, pause: float) -> Samples:
    stop = False

    def _stop(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGUSR1, _stop)
    samples = Samples(direction)
    while not stop:
        answer = "fail"
        began = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            with contextlib.suppress(OSError):
                s.connect((host, port))
                data = s.recv(256).decode(errors="replace")
                answer = "ok" if data.startswith(ok) else "bypass" if data.startswith(bypass) else "fail"
        samples.times.append(began)
        samples.outcomes.append(answer)
        if pause:
            time.sleep(pause)
    return samples


class AgentProc:
    """`interceptd run --config FILE` in the pod namespace; one JSON log file per start, and the notify
    socket it reports READY=1 on (after its start and after each reload)."""

    def __init__(self, lab: Lab, tmp: Path, *extra: str) -> None:
        self.lab, self.tmp, self.extra = lab, tmp, extra
        self.config = tmp / "agent.toml"
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))

    @property
    def log(self) -> Path:
        return self.tmp / f"agent-{self.starts}.log"

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.pod, INTERCEPTD, "run", "--config", str(self.config),
                 "--state-dir", str(self.tmp / "run"), "--log-format", "json", *self.extra],
                stdout=log, stderr=log,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NOTIFY_SOCKET": str(self.tmp / "notify")})
        if wait:
            assert wait_until(lambda: self.events("start") > 0, timeout=20), self.log.read_text()

    def events(self, name: str) -> int:
        return self.log.read_text().count(f'"event": "{name}"')

    def reload(self, text: str) -> None:
        """Write the config, SIGHUP, and wait for the READY=1 that ends the reload."""
        self.notify.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while self.notify.recv(4096):
                pass  # earlier notifications
        self.write_config(text)
        self.send(signal.SIGHUP)
        self.notify.settimeout(20)
        while b"READY=1" not in self.notify.recv(4096).split(b"\n"):
            pass

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

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        self.notify.close()


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
                                    "gaps": len(windows), "longest_gap_ms": round(max(windows, default=0) * 1000, 1),
                                    "longest_run": _longest_run(s.outcomes, s.times, start, end)}
            out[phase] = row
        if self.drift_repairs:
            ordered = sorted(self.drift_repairs)
            out["drift_repair_ms"] = {"n": len(ordered), "median": round(ordered[len(ordered) // 2] * 1000, 1),
                                      "p99": round(ordered[len(ordered) * 99 // 100] * 1000, 1),
                                      "max": round(ordered[-1] * 1000, 1)}
        return out


def _longest_run(outcomes: list[str], times: list[float], start: float, end: float) -> int:
    """The most bypassed connections in a row."""
    best = run = 0
    for t, outcome in zip(times, outcomes, strict=True):
        if start <= t < end:
            run = run + 1 if outcome == "bypass" else 0
            best = max(best, run)
    return best


DRIFT_PAUSE_S = 0.06  # drifts below the agent's fight threshold (100 repairs in 5 s slows repairs down)


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
            agent.reload(CONFIG_B if n % 2 == 0 else CONFIG_A)
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
            time.sleep(DRIFT_PAUSE_S)
        report.phases["drifts"] = (t0, time.monotonic())
        time.sleep(0.2)
    finally:
        report.samples = [p.stop() for p in probers]
        agent.stop()
        agent.close()
    return report


def _inject(lab: Lab, how: str) -> float:
    """Another process flushes or deletes the table; returns how long until the agent put it back."""
    seconds: list[float] = call_in(lab.pod, drift_cycles, [how])
    return seconds[0]


def drift_cycles(verbs: list[str]) -> list[float]:
    """In the pod namespace, as a foreign libnftables context: for each verb, `flush` or `delete` the table,
    then wait until the agent has put its rules back; returns the seconds each repair took."""
    import nftables

    out = []
    for verb in verbs:
        t0 = time.monotonic()
        rc, _, err = nftables.Nftables().cmd(f"{verb} table inet interceptd")
        assert rc == 0, err
        while True:  # fresh contexts: a reused one's cache can keep showing the state of its own change
            rc, listing, _ = nftables.Nftables().cmd("list chain inet interceptd istio-output")
            if rc == 0 and "redirect-outbound-cidrs" in listing:
                break
            assert time.monotonic() - t0 < 30, f"no repair 30 s after `{verb} table`: {listing}"
            time.sleep(0.0005)
        out.append(time.monotonic() - t0)
    return out


def scrapes(n: int) -> int:
    """In the pod namespace: n GET /metrics from the agent; returns the bytes read."""
    import urllib.request

    total = 0
    for _ in range(n):
        with urllib.request.urlopen("http://127.0.0.1:15321/metrics", timeout=10) as response:
            total += len(response.read())
    return total


def resources(pid: int) -> tuple[int, int, int]:
    """RSS in KiB, open file descriptors and threads of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"])


def slope_per_10k(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value over operations, per 10,000 operations."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in points) / var * 10000


def churn(lab: Lab, tmp: Path, ops: int, every: int) -> dict[str, Any]:
    """`ops` operations on a running agent, half applies (SIGHUP reloads between two configurations) and
    half metrics scrapes, run side by side; the agent's RSS, descriptors and threads are sampled every
    `every` operations. (Repairs would be rate-limited: a burst of them is a fight the agent slows down.)"""
    configs = [c.replace('metrics_address = ""', 'metrics_address = "127.0.0.1:15321"') for c in (CONFIG_A, CONFIG_B)]
    agent = AgentProc(lab, tmp)
    agent.write_config(configs[0])
    agent.start()
    assert agent.proc is not None
    pid = agent.proc.pid
    samples: list[tuple[int, tuple[int, int, int]]] = [(0, resources(pid))]
    started = time.monotonic()
    try:
        done = 0
        while done < ops:
            half = min(every, ops - done) // 2
            scraper = _Forked(lab.pod, scrapes, half)
            for n in range(half):
                agent.reload(configs[(n + 1) % 2])
            scraper.wait()
            done += 2 * half
            samples.append((done, resources(pid)))
    finally:
        agent.close()
    warm = samples[1:]  # the first block loads code and caches: growth after it is what would leak
    names = ("rss_kib", "fds", "threads")
    return {"ops": done, "seconds": round(time.monotonic() - started, 1), "samples": samples,
            "reloads": agent.events("reload"),
            "slope_per_10k_ops": {name: round(slope_per_10k([(x, v[i]) for x, v in warm]), 2)
                                  for i, name in enumerate(names)} if len(warm) > 1 else {}}


class _Forked:
    """call_in in the background: fn(*args) in a child inside `ns`."""

    def __init__(self, ns: str, fn: Any, *args: Any) -> None:
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                enter(ns)
                fn(*args)
                code = 0
            finally:
                os._exit(code)

    def wait(self) -> None:
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
