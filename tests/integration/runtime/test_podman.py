"""A real container runtime: podman (CNI backend) runs containers on the shipped conflist, interceptd-cni last.

Each test gets its own node (support.podmanlab: a network namespace and a private mount namespace the test
made, podman's state in a temp dir, a busybox rootfs); the proxy listeners run from the test inside each
container's network namespace, and the connections are made by the container's own processes (`podman exec
... nc`) or from the node, so what is checked is exactly what a pod would see.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from support.netlab import Server, call_in, sh, tcp_request, wait_until
from support.podmanlab import CONFLIST, GATEWAY, Container, PodmanNode, missing

from interceptd.ruleset.nftjson import normalise
from interceptd.system.kernel import NftKernel

pytestmark = [pytest.mark.netns, pytest.mark.skipif(bool(missing()), reason=f"podman cannot run: {missing()}")]
pytest.importorskip("nftables")

TABLE = "interceptd"
EXCLUDE = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
NODE_ADDRESS = "198.51.100.5"  # on the node's lo: a destination outside the pods' network


@pytest.fixture
def node() -> Iterator[PodmanNode]:
    with PodmanNode() as n:
        yield n


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def _proxy(servers: list[Server], container: Container) -> None:
    """The sidecar's listeners in the container's namespace: outbound capture :15001, inbound :15006."""
    servers.append(Server(container.netns, "proxy", (15001, 15006)).start())


def _node_server(node: PodmanNode, servers: list[Server]) -> None:
    """A server on the node itself (NODE_ADDRESS:80): what a connection reaches when it is not captured."""
    sh("ip", "addr", "add", f"{NODE_ADDRESS}/32", "dev", "lo", ns=node.node)
    servers.append(Server(node.node, "node", (80,)).start())


def _nc(node: PodmanNode, container: Container, host: str, port: int) -> str:
    return node.exec(container, f"nc -w 2 {host} {port} </dev/null")


def _record(node: PodmanNode, container: Container) -> dict[str, object] | None:
    """The CNI plugin's state record of the container's namespace (keyed by the namespace's name)."""
    path = os.path.join(node.state_dir, "netns", f"{container.sandbox}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        record: dict[str, object] = json.load(fh)
    return record


def _listing(netns: str) -> list[dict[str, object]] | None:
    listing = NftKernel(netns=netns).list_table(TABLE)
    return None if listing is None else normalise(listing)


def _nft(container: Container, *args: str) -> str:
    return subprocess.run(["nsenter", f"--net={container.netns}", "nft", *args], check=True, text=True,
                          capture_output=True).stdout


def test_add_with_podmans_cni_args_captures_outbound_and_inbound(node: PodmanNode, servers: list[Server]) -> None:
    # podman passes IgnoreUnknown=1;K8S_POD_NAME=<name>, plus the CNI_ARGS of its own environment.
    pod = node.run("web", env={"CNI_ARGS": f"{EXCLUDE}=198.51.100.0/24"})
    record = _record(node, pod)
    assert record is not None and record["container_id"] == pod.id and record["source"] == "cni"
    assert record["path"] == f"/run/netns/{pod.sandbox}"
    assert isinstance(record["settings"], dict) and record["settings"]["service_exclude_cidr"] == "198.51.100.0/24"
    _proxy(servers, pod)
    _node_server(node, servers)
    # The container's own connection lands on its proxy with the original destination (SO_ORIGINAL_DST) ...
    assert _nc(node, pod, "192.0.2.7", 80).startswith("proxy 15001 192.0.2.7:80")
    assert _nc(node, pod, GATEWAY, 8080).startswith(f"proxy 15001 {GATEWAY}:8080")
    # ... except the range excluded by the CNI_ARGS annotation, which reaches the node for real.
    assert _nc(node, pod, NODE_ADDRESS, 80).startswith("node 80 -")
    # Inbound from the node to the container's address lands on :15006 with its original destination.
    assert call_in(node.node, tcp_request, pod.ip, 8080).startswith(f"proxy 15006 {pod.ip}:8080")
    # The host saw none of it: no namespace file, no bridge, no CNI NAT rules, no runtime state.
    assert not os.path.exists(f"/run/netns/{pod.sandbox}")
    assert subprocess.run(["ip", "link", "show", "cni-interceptd0"], capture_output=True).returncode != 0
    assert "CNI-" in sh("iptables-save", "-t", "nat", ns=node.node).stdout
    assert "CNI-" not in sh("nft", "list", "ruleset").stdout
    assert not os.path.exists(f"/run/crun/{pod.id}")
    assert not os.path.exists(f"/var/lib/cni/results/{node.network}-{pod.id}-eth0")


def test_stop_and_rm_call_del(node: PodmanNode) -> None:
    pod = node.run("short")
    assert _record(node, pod) is not None and _listing(pod.netns) is not None
    # Hold the namespace open: after the container is gone, it shows what DEL left in it.
    held = os.open(pod.netns, os.O_RDONLY)
    try:
        node.podman("stop", "-t", "0", pod.name)
        assert _record(node, pod) is None
        assert _listing(f"/proc/{os.getpid()}/fd/{held}") is None
    finally:
        os.close(held)
    # Started again: a new namespace, a new ADD; `rm -f` of the running container calls DEL once more.
    node.podman("start", pod.name)
    again = node.container(pod.name)
    assert again.sandbox != pod.sandbox and _record(node, again) is not None
    node.podman("rm", "-f", "-t", "0", pod.name)
    assert _record(node, again) is None
    assert os.listdir(os.path.join(node.state_dir, "netns")) == []


def test_a_run_rm_containers_first_connection_is_captured_and_rm_calls_del(node: PodmanNode,
                                                                          servers: list[Server]) -> None:
    # ADD has installed the table before the container's first process runs: its very first connection is
    # redirected to the proxy port (nothing listens there yet: refused), it never reaches the node's server.
    _node_server(node, servers)
    out = node.run_rm("sh", "-c", f"nc -w 2 {NODE_ADDRESS} 80 </dev/null 2>&1; true")
    assert "Connection refused" in out and "node 80" not in out, out
    assert os.listdir(os.path.join(node.state_dir, "netns")) == []


def test_a_second_container_on_the_network_is_captured_too(node: PodmanNode, servers: list[Server]) -> None:
    first, second = node.run("one"), node.run("two")
    assert first.ip != second.ip and first.sandbox != second.sandbox
    assert _record(node, first) is not None and _record(node, second) is not None
    for pod in (first, second):
        _proxy(servers, pod)
    # Container to container: captured on the way out of the first, and on the way into the second.
    assert _nc(node, first, second.ip, 8080).startswith(f"proxy 15001 {second.ip}:8080 {first.ip}")
    assert _nc(node, second, first.ip, 8080).startswith(f"proxy 15001 {first.ip}:8080 {second.ip}")
    assert call_in(first.netns, tcp_request, second.ip, 8080, 2.0, None, uid=1337, gid=1337).startswith(
        f"proxy 15006 {second.ip}:8080 {first.ip}")  # the proxy's uid is not captured outbound: inbound is
    assert call_in(node.node, tcp_request, first.ip, 9090).startswith(f"proxy 15006 {first.ip}:9090")


def test_a_published_port_reaches_the_inbound_capture(node: PodmanNode, servers: list[Server]) -> None:
    # `-p`: the portmap plugin's DNAT (in the node namespace) sends the node's port to the container's port 80,
    # where the container's own rules capture it for the inbound listener, with the port it was mapped to.
    pod = node.run("published", flags=("-p", "8080:80"))
    _proxy(servers, pod)
    assert call_in(node.node, tcp_request, GATEWAY, 8080).startswith(f"proxy 15006 {pod.ip}:80")


def test_the_node_agent_adopts_podmans_namespaces_and_repairs_drift(node: PodmanNode) -> None:
    pods = [node.run("a"), node.run("b")]
    reference = {pod.name: _listing(pod.netns) for pod in pods}
    handles = {pod.name: _handles(pod) for pod in pods}
    agent = node.agent()
    try:
        agent.start()
        # Adopted: every namespace podman made is known and ready, its table untouched (same rule handles).
        metrics = agent.metrics()
        assert metrics['interceptd_node_namespaces{source="cni"}'] == 2
        assert all(metrics[f'interceptd_ready{{netns="{pod.sandbox}"}}'] == 1 for pod in pods)
        assert all(_handles(pod) == handles[pod.name] for pod in pods)
        # A container started while the agent runs is registered by the CNI plugin at once.
        third = node.run("c")
        assert wait_until(lambda: agent.metrics().get(f'interceptd_ready{{netns="{third.sandbox}"}}') == 1, 5.0, 0.1)
        # Drift inside podman's namespaces: a deleted table, a deleted rule; each is put back.
        first, second = pods
        _nft(first, "delete", "table", "inet", TABLE)
        assert wait_until(lambda: _listing(first.netns) == reference[first.name], 5.0, 0.02)
        rule = _handles(second)[0]
        _nft(second, "delete", "rule", "inet", TABLE, rule[0], "handle", str(rule[1]))
        assert wait_until(lambda: _listing(second.netns) == reference[second.name], 5.0, 0.02)
        metrics = agent.metrics()
        for pod in (first, second):
            assert sum(v for k, v in metrics.items()
                       if k.startswith("interceptd_drift_repairs_total{") and f'netns="{pod.sandbox}"' in k) >= 1
        # A container removed with podman is forgotten: DEL unregisters it, its series go.
        node.podman("rm", "-f", "-t", "0", third.name)
        assert wait_until(lambda: not any(third.sandbox in k for k in agent.metrics()), 5.0, 0.1)
        assert agent.metrics()['interceptd_node_namespaces{source="cni"}'] == 2
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.stop()


def _handles(container: Container) -> list[tuple[str, int]]:
    """(chain, handle) of every rule: handles change with every rewrite, so equal handles = untouched."""
    items = json.loads(_nft(container, "-j", "-a", "list", "table", "inet", TABLE))["nftables"]
    return [(item["rule"]["chain"], item["rule"]["handle"]) for item in items if "rule" in item]


def test_the_shipped_conflist_is_the_one_in_use(node: PodmanNode) -> None:
    """Only the subnet and the paths differ from config/cni: the tests above ran the shipped chain."""
    shipped = json.loads(CONFLIST.read_text())
    with open(os.path.join(node.tmp, "net.d", CONFLIST.name), encoding="utf-8") as fh:
        used = json.load(fh)
    for conf in (shipped, used):
        conf["plugins"][0]["ipam"].pop("ranges")
        conf["plugins"][0]["ipam"].pop("dataDir", None)
        conf["plugins"][-1]["interceptd"].pop("state_dir")
    assert used == shipped
    assert [p["type"] for p in shipped["plugins"]][-1] == "interceptd-cni"
