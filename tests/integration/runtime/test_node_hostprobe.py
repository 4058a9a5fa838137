"""`interceptd node --ambient-host-rules`: the host probe table in the node's own namespace, with real traffic.

The node is a namespace the test makes (support.hostprobe.AmbientNode), and the node agent runs inside it, so
the one table interceptd writes outside pods lands there, never in the host's namespace. Ambient pods come
through the real CNI chain; a kubelet probe is a TCP connection from the node namespace as uid 0.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from support.hostprobe import HOST_TABLE, AmbientNode, peer_server, pod_address, probe_set, tables
from support.netlab import call_in, sh, tcp_request, wait_until
from support.nodelab import NODE_IP, NODE_IP6, NsDir, table_listing

pytestmark = pytest.mark.netns
pytest.importorskip("nftables")

PROBE = {4: "169.254.7.127", 6: "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"}
NODE = {4: NODE_IP, 6: NODE_IP6}
APP_PORT, ZTUNNEL_INBOUND = 8080, 15006


@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_a_kubelet_probe_arrives_from_the_probe_address_and_others_do_not(version: int) -> None:
    with AmbientNode(v6=version == 6) as node:
        node.start()
        pod = node.add_pod()
        address = pod_address(pod, version)
        assert wait_until(lambda: probe_set(node.cni.node, version) == [address], 5.0), \
            (probe_set(node.cni.node, version), node.agent.logs()[-2000:])
        with peer_server(pod, APP_PORT, ZTUNNEL_INBOUND):
            # The kubelet (uid 0): SNATed on the node, let through by the pod's probe-accept to the app itself.
            assert call_in(node.cni.node, tcp_request, address, APP_PORT) == f"{APP_PORT} {PROBE[version]}"
            # Another uid on the node: not SNATed, so the pod's inbound capture sends it to the node proxy.
            assert call_in(node.cni.node, tcp_request, address, APP_PORT, uid=1000, gid=1000) == \
                f"{ZTUNNEL_INBOUND} {NODE[version]}"


def test_the_sets_follow_the_pods_and_element_changes_leave_the_table_alone() -> None:
    with AmbientNode() as node:
        node.start()
        assert probe_set(node.cni.node, 4) == []
        handles = _rule_handles(node.cni.node)
        first = node.add_pod()
        second = node.add_pod()
        both = sorted([pod_address(first, 4), pod_address(second, 4)])
        assert wait_until(lambda: sorted(probe_set(node.cni.node, 4) or []) == both, 5.0)
        remaining = pod_address(second, 4)
        node.delete_pod(first)
        assert wait_until(lambda: probe_set(node.cni.node, 4) == [remaining], 5.0)
        # Pods came and went as element changes: the rules were never rewritten (a table rewrite flushes them,
        # and rules added again get new handles), and nothing was taken for drift.
        assert _rule_handles(node.cni.node) == handles
        events = [e["event"] for e in node.agent.events() if e.get("table") == HOST_TABLE]
        assert events.count("start") == 1 and "pods" in events and "repair" not in events, events


def _rule_handles(node: str) -> list[str]:
    out = sh("nft", "-a", "list", "chain", "inet", HOST_TABLE, "postrouting", ns=node).stdout
    return [line.split("# handle")[1].strip() for line in out.splitlines() if "comment" in line]


def test_a_ruleset_flush_in_the_node_is_repaired_within_a_second() -> None:
    """What a firewalld reload does: every table goes; the host table is back within 1 s, probes work again."""
    with AmbientNode() as node:
        node.start()
        pod = node.add_pod()
        address = pod_address(pod, 4)
        assert wait_until(lambda: probe_set(node.cni.node, 4) == [address], 5.0)
        sh("nft", "flush", "ruleset", ns=node.cni.node)
        assert wait_until(lambda: probe_set(node.cni.node, 4) == [address], 1.0, 0.01), \
            node.agent.logs()[-2000:]
        with peer_server(pod, APP_PORT, ZTUNNEL_INBOUND):
            assert call_in(node.cni.node, tcp_request, address, APP_PORT) == f"{APP_PORT} {PROBE[4]}"
        assert any(e["event"] == "repair" and e.get("table") == HOST_TABLE for e in node.agent.events())


def test_drift_in_an_ambient_pod_is_repaired_within_a_second() -> None:
    with AmbientNode() as node:
        node.start()
        pod = node.add_pod()
        assert wait_until(lambda: (table_listing(pod) or "").count('"rule"') > 10, 5.0)
        before = table_listing(pod)
        assert before is not None and "probe-accept" in before
        sh("nft", "flush", "table", "inet", "interceptd", ns=pod)
        assert wait_until(lambda: (table_listing(pod) or "").count('"rule"') == before.count('"rule"'), 1.0, 0.01)


def test_without_the_flag_no_host_table_is_ever_written() -> None:
    with AmbientNode(host_rules=False) as node:
        node.start()
        before = tables(node.cni.node)
        pod = node.add_pod()
        assert wait_until(lambda: table_listing(pod) is not None, 5.0)
        sh("nft", "flush", "ruleset", ns=node.cni.node)  # not even a repair writes one
        # Two periodic passes (INTERCEPTD_RECONCILE_INTERVAL is 2 s in the lab) and a pod's removal later:
        assert not wait_until(lambda: any(HOST_TABLE in t for t in tables(node.cni.node)), 4.5, 0.05)
        node.delete_pod(pod)
        assert not any(HOST_TABLE in t for t in tables(node.cni.node))
        assert all(HOST_TABLE not in t for t in before)


def test_a_watched_ambient_namespace_is_in_the_sets_at_its_own_addresses() -> None:
    """A namespace of the watched directory (made ambient by its drop-in) has no CNI record: the agent reads its
    global addresses off the loopback from the namespace itself, also those it gets after it appeared."""
    with NsDir() as nsdir, AmbientNode() as node:
        file = os.path.join(nsdir.path, "amb-dir")
        open(file, "w").close()
        nsdir.names.append("amb-dir")
        # Interfaces with no address yet (a veth pair inside it: no module needed); lo holds 127.0.0.1 only.
        subprocess.run(["unshare", f"--net={file}", "sh", "-c", "ip link set lo up && ip link add eth0 type veth "
                        "peer name eth1 && ip link set eth0 up && ip link set eth1 up"], check=True)
        settings = nsdir.path + "-etc"
        os.makedirs(settings)
        try:
            with open(os.path.join(settings, "amb-dir.toml"), "w", encoding="utf-8") as fh:
                fh.write('capture_mode = "ambient"\n')
            node.agent.env.update({"INTERCEPTD_NETNS_DIR": nsdir.path, "INTERCEPTD_NETNS_CONFIG_DIR": settings})
            node.agent.start(wait_ready=0)
            assert wait_until(lambda: probe_set(node.cni.node, 4) == [], 30.0), node.agent.logs()[-2000:]
            nsdir.run_in("amb-dir", "ip", "addr", "add", "198.51.100.20/24", "dev", "eth0")
            nsdir.run_in("amb-dir", "ip", "addr", "add", "2001:db8::20/64", "dev", "eth0", "nodad")
            # The next periodic pass (2 s here) reads them.
            assert wait_until(lambda: probe_set(node.cni.node, 4) == ["198.51.100.20"]
                              and probe_set(node.cni.node, 6) == ["2001:db8::20"], 10.0), \
                (probe_set(node.cni.node, 4), node.agent.logs()[-2000:])
            assert table_listing(node.cni.node, HOST_TABLE) is not None
            nsdir.run_in("amb-dir", "ip", "addr", "del", "198.51.100.20/24", "dev", "eth0")
            assert wait_until(lambda: probe_set(node.cni.node, 4) == [], 10.0), probe_set(node.cni.node, 4)
        finally:
            shutil.rmtree(settings, ignore_errors=True)
