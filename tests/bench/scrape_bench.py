"""Scrape latency: one /metrics request against interceptd's table, in a throw-away namespace.

For the seed ruleset and for 10,000 excluded CIDRs (a larger set makes the one libnftables listing a
scrape does longer): the Collector alone (list the table, build the families, encode the text) and a full
HTTP GET of /metrics over loopback from the MetricsServer the agent runs.
"""

from __future__ import annotations

import sys
import urllib.request

from common import Report, bench_config, ms, percentile, summary, timed
from support.netlab import Lab, call_in

from interceptd.control import install
from interceptd.control.state import AgentState
from interceptd.ruleset.facts import HostFacts
from interceptd.ruleset.render import render
from interceptd.runtime.metrics import MetricsServer
from interceptd.system.kernel import NftKernel
from interceptd.system.routes import Netlink

SIZES = (0, 10_000)
REPS = 200


def measure(n_cidrs: int, reps: int) -> dict[str, object]:
    """Inside the namespace: install the ruleset, then time the Collector and the HTTP round trip."""
    from prometheus_client.exposition import generate_latest

    kernel = NftKernel()
    cfg = bench_config(n_cidrs, 3)
    install.apply(kernel, Netlink(), render(cfg, HostFacts(ipv6=False, host_ip=None)))
    state = AgentState(table=cfg.table, mode=cfg.inbound_interception_mode)
    server = MetricsServer(("127.0.0.1", 0), kernel, state).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"

    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return bytes(resp.read())

    try:
        size = len(get())
        collect = [timed(lambda: generate_latest(server.registry)) for _ in range(reps)]
        http = [timed(get) for _ in range(reps)]
    finally:
        server.stop()
    return {"collect": summary(collect), "http": summary(http), "bytes": size}


def run(report: Report, sizes: tuple[int, ...] = SIZES, reps: int = REPS) -> None:
    section = "scrape latency (GET /metrics, one libnftables listing of the named counters)"
    report.row(section, "ruleset", "collector median", "p99", "HTTP median", "p99", "exposition")
    with Lab() as lab:
        for n in sizes:
            got = call_in(lab.pod, measure, n, reps, timeout=600)
            c, h = got["collect"], got["http"]
            report.data[f"scrape/{n}"] = got
            report.row(section, f"{n} excluded CIDRs", ms(c["median"]), ms(percentile(c["samples"], 0.99)),
                       ms(h["median"]), ms(percentile(h["samples"], 0.99)), f"{got['bytes']} B")
    report.note(f"scrape: {reps} scrapes per ruleset, collector = generate_latest(), HTTP = urllib GET on loopback")


if __name__ == "__main__":
    out = Report()
    run(out, reps=int(sys.argv[1]) if len(sys.argv) > 1 else REPS)
    print(out.render())
