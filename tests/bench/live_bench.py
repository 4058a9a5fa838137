"""Live pod settings under the node agent: from the write of a pod's settings file to its rules in force.

A real `interceptd node` keeps 100 throw-away namespaces (an address on lo each, the seed configuration) of a
private directory; its live settings directory is laid out as a mounted ConfigMap. One pod's excluded CIDRs
and ports alternate between two settings, 100 changes each for 10 and for 1,000 excluded CIDRs; after each
`..data` swap the pod's exclusion set is polled from here until it holds the new elements. Figures: median and
p99 of write-to-in-force, and the agent's own reload time (its log), with the other namespaces untouched
(their rule handles compared before and after). Target: every change in force within 1 s.

Run alone: `BENCH_ONLY=live make bench`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from common import Report, ms, percentile, summary
from support.configmap import ConfigMapDir
from support.nodelab import NodeAgent, NsDir

from interceptd.ruleset import names as N
from interceptd.system.kernel import NftKernel

NAMESPACES = 100
CHANGES = 100
SIZES = (10, 1000)
NODE_TOML = ('envoy_port = 15001\ninbound_capture_port = 15006\nproxy_uid = "1337"\nservice_cidr = "*"\n'
             'inbound_ports = "*"\nlocal_exclude_ports = [15090, 15021, 15020]\n')
IN_FORCE_S = 1.0


def _settings(n_cidrs: int, variant: int) -> str:
    """n excluded /32s in 10.0.0.0/8 (every other address, so none merge), shifted by one per variant."""
    cidrs = [f"10.{(2 * i + variant) >> 16 & 255}.{(2 * i + variant) >> 8 & 255}.{(2 * i + variant) & 255}/32"
             for i in range(n_cidrs)]
    ports = [2000 + 2 * i + variant for i in range(5)]
    return f"service_exclude_cidr = {json.dumps(cidrs)}\nlocal_outbound_ports_exclude = {ports}\n"


def _excluded(kernel: NftKernel) -> int:
    listing = kernel.list_table("interceptd") or []
    elements = next((i["set"].get("elem", []) for i in listing if "set" in i
                     and i["set"]["name"] == N.SET_EXCLUDE_CIDRS[4]), [])
    return hash(json.dumps(elements))


def _handles(path: str) -> list[int]:
    listing = NftKernel(netns=path, keep_context=False).list_table("interceptd") or []
    return [i["rule"]["handle"] for i in listing if "rule" in i]


def measure(n_cidrs: int) -> dict[str, Any]:
    with NsDir() as nsdir, tempfile.TemporaryDirectory(prefix="icd-livebench-") as tmp:
        for i in range(NAMESPACES):
            nsdir.add(f"l{i:03d}", f"198.51.100.{i % 250 + 1}/32")
        config = os.path.join(tmp, "node.toml")
        with open(config, "w", encoding="utf-8") as fh:
            fh.write(NODE_TOML)
        settings = ConfigMapDir(os.path.join(tmp, "netns.d"))
        settings.publish({"l000.toml": _settings(n_cidrs, 0)})
        agent = NodeAgent(os.path.join(tmp, "state"), nsdir.path, ("--config", config),
                          {"INTERCEPTD_RECONCILE_INTERVAL": "10", "INTERCEPTD_NETNS_CONFIG_DIR": settings.path})
        agent.start(wait_ready=300)
        changed = os.path.join(nsdir.path, "l000")
        others = [os.path.join(nsdir.path, f"l{i:03d}") for i in range(1, NAMESPACES, 10)]
        try:
            before = {path: _handles(path) for path in others}
            kernel = NftKernel(netns=changed)
            seen = [_excluded(kernel)]
            latencies = []
            for n in range(1, CHANGES + 1):
                settings.publish({"l000.toml": _settings(n_cidrs, n % 2)})
                written = time.monotonic()
                while True:
                    now = _excluded(kernel)
                    if (len(seen) < 2 and now != seen[0]) or (len(seen) == 2 and now == seen[n % 2]):
                        break
                    if time.monotonic() - written > 10:
                        raise AssertionError(f"change {n}: not in force 10 s after the write")
                    time.sleep(0.001)
                latencies.append(time.monotonic() - written)
                if len(seen) < 2:
                    seen.append(now)
            untouched = all(_handles(path) == before[path] for path in others)
            reloads = [e["duration_ms"] / 1000 for e in agent.events()
                       if e.get("event") == "reload" and e.get("netns") == "l000" and not e.get("error")]
        finally:
            agent.stop()
    return {"cidrs": n_cidrs, "namespaces": NAMESPACES, "latency_s": summary(latencies),
            "latency_p99_s": percentile(latencies, 0.99), "reload_s": summary(reloads),
            "reload_p99_s": percentile(reloads, 0.99), "others_untouched": untouched}


def run(report: Report, sizes: tuple[int, ...] = SIZES) -> None:
    results = [measure(n) for n in sizes]
    report.data["live"] = results
    section = f"live pod settings (interceptd node, {NAMESPACES} namespaces, {CHANGES} ConfigMap changes of one pod)"
    report.row(section, "excluded CIDRs", "write to in force: median", "p99", "max", "agent reload: median", "p99",
               "others untouched")
    for r in results:
        report.row(section, str(r["cidrs"]), ms(r["latency_s"]["median"]), ms(r["latency_p99_s"]),
                   ms(r["latency_s"]["max"]), ms(r["reload_s"]["median"]), ms(r["reload_p99_s"]),
                   str(r["others_untouched"]))
    report.note(f"live: write to in force is a ConfigMap-style `..data` swap until the pod's set holds the new "
                f"elements, polled from outside; target: every change within {IN_FORCE_S:g} s")
