"""`make bench`: every benchmark in one run, a table on stdout, all figures as JSON in bench-results/.

Environment knobs (for quick runs; the defaults are the full run, about 15 minutes on 2 cores):
  BENCH_ONLY=apply,datapath,agent,reload,scrape,node,live   which parts to run
  BENCH_REPS=5                      interleaved repetitions of each apply measurement
  BENCH_CNI_REPS=20                 interleaved CNI ADDs (bridge alone, bridge + interceptd-cni)
  BENCH_DP_REPS=5                   interleaved repetitions of each datapath measurement
  BENCH_DP_SECONDS=1.5                length of one datapath measurement
  BENCH_IDLE_SECONDS=60             the agent's idle CPU window
  BENCH_DRIFTS=100                  drifts injected into the running agent (repair latency)
  BENCH_SCRAPE_REPS=200             scrapes of /metrics per ruleset
  BENCH_NODE_IDLE_SECONDS=30        the node agent's idle window per size (100 and 250 namespaces)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import agent_bench
import apply_bench
import datapath_bench
import live_bench
import node_bench
import reload_bench
import scrape_bench
from common import Report

PARTS = ("apply", "datapath", "agent", "reload", "scrape", "node", "live")


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def main() -> int:
    if os.geteuid() != 0:
        print("make bench needs root (it creates throw-away network namespaces)", file=sys.stderr)
        return 2
    only = [p for p in os.environ.get("BENCH_ONLY", ",".join(PARTS)).split(",") if p]
    unknown = set(only) - set(PARTS)
    if unknown:
        print(f"BENCH_ONLY: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    report = Report()
    started = time.monotonic()
    parts: dict[str, Callable[[], None]] = {
        "apply": lambda: apply_bench.run(report, sizes=(10, 1000, 10000), n_ports=1000,
                                         reps=_int("BENCH_REPS", 5), cni_reps=_int("BENCH_CNI_REPS", 20)),
        "scrape": lambda: scrape_bench.run(report, reps=_int("BENCH_SCRAPE_REPS", 200)),
        "datapath": lambda: datapath_bench.run(report, sizes=(0, 1000, 10000), reps=_int("BENCH_DP_REPS", 5),
                                               seconds=float(os.environ.get("BENCH_DP_SECONDS", "1.5")),
                                               threads=8, listener_threads=2),
        # The memory targets are for the default config and for 10,000 excluded CIDRs.
        "agent": lambda: agent_bench.run(report, drifts=_int("BENCH_DRIFTS", 100),
                                         idle_s=float(os.environ.get("BENCH_IDLE_SECONDS", "60")),
                                         sizes=(0, 10_000)),
        "reload": lambda: reload_bench.run(report),
        "node": lambda: node_bench.run(report, idle_s=float(os.environ.get("BENCH_NODE_IDLE_SECONDS", "30"))),
        "live": lambda: live_bench.run(report),
    }
    failed = []
    for name, part in parts.items():
        if name not in only:
            continue
        print(f"{name} benchmark ...", flush=True)
        try:
            part()
        except Exception as exc:  # one broken part must not throw away the others' figures
            failed.append(name)
            report.note(f"{name} benchmark FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    report.data["wall_s"] = time.monotonic() - started
    print(report.render())
    print(f"\nresults: {report.write()} ({report.data['wall_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
