"""`make bench`: every benchmark in one run, a table on stdout, all figures as JSON in bench-results/.

Environment knobs (for quick runs; the defaults are the full run, about 15 minutes on 2 cores):
  BENCH_ONLY=apply,datapath,agent,reload,scrape   which parts to run
  BENCH_REPS=5                      interleaved repetitions of each apply measurement
  BENCH_DP_REPS=5                   interleaved repetitions of each datapath measurement
  BENCH_DP_SECONDS=1.5                length of one datapath measurement
  BENCH_IDLE_SECONDS=60             the agent's idle CPU window
  BENCH_DRIFTS=100                  drifts injected into the running agent (repair latency)
  BENCH_SCRAPE_REPS=200             scrapes of /metrics per ruleset
"""

from __future__ import annotations

import os
import sys
import time

import agent_bench
import apply_bench
import datapath_bench
import reload_bench
import scrape_bench
from common import Report

PARTS = ("apply", "datapath", "agent", "reload", "scrape")


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
    if "apply" in only:
        print("apply benchmark ...", flush=True)
        apply_bench.run(report, sizes=(10, 1000, 10000), n_ports=1000, reps=_int("BENCH_REPS", 5))
    if "scrape" in only:
        print("scrape benchmark ...", flush=True)
        scrape_bench.run(report, reps=_int("BENCH_SCRAPE_REPS", 200))
    if "datapath" in only:
        print("datapath benchmark ...", flush=True)
        datapath_bench.run(report, sizes=(0, 1000, 10000), reps=_int("BENCH_DP_REPS", 5),
                           seconds=float(os.environ.get("BENCH_DP_SECONDS", "1.5")), threads=8, listener_threads=2)
    if "agent" in only:
        print("agent benchmark ...", flush=True)
        # The memory targets are for the default config and for 10,000 excluded CIDRs.
        agent_bench.run(report, drifts=_int("BENCH_DRIFTS", 100),
                        idle_s=float(os.environ.get("BENCH_IDLE_SECONDS", "60")), sizes=(0, 10_000))
    if "reload" in only:
        print("reload benchmark ...", flush=True)
        reload_bench.run(report)
    report.data["wall_s"] = time.monotonic() - started
    print(report.render())
    print(f"\nresults: {report.write()} ({report.data['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
