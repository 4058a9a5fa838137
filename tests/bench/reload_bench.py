"""SIGHUP that changes one excluded CIDR, on an agent holding 10,000 of them.

A real `interceptd run` in a throw-away pod namespace; the TOML file is rewritten with the first CIDR
swapped, then SIGHUP; the latency is from the signal to the timestamp of the agent's "reload" event
(written after the new ruleset committed: re-read, render, one transaction). Reuses agent_bench's log tail.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_bench import LogTail, rss_kib, wait_for
from common import MAX_CIDRS, Report, bench_cidrs, bench_settings, ms, summary, toml_text
from support.netlab import INTERCEPTD, Lab


def measure(lab: Lab, n_cidrs: int, reloads: int, tmp: Path) -> dict[str, Any]:
    settings = bench_settings(n_cidrs, 3)
    cidrs = list(settings["service_exclude_cidr"])  # type: ignore[call-overload]
    spare = bench_cidrs(MAX_CIDRS)[-2:]  # never among the first n_cidrs
    conf = tmp / "reload.toml"
    conf.write_text(toml_text(settings))
    log = tmp / "agent-reload.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(["ip", "netns", "exec", lab.pod, INTERCEPTD, "run", "--config", str(conf),
                                  "--state-dir", str(tmp / "run"), "--metrics-address", ""],
                                 stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                 env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    tail = LogTail(log)
    latencies = []
    try:
        wait_for(tail, "start", 0, timeout=60)
        for i in range(reloads):
            conf.write_text(toml_text({**settings, "service_exclude_cidr": [spare[i % 2], *cidrs[1:]]}))
            before = len(tail.events)
            t0 = time.time()
            agent.send_signal(signal.SIGHUP)
            event = wait_for(tail, "reload", before, timeout=60)
            if event.get("error"):
                raise RuntimeError(f"reload failed: {event['error']}")
            latencies.append(datetime.datetime.fromisoformat(event["timestamp"]).timestamp() - t0)
        memory = rss_kib(agent.pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
    return {"reload": summary(latencies), "memory_kib": memory}


def run(report: Report, n_cidrs: int = 10_000, reloads: int = 10) -> None:
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="icd-bench-") as tmp:
        got = measure(lab, n_cidrs, reloads, Path(tmp))
    report.data["reload"] = got
    r = got["reload"]
    section = f"SIGHUP reload changing 1 of {n_cidrs} excluded CIDRs ({reloads} reloads)"
    report.row(section, "median", "max", "RSS after", "peak RSS")
    report.row(section, ms(r["median"]), ms(r["max"]), f"{got['memory_kib']['VmRSS'] / 1024:.1f} MiB",
               f"{got['memory_kib']['VmHWM'] / 1024:.1f} MiB")
