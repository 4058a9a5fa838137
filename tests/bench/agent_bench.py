"""The agent: repair latency over injected drifts, idle CPU per hour, resident memory.

A real `interceptd run` in a throw-away pod namespace (kernel events on, the default 10 s interval). An
injector process inside the namespace edits the table with libnftables and notes the wall time just
before each edit; the latency is from then to the timestamp of the agent's "repair" log event, which is
written after the repairing transaction committed (detection + comparison + re-apply). The kinds of
drift rotate: flush table, delete table, delete one rule, insert a foreign rule, delete a set element.

Run alone: `BENCH_ONLY=agent make bench` (BENCH_DRIFTS, BENCH_IDLE_SECONDS shorten it).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Report, bench_settings, ms, percentile, summary, toml_text
from support.netlab import INTERCEPTD, Lab, delete_ns, enter, new_ns, sh

DRIFTS = 100
IDLE_SECONDS = 60.0
SIZES = (10, 1000)  # excluded CIDRs
STARTS = 5
# Istio's init-container command line (the seed), as `interceptd run` takes it.
SEED = ("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020")

INJECTOR = """
import json, sys, time, nftables
nft = nftables.Nftables()
def handle(chain, comment):
    nft.set_json_output(True); nft.set_handle_output(True)
    rc, out, err = nft.cmd(f"list chain inet interceptd {chain}")
    nft.set_json_output(False); nft.set_handle_output(False)
    rules = [i["rule"] for i in json.loads(out)["nftables"] if "rule" in i]
    return next(r["handle"] for r in rules if r.get("comment") == comment)
for line in sys.stdin:
    cmd = line.strip()
    if cmd.startswith("delete-rule "):
        _, chain, comment = cmd.split()
        cmd = f"delete rule inet interceptd {chain} handle {handle(chain, comment)}"
    t0 = time.time()
    rc, _out, err = nft.cmd(cmd)
    print(json.dumps([t0, rc, err.strip()]), flush=True)
"""

KINDS = ("flush table inet interceptd",
         "delete table inet interceptd",
         "delete-rule output output-jump",
         "insert rule inet interceptd istio-output tcp dport 9999 return",
         "delete element inet interceptd proxy-uids { 1337 }")


class LogTail:
    """The agent's JSON events, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.events = path, 0, []

    def poll(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        fresh = [json.loads(line) for line in complete.decode().splitlines() if line.startswith("{")]
        self.events += fresh
        return fresh


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_kib(pid: int) -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def wait_for(tail: LogTail, name: str, after: int, timeout: float = 10.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        tail.poll()
        found = [e for e in tail.events[after:] if e["event"] == name]
        if found:
            return found[0]
        time.sleep(0.001)
    raise RuntimeError(f"no {name} event from the agent within {timeout} s")


def measure(lab: Lab, n_cidrs: int, drifts: int, idle_s: float, tmp: Path) -> dict[str, Any]:
    conf = tmp / f"bench-{n_cidrs}.toml"
    conf.write_text(toml_text(bench_settings(n_cidrs, 3)))
    log = tmp / f"agent-{n_cidrs}.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(["ip", "netns", "exec", lab.pod, INTERCEPTD, "run", "--config", str(conf),
                                  "--state-dir", str(tmp / "run"), "--metrics-address", ""],
                                 stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                 env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    injector = subprocess.Popen(["ip", "netns", "exec", lab.pod, "/usr/bin/python3", "-c", INJECTOR],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert injector.stdin is not None and injector.stdout is not None
    tail = LogTail(log)
    try:
        wait_for(tail, "start", 0)
        latencies: dict[str, list[float]] = {kind.split()[0] + " " + kind.split()[1]: [] for kind in KINDS}
        for i in range(drifts):
            kind = KINDS[i % len(KINDS)]
            before = len(tail.events)
            injector.stdin.write(kind + "\n")
            injector.stdin.flush()
            t0, rc, err = json.loads(injector.stdout.readline())
            if rc != 0:
                raise RuntimeError(f"drift {kind!r} failed: {err}")
            event = wait_for(tail, "repair", before)
            latency = datetime.datetime.fromisoformat(event["timestamp"]).timestamp() - t0
            latencies[kind.split()[0] + " " + kind.split()[1]].append(latency)
        # Idle: the repairs' own events are behind us; only the periodic checks run now.
        time.sleep(1.0)
        cpu0, t_idle = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(idle_s)
        idle_cpu = cpu_seconds(agent.pid) - cpu0
        idle_wall = time.monotonic() - t_idle
        memory = rss_kib(agent.pid)
    finally:
        injector.stdin.close()
        injector.wait(timeout=10)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
    every = [x for values in latencies.values() for x in values]
    return {"repair": summary(every), "by_kind": {k: summary(v) for k, v in latencies.items() if v},
            "idle_cpu_s_per_hour": idle_cpu * 3600 / idle_wall, "idle_window_s": idle_wall, "memory_kib": memory}


def time_to_ready(tmp: Path) -> float:
    """Seconds from starting `interceptd run SEED` in a fresh pod namespace to its READY=1 on NOTIFY_SOCKET
    (the rules are in place and checked then): what a pod start waits for with the agent as its init step."""
    ns = new_ns("-agent")
    sock_path = tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", ns=ns)
            sh("ip", "addr", "add", "192.0.2.2/24", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
            sock_path.unlink(missing_ok=True)
            sock.bind(str(sock_path))
            sock.settimeout(30)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NOTIFY_SOCKET": str(sock_path)}
            started = time.perf_counter()
            agent = subprocess.Popen([INTERCEPTD, "run", *SEED, "--state-dir", str(tmp / "run-ready")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=lambda: enter(ns))
            try:
                while b"READY=1" not in sock.recv(4096).split(b"\n"):
                    pass
                elapsed = time.perf_counter() - started
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=10)
        finally:
            delete_ns(ns)
    return elapsed


def run(report: Report, drifts: int = DRIFTS, idle_s: float = IDLE_SECONDS, sizes: tuple[int, ...] = SIZES) -> None:
    section = f"agent (interceptd run, kernel events on): repair latency over {drifts} injected drifts"
    report.row(section, "ruleset", "repair median", "p99", "max", "idle CPU/hour", "RSS", "peak RSS")
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="icd-bench-") as tmp:
        time_to_ready(Path(tmp))  # warm-up, discarded
        ready = summary(time_to_ready(Path(tmp)) for _ in range(STARTS))
        report.data["agent/ready"] = ready
        report.row(f"agent start-up: interceptd run (seed flags) process start to READY=1, median of {STARTS}, "
                   "each in a fresh namespace", "median", ms(ready["median"]), "min", ms(ready["min"]),
                   "max", ms(ready["max"]))
        for n in sizes:
            got = measure(lab, n, drifts, idle_s, Path(tmp))
            r = got["repair"]
            report.data[f"agent/{n}"] = got
            report.row(section, f"seed + {n} excluded CIDRs", ms(r["median"]), ms(percentile(r["samples"], 0.99)),
                       ms(r["max"]), f"{got['idle_cpu_s_per_hour']:.2f} s",
                       f"{got['memory_kib']['VmRSS'] / 1024:.1f} MiB", f"{got['memory_kib']['VmHWM'] / 1024:.1f} MiB")
    report.note(f"agent: drift kinds rotate ({', '.join(k.split(' inet')[0] for k in KINDS)}); latency = "
                f"injection start to the repair event (after the repair committed); idle CPU over {idle_s:.0f} s "
                f"with the default 10 s check interval, scaled to an hour")

