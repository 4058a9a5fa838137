"""The node agent: start-up, memory, idle CPU, drift repair and the full reconcile pass, at 250 and 1,000 pods.

A real `interceptd node` watches a private directory of throw-away namespaces (an address on lo each, the
seed configuration), kernel events on, the default 10 s backstop. Figures:
- start: from exec to /readyz 200 (every namespace applied);
- RSS after start and peak (VmHWM), from /proc; target < 100 MB at 250;
- idle CPU over the idle window (which includes the backstop passes), as % of one core;
- the full reconcile pass: each backstop pass logs its scan (sources) and check (read back and compare
  every namespace) times at debug level; target < 1 s at 250;
- one scrape of /metrics (every namespace's counters with a netns label);
- drift: the table deleted in 10 random namespaces, one after the other; the time until each holds it again
  (kernel events wake the agent), polled from here; target <= 1 s each at 1,000;
- targets at 1,000: every namespace intercepted, full pass <= 2 s, RSS <= 200 MB.

Run alone: `BENCH_ONLY=node make bench` (BENCH_NODE_IDLE_SECONDS shortens it).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Any

from agent_bench import cpu_seconds, rss_kib
from common import Report, ms, summary
from support.nodelab import NodeAgent, NsDir

from interceptd.system.kernel import NftKernel

SIZES = (250, 1000)
DRIFTS = 10
IDLE_SECONDS = 30.0
NODE_TOML = ('envoy_port = 15001\ninbound_capture_port = 15006\nproxy_uid = "1337"\nservice_cidr = "*"\n'
             'inbound_ports = "*"\nlocal_exclude_ports = [15090, 15021, 15020]\n')


def _address(i: int) -> str:
    return f"198.51.100.{i % 250 + 1}/32"  # each namespace is its own world: addresses may repeat across them


def _has_table(path: str) -> bool:
    return NftKernel(netns=path, keep_context=False).list_table("interceptd") is not None


def _drift(nsdir: NsDir, n: int) -> list[float]:
    """Delete the table in DRIFTS random namespaces; seconds until each holds one again."""
    out = []
    for i in random.Random(n).sample(range(n), DRIFTS):
        path = os.path.join(nsdir.path, f"b{i:04d}")
        NftKernel(netns=path, keep_context=False).apply(
            {"nftables": [{"delete": {"table": {"family": "inet", "name": "interceptd"}}}]})
        deleted = time.monotonic()
        while not _has_table(path):
            if time.monotonic() - deleted > 10:
                raise AssertionError(f"namespace b{i:04d}: not repaired within 10 s")
            time.sleep(0.002)
        out.append(time.monotonic() - deleted)
    return out


def measure(n: int, idle_s: float) -> dict[str, Any]:
    with NsDir() as nsdir, tempfile.TemporaryDirectory(prefix="icd-nodebench-") as tmp:
        for i in range(n):
            nsdir.add(f"b{i:04d}", _address(i))
        config = os.path.join(tmp, "node.toml")
        with open(config, "w", encoding="utf-8") as fh:
            fh.write(NODE_TOML)
        agent = NodeAgent(os.path.join(tmp, "state"), nsdir.path, ("--config", config),
                          {"INTERCEPTD_LOG_LEVEL": "debug", "INTERCEPTD_RECONCILE_INTERVAL": "10",
                           "INTERCEPTD_NETNS_CONFIG_DIR": os.path.join(tmp, "netns.d")})
        started = time.monotonic()
        agent.start(wait_ready=300)
        start_s = time.monotonic() - started
        try:
            assert agent.proc is not None
            pid = agent.proc.pid
            rss_ready = rss_kib(pid)
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(idle_s)
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            scrape_started = time.perf_counter()
            metrics = agent.metrics(timeout=120)  # 1,000 namespaces' counters, on a shared machine
            scrape_s = time.perf_counter() - scrape_started
            assert metrics['interceptd_node_namespaces{source="dir"}'] == n
            passes = [e for e in agent.events() if e.get("event") == "pass"]
            assert passes, "no backstop pass in the idle window"
            intercepted = sum(_has_table(os.path.join(nsdir.path, f"b{i:04d}")) for i in range(n))
            repairs = _drift(nsdir, n)
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            rss_end = rss_kib(pid)
        finally:
            agent.stop()
    return {"namespaces": n, "start_s": start_s, "rss_ready_kib": rss_ready, "rss_end_kib": rss_end,
            "idle_cpu_fraction": cpu, "scrape_s": scrape_s,
            "check_s": summary(p["check_ms"] / 1000 for p in passes),
            "scan_s": summary(p["scan_ms"] / 1000 for p in passes), "intercepted": intercepted,
            "repair_s": summary(repairs), "repair_max_s": max(repairs), "fds": fds}


def run(report: Report, sizes: tuple[int, ...] = SIZES, idle_s: float = IDLE_SECONDS) -> None:
    results = [measure(n, idle_s) for n in sizes]
    report.data["node"] = results
    section = "node agent (interceptd node, seed config per namespace, events on, 10 s backstop)"
    report.row(section, "namespaces", "intercepted", "start", "RSS", "per ns", "peak RSS", "idle CPU",
               "pass: check", "pass: scan", "scrape", "repair median", "repair max", "fds")
    for r in results:
        rss = r["rss_end_kib"]
        report.row(section, str(r["namespaces"]), str(r["intercepted"]), f"{r['start_s']:.2f} s",
                   f"{rss['VmRSS'] / 1024:.1f} MB", f"{rss['VmRSS'] / r['namespaces']:.0f} KiB",
                   f"{rss['VmHWM'] / 1024:.1f} MB", f"{r['idle_cpu_fraction'] * 100:.2f} %",
                   ms(r["check_s"]["median"]), ms(r["scan_s"]["median"]), ms(r["scrape_s"]),
                   ms(r["repair_s"]["median"]), ms(r["repair_max_s"]), str(r["fds"]))
    report.note("node: 'pass: check' is the full reconcile pass (read back and compare every namespace); "
                "'pass: scan' re-reads the sources; 'repair' is a deleted table back in place, 10 random "
                "namespaces; targets at 1,000: pass <= 2 s, repair <= 1 s each, RSS <= 200 MB")
