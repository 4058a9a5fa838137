"""`interceptd node`: one agent keeps 100 pod namespaces; drift repaired per namespace; forgets, restarts.

Most namespaces are cheap (an address on lo, in a private directory the agent watches); five are netlab
pods (veth to a peer) bound into the same directory, where real connections show the interception.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from support.netlab import Lab, call_in, tcp_request, wait_until
from support.nodelab import CniNode, NodeAgent, NsDir, table_listing

from interceptd.ruleset.nftjson import normalise
from interceptd.system.kernel import NftKernel

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
pytest.importorskip("nftables")

CHEAP, LABS = 95, 5
NODE_TOML = 'service_cidr = "*"\ninbound_ports = "*"\nlocal_exclude_ports = [15020, 15021, 15090]\n'
TABLE = "interceptd"


def _listing(path: str) -> list[dict[str, object]] | None:
    listing = NftKernel(netns=path).list_table(TABLE)
    return None if listing is None else normalise(listing)


def _handles(path: str) -> list[int]:
    """Rule handles change with every re-apply (flush and add): equal handles = untouched."""
    import nftables

    from interceptd.system.netns import entered

    with entered(path):
        nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(True)
    rc, out, _ = nft.cmd(f"list table inet {TABLE}")
    assert rc == 0
    import json

    return [item["rule"]["handle"] for item in json.loads(out)["nftables"] if "rule" in item]


def _do(path: str, *commands: dict[str, object]) -> None:
    NftKernel(netns=path).apply({"nftables": list(commands)})


@pytest.fixture(scope="module")
def node_ns() -> Iterator[tuple[NsDir, list[Lab], str]]:
    with ExitStack() as stack:
        nsdir = stack.enter_context(NsDir())
        labs = [stack.enter_context(Lab()) for _ in range(LABS)]
        for i in range(CHEAP):
            nsdir.add(f"pod{i:03d}", f"198.51.100.{i + 1}/32")
        for i, lab in enumerate(labs):
            nsdir.bind(f"lab{i}", f"/run/netns/{lab.pod}")
        conf = os.path.join(nsdir.path + "-etc")
        os.makedirs(os.path.join(conf, "netns.d"), exist_ok=True)
        stack.callback(lambda: __import__("shutil").rmtree(conf, ignore_errors=True))
        with open(os.path.join(conf, "node.toml"), "w", encoding="utf-8") as fh:
            fh.write(NODE_TOML)
        with open(os.path.join(conf, "netns.d", "lab1.toml"), "w", encoding="utf-8") as fh:
            fh.write('service_exclude_cidr = ["203.0.113.0/24"]\n')
        yield nsdir, labs, conf


def _agent(nsdir: NsDir, conf: str) -> NodeAgent:
    return NodeAgent(os.path.join(conf, "state"), nsdir.path, ("--config", os.path.join(conf, "node.toml")),
                     {"INTERCEPTD_NETNS_CONFIG_DIR": os.path.join(conf, "netns.d")})


def _path(nsdir: NsDir, name: str) -> str:
    return os.path.join(nsdir.path, name)


def test_one_agent_keeps_a_hundred_namespaces(node_ns: tuple[NsDir, list[Lab], str]) -> None:
    nsdir, labs, conf = node_ns
    names = list(nsdir.names)
    assert len(names) == CHEAP + LABS
    agent = _agent(nsdir, conf)
    try:
        agent.start()
        # Every namespace holds the ruleset, seen from the kernel and from the agent's metrics.
        reference = {name: _listing(_path(nsdir, name)) for name in names}
        assert all(reference.values())
        metrics = agent.metrics()
        assert metrics['interceptd_node_namespaces{source="dir"}'] == len(names)
        assert all(metrics[f'interceptd_ready{{netns="{name}"}}'] == 1 for name in names)
        # Real connections in the lab pods are intercepted; lab1's drop-in excludes 203.0.113.0/24.
        for i, lab in enumerate(labs):
            lab.serve(lab.pod, "proxy", tcp=[15001, 15006])
            lab.serve(lab.peer, "peer", tcp=[9999])
            assert call_in(lab.pod, tcp_request, "198.51.100.1", 9999).startswith("proxy 15001 198.51.100.1:9999")
            direct = call_in(lab.pod, tcp_request, "203.0.113.1", 9999)
            assert direct.startswith("peer 9999 -" if i == 1 else "proxy 15001 203.0.113.1:9999"), direct
            assert lab.request(lab.peer, lab.pod_ip, 8080).startswith(f"proxy 15006 {lab.pod_ip}:8080")

        # Drift in 10 namespaces (flushed chain, deleted table, foreign rule): each repaired within 1 s.
        drifted = names[::10]
        for n, name in enumerate(drifted):
            path = _path(nsdir, name)
            chain = {"family": "inet", "table": TABLE, "name": "istio-output"}
            kind = n % 3
            if kind == 0:
                _do(path, {"flush": {"chain": chain}})
            elif kind == 1:
                _do(path, {"delete": {"table": {"family": "inet", "name": TABLE}}})
            else:
                _do(path, {"add": {"rule": {"family": "inet", "table": TABLE, "chain": "istio-output",
                                            "expr": [{"accept": None}]}}})
            started = time.monotonic()
            assert wait_until(lambda p=path, r=reference[name]: _listing(p) == r, 1.0, 0.01), name
            assert time.monotonic() - started < 1.0
        metrics = agent.metrics()
        for name in drifted:
            assert sum(v for k, v in metrics.items()
                       if k.startswith("interceptd_drift_repairs_total{") and f'netns="{name}"' in k) == 1
        assert lab_intercepts(labs[0])

        # Deleted namespaces are forgotten: their series go, their state files too.
        gone = names[1:100:10]
        for name in gone:
            nsdir.remove(name)
        assert wait_until(lambda: not any(f'netns="{n}"' in k for k in agent.metrics() for n in gone), 5.0, 0.1)
        assert agent.metrics()['interceptd_node_namespaces{source="dir"}'] == len(names) - len(gone)
        assert not any(os.path.exists(os.path.join(conf, "state", "netns", f"{n}.json")) for n in gone)
        kept = [n for n in names if n not in gone]

        # Restart: the rules stay while the agent is away and are re-adopted untouched afterwards ...
        handles = {name: _handles(_path(nsdir, name)) for name in kept}
        agent.stop()
        assert all(_listing(_path(nsdir, name)) == reference[name] for name in kept)
        # ... except what changed meanwhile: drift in one namespace is repaired, a deleted one is forgotten.
        _do(_path(nsdir, kept[5]), {"flush": {"chain": {"family": "inet", "table": TABLE, "name": "istio-output"}}})
        nsdir.remove(kept[6])
        agent.start()
        assert agent.get("/readyz")[0] == 200
        metrics = agent.metrics()
        assert metrics['interceptd_node_namespaces{source="dir"}'] == len(kept) - 1
        untouched = [n for n in kept if n not in (kept[5], kept[6])]
        assert all(_handles(_path(nsdir, name)) == handles[name] for name in untouched)
        assert _listing(_path(nsdir, kept[5])) == reference[kept[5]]
        adopted = {e["netns"]: e["adopted"] for e in agent.events() if e.get("event") == "manage"}
        assert adopted == {**dict.fromkeys(untouched, True), kept[5]: False}
        assert lab_intercepts(labs[0])
    finally:
        agent.stop()


def lab_intercepts(lab: Lab) -> bool:
    return str(call_in(lab.pod, tcp_request, "198.51.100.9", 9999)).startswith("proxy 15001 198.51.100.9:9999")


def test_cni_registrations_reach_the_node_agent() -> None:
    from support.netlab import delete_ns, new_ns

    with CniNode() as node:
        agent = NodeAgent(node.state_dir)
        pods = [new_ns("-pod"), new_ns("-pod")]
        try:
            agent.start()
            first = node.chain("ADD", pods[0], "c-1", args="K8S_POD_NAMESPACE=demo")
            assert all(r.rc == 0 for r in first) and "warning" not in first[-1].stderr
            path = f"/run/netns/{pods[0]}"
            # Registered and adopted: the agent did not re-apply what the plugin had just applied.
            assert agent.metrics()[f'interceptd_ready{{netns="{pods[0]}"}}'] == 1
            assert [e["adopted"] for e in agent.events() if e.get("event") == "manage"] == [True]
            reference = _listing(path)
            _do(path, {"flush": {"chain": {"family": "inet", "table": TABLE, "name": "istio-output"}}})
            assert wait_until(lambda: _listing(path) == reference, 1.0, 0.01)
            # While the agent is down, a pod arrives: protected by the plugin, adopted at the agent's start.
            agent.stop()
            second = node.chain("ADD", pods[1], "c-2")
            assert second[-1].rc == 0 and "not reachable" in second[-1].stderr
            agent.start()
            assert agent.metrics()['interceptd_node_namespaces{source="cni"}'] == 2
            # DEL: the agent forgets the pod and does not "repair" the table DEL removes.
            assert all(r.rc == 0 for r in node.chain("DEL", pods[0], "c-1", cached=first[-1].out))
            assert not any(f'netns="{pods[0]}"' in k for k in agent.metrics())
            time.sleep(0.3)
            assert table_listing(pods[0]) is None
            assert agent.metrics()['interceptd_node_namespaces{source="cni"}'] == 1
        finally:
            agent.stop()
            for pod in pods:
                delete_ns(pod)
