"""Live per-pod settings under the node agent, without a gap: two pods, probers that never pause (outbound and
inbound in each), and 200 changes of one pod's exclusions through its settings file in the node's
configuration directory, laid out as a mounted ConfigMap (`..data` swapped by rename, as the kubelet does).

What must hold: no connection of either pod bypasses the proxy; the other pod's table is never rewritten (its
generation and rule handles stay); the changed pod's rules are never rewritten either (only its sets: its
rule handles stay and its counters continue); each change is in force within 1 s of the write. The latency
from write to in force is printed (median, p99). A file that does not parse is refused with one log line
naming the pod's namespace, the file and the key, and the rules stay. The readiness file is there while
every pod is verified, and goes with the agent.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from support.configmap import ConfigMapDir
from support.gaplab import Prober
from support.netlab import Lab, wait_until
from support.nodelab import NodeAgent, NsDir

from interceptd.ruleset import names as N
from interceptd.runtime import nodestate
from interceptd.runtime.readiness import READY_FILE
from interceptd.system.kernel import NftKernel

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
pytest.importorskip("nftables")

CHANGES = 200
IN_FORCE_S = 1.0  # each change in force within 1 s of the write
PROBE_PAUSE_S = 0.002  # four probers, each some 300 connections a second: the agent keeps a share of 2 cores
WAIT_S = 10.0  # how long a change is waited for, so that a late one is measured (and reported) too
NODE_TOML = 'service_cidr = "*"\ninbound_ports = "*"\nlocal_exclude_ports = [15020, 15021, 15090]\n'
# Both settings leave the probed flows (outbound 198.51.100.1:9999, inbound :80) captured, so any connection
# that reaches the real destination while the kernel switches between them is a gap.
SETTINGS = ('service_exclude_cidr = ["203.0.113.0/25"]\nlocal_exclude_ports = [15020, 15021, 15090]\n'
            'local_outbound_ports_exclude = [2000]\n',
            'service_exclude_cidr = ["203.0.113.128/25", "192.0.2.200/32"]\n'
            'local_exclude_ports = [15020, 15021, 15092]\nlocal_outbound_ports_exclude = [2002, 2004]\n')
WATCHED_SETS = (N.SET_EXCLUDE_CIDRS[4], N.SET_INBOUND_EXCLUDE_PORTS, N.SET_OUTBOUND_EXCLUDE_PORTS)


def _listing(path: str, kernel: NftKernel | None = None) -> list[dict[str, Any]]:
    listing = (kernel or NftKernel(netns=path, keep_context=False)).list_table("interceptd")
    assert listing is not None
    return listing


def _sets(listing: list[dict[str, Any]]) -> str:
    """The watched sets' elements, as one comparable text."""
    found = {i["set"]["name"]: i["set"].get("elem", []) for i in listing if "set" in i}
    return json.dumps([found.get(name) for name in WATCHED_SETS], sort_keys=True)


def _handles(listing: list[dict[str, Any]]) -> list[int]:
    return [i["rule"]["handle"] for i in listing if "rule" in i]


def _packets(listing: list[dict[str, Any]]) -> dict[str, int]:
    return {i["counter"]["name"]: i["counter"]["packets"] for i in listing if "counter" in i}


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 1), "p99": round(ordered[len(ordered) * 99 // 100], 1),
            "max": round(ordered[-1], 1)}


def _generation(state_dir: str, name: str) -> int:
    reply = nodestate.request(state_dir, {"op": "status", "name": name})
    assert reply["ok"], reply
    return int(reply["generation"])


@pytest.fixture
def node() -> Iterator[tuple[NsDir, list[Lab], str]]:
    with ExitStack() as stack:
        nsdir = stack.enter_context(NsDir())
        labs = [stack.enter_context(Lab()) for _ in range(2)]
        for i, lab in enumerate(labs):
            nsdir.bind(f"lab{i}", f"/run/netns/{lab.pod}")
            lab.serve(lab.pod, "pod", tcp=(15001, 15006, 80))
            lab.serve(lab.peer, "peer", tcp=[9999])
        conf = nsdir.path + "-etc"
        os.makedirs(conf)
        stack.callback(shutil.rmtree, conf, True)
        with open(os.path.join(conf, "node.toml"), "w", encoding="utf-8") as fh:
            fh.write(NODE_TOML)
        yield nsdir, labs, conf


def test_live_changes_of_one_pod_leave_no_gap_and_the_other_pod_alone(node: tuple[NsDir, list[Lab], str]) -> None:
    nsdir, labs, conf = node
    settings = ConfigMapDir(os.path.join(conf, "netns.d"))
    settings.publish({"lab0.toml": SETTINGS[0]})
    state = os.path.join(conf, "state")
    agent = NodeAgent(state, nsdir.path, ("--config", os.path.join(conf, "node.toml")),
                      {"INTERCEPTD_NETNS_CONFIG_DIR": settings.path})
    changed, other = os.path.join(nsdir.path, "lab0"), os.path.join(nsdir.path, "lab1")
    try:
        agent.start()
        assert os.path.exists(os.path.join(state, READY_FILE))
        assert agent.metrics()["interceptd_node_pods_verified"] == 1
        before = {path: _listing(path) for path in (changed, other)}
        seen = [_sets(before[changed])]
        generations = (_generation(state, "lab0"), _generation(state, "lab1"))
        probers = [Prober(lab, direction, PROBE_PAUSE_S) for lab in labs for direction in ("outbound", "inbound")]
        latencies: list[float] = []
        kernel = NftKernel(netns=changed)  # one context for the polls: each listing costs less than a new one
        try:
            time.sleep(0.3)
            for n in range(1, CHANGES + 1):
                settings.publish({"lab0.toml": SETTINGS[n % 2]})
                written = time.monotonic()
                if len(seen) < 2:  # the second setting's spelling in the kernel: the first listing that differs
                    assert wait_until(lambda: _sets(_listing(changed, kernel)) != seen[0], WAIT_S, 0.003), n
                    seen.append(_sets(_listing(changed, kernel)))
                else:
                    assert wait_until(lambda n=n: _sets(_listing(changed, kernel)) == seen[n % 2], WAIT_S, 0.003), n
                latencies.append(time.monotonic() - written)
            time.sleep(0.3)
        finally:
            samples = [p.stop() for p in probers]
        reloads = [e["duration_ms"] for e in agent.events() if e.get("event") == "reload" and e.get("netns") == "lab0"]
        figures = {"changes": len(latencies), "write_to_in_force_ms": _spread([t * 1000 for t in latencies]),
                   "agent_reload_ms": _spread(reloads),
                   "probes": {f"lab{i // 2}-{s.direction}": {o: s.count(o) for o in ("ok", "bypass", "fail")}
                              for i, s in enumerate(samples)}}
        print("live settings:", json.dumps(figures))
        assert max(latencies) < IN_FORCE_S, figures
        for s in samples:
            assert s.count("ok") > 0 and s.count("bypass") == 0 and s.count("fail") == 0, figures
        after = {path: _listing(path) for path in (changed, other)}
        # The other pod: never rewritten. The changed pod: a new generation per change, its sets alone rewritten.
        assert _generation(state, "lab1") == generations[1]
        assert _handles(after[other]) == _handles(before[other])
        assert _generation(state, "lab0") == generations[0] + CHANGES
        assert _handles(after[changed]) == _handles(before[changed])
        assert all(after_n >= _packets(before[changed])[name] for name, after_n in _packets(after[changed]).items())
        assert sum(_packets(after[changed]).values()) > sum(_packets(before[changed]).values())

        # A change that does not parse: one log line naming the pod, its file and the key; the rules stay.
        settings.publish({"lab0.toml": 'service_exclude_cidr = ["203.0.113.0/33"]\n'})
        refused = lambda: [e for e in agent.events()  # noqa: E731
                           if e.get("event") == "reload" and e.get("netns") == "lab0" and e.get("error")]
        assert wait_until(lambda: len(refused()) == 1, 5.0, 0.02), agent.logs()[-2000:]
        time.sleep(0.3)
        (line,) = refused()
        assert "lab0.toml" in line["error"] and "service_exclude_cidr" in line["error"], line
        assert _sets(_listing(changed)) == seen[CHANGES % 2]
        assert agent.get("/readyz")[0] == 200
    finally:
        agent.stop()
    assert not os.path.exists(os.path.join(state, READY_FILE))
