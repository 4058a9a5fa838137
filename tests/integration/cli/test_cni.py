"""interceptd-cni driven through the real CNI protocol, chained after Debian's bridge + host-local plugins.

The runtime's part is played by nodelab.CniNode: every plugin runs inside a node namespace the test made;
the pod namespace gets its eth0 (192.0.2.x) from the bridge plugin, then interceptd-cni programs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from support.netlab import Server, call_in, delete_ns, new_ns, sh, tcp_request
from support.nodelab import NODE_IP, CniNode, table_listing

from interceptd.ruleset import names as N

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
pytest.importorskip("nftables")
if not os.path.exists("/usr/lib/cni/bridge"):
    pytest.skip("containernetworking-plugins is not installed (make deps)", allow_module_level=True)

EXCLUDE = "traffic.sidecar.istio.io/excludeOutboundIPRanges"


@pytest.fixture
def node() -> Iterator[CniNode]:
    with CniNode() as n:
        yield n


@pytest.fixture
def pod() -> Iterator[str]:
    name = new_ns("-pod")
    yield name
    delete_ns(name)


def _serve(ns: str, label: str, *ports: int) -> Server:
    return Server(ns, label, tuple(ports)).start()


def _pod_ip(pod: str) -> str:
    out = sh("ip", "-4", "-o", "addr", "show", "dev", "eth0", ns=pod).stdout
    return out.split("inet ")[1].split("/")[0]


def test_add_intercepts_real_connections_and_passes_prev_result(node: CniNode, pod: str) -> None:
    bridge, own = node.chain("ADD", pod, "c-add", args=f"K8S_POD_NAMESPACE=demo;{EXCLUDE}=203.0.113.0/24")
    assert bridge.rc == 0 and own.rc == 0, own.stderr
    assert own.out == bridge.out  # chained: the previous result is passed through unchanged
    assert "node agent not reachable" in own.stderr  # no agent: a warning, the pod is protected anyway
    sh("ip", "addr", "add", "203.0.113.5/32", "dev", "lo", ns=node.node)
    servers = [_serve(pod, "proxy", 15001), _serve(pod, "inbound", 15006), _serve(node.node, "node", 80, 8080)]
    try:
        # Outbound from the pod goes to the proxy with its original destination ...
        assert call_in(pod, tcp_request, "198.51.100.7", 80).startswith("proxy 15001 198.51.100.7:80")
        assert call_in(pod, tcp_request, NODE_IP, 8080).startswith("proxy 15001 192.0.2.1:8080")
        # ... except the annotation's excluded range, which reaches the node for real.
        assert call_in(pod, tcp_request, "203.0.113.5", 80).startswith("node 80 -")
        # Inbound to the pod goes to the inbound capture port; 15021 (sidecar health) is always excluded.
        pod_ip = _pod_ip(pod)
        assert call_in(node.node, tcp_request, pod_ip, 8080).startswith(f"inbound 15006 {pod_ip}:8080")
        assert call_in(node.node, tcp_request, pod_ip, 15021, 1.0) == "refused"
    finally:
        for server in servers:
            server.stop()


def test_check_and_del_follow_the_spec(node: CniNode, pod: str) -> None:
    added = node.chain("ADD", pod, "c-chk")
    cached = added[-1].out
    assert [r.rc for r in node.chain("CHECK", pod, "c-chk", cached=cached)] == [0, 0]
    # Drift: CHECK reports it with the CNI specification's error JSON, naming what changed.
    sh("nft", "flush", "chain", "inet", "interceptd", N.ISTIO_OUTPUT, ns=pod)
    res = node.exec(node.plugins()[1], "CHECK", f"/run/netns/{pod}", "c-chk", prev=cached)
    assert res.rc != 0 and res.out is not None
    assert res.out["code"] == 101 and "does not match" in res.out["msg"]
    assert N.ISTIO_OUTPUT in res.out["details"]
    # Other settings than ADD's (an annotation appeared): CHECK fails too.
    node.chain("ADD", pod, "c-chk")  # a re-ADD repairs
    res = node.exec(node.plugins()[1], "CHECK", f"/run/netns/{pod}", "c-chk", args=f"{EXCLUDE}=10.0.0.0/8",
                    prev=cached)
    assert res.out is not None and res.out["code"] == 101 and "another ruleset" in res.out["msg"]
    # DEL removes the table and the state, and is idempotent (runtimes repeat DEL freely).
    state = os.path.join(node.state_dir, "netns", f"{pod}.json")
    assert os.path.exists(state)
    assert [r.rc for r in node.chain("DEL", pod, "c-chk", cached=cached)] == [0, 0]
    assert table_listing(pod) is None and not os.path.exists(state)
    assert node.exec(node.plugins()[1], "DEL", f"/run/netns/{pod}", "c-chk").rc == 0
    # DEL after the namespace is gone, and DEL without CNI_NETNS: nothing to do, still success.
    gone = new_ns("-gone")
    node.chain("ADD", gone, "c-gone")
    delete_ns(gone)
    assert node.exec(node.plugins()[1], "DEL", f"/run/netns/{gone}", "c-gone").rc == 0
    assert node.exec(node.plugins()[1], "DEL", "", "c-gone").rc == 0


def test_version(node: CniNode) -> None:
    res = node.exec(node.plugins()[1], "VERSION", "", "", stdin='{"cniVersion": "1.0.0"}')
    assert res.rc == 0 and res.out is not None
    assert "1.0.0" in res.out["supportedVersions"] and res.out["cniVersion"] == "1.0.0"


@pytest.mark.parametrize(("stdin", "args", "netns", "code", "words"), [
    ("{not json", "", "pod", 6, "not JSON"),
    (None, f"{EXCLUDE}=10.0.0.0/33", "pod", 7, EXCLUDE),
    (None, "sidecar.istio.io/interceptionMode=TPROXYY", "pod", 7, "interceptionMode"),
    (None, "K8S_POD_NAME;x", "pod", 4, "CNI_ARGS"),
    (None, "", "", 4, "CNI_NETNS"),
    (None, "", "/tmp", 3, "not a network namespace"),
    ('{"cniVersion": "9.9.9", "name": "n", "type": "interceptd-cni"}', "", "pod", 1, "9.9.9"),
    ('{"cniVersion": "1.0.0", "name": "n", "type": "interceptd-cni", "interceptd": {"nope": 1}}', "", "pod", 7,
     "'nope'"),
    ('{"cniVersion": "1.0.0", "name": "n", "type": "interceptd-cni", "interceptd": {"envoy_port": 70000}}', "",
     "pod", 7, "envoy_port"),
])
def test_malformed_input_gets_an_error_and_no_rules(node: CniNode, pod: str, stdin: str | None, args: str,
                                                    netns: str, code: int, words: str) -> None:
    before = sh("nft", "-j", "list", "ruleset", ns=pod).stdout
    path = f"/run/netns/{pod}" if netns == "pod" else netns
    res = node.exec(node.plugins()[1], "ADD", path, "c-bad", args=args, stdin=stdin)
    assert res.rc != 0 and res.out is not None, res.stderr
    assert set(res.out) >= {"cniVersion", "code", "msg"} and res.out["code"] == code
    assert words in res.out["msg"], res.out
    assert sh("nft", "-j", "list", "ruleset", ns=pod).stdout == before  # no partial ruleset
    assert not os.path.exists(os.path.join(node.state_dir, "netns"))


def test_excluded_pods_are_left_alone(node: CniNode, pod: str) -> None:
    plugin = {**node.plugins()[1], "exclude_namespaces": ["kube-system"]}
    for args in ("K8S_POD_NAMESPACE=kube-system", "sidecar.istio.io/interceptionMode=NONE"):
        res = node.exec(plugin, "ADD", f"/run/netns/{pod}", "c-ex", args=args, prev={"cniVersion": "1.0.0"})
        assert res.rc == 0 and res.out == {"cniVersion": "1.0.0"}
        assert table_listing(pod) is None


def test_the_state_file_names_the_pods_settings(node: CniNode, pod: str) -> None:
    node.chain("ADD", pod, "c-state", args=f"{EXCLUDE}=203.0.113.0/24")
    with open(os.path.join(node.state_dir, "netns", f"{pod}.json"), encoding="utf-8") as fh:
        record = json.load(fh)
    assert record["source"] == "cni" and record["path"] == f"/run/netns/{pod}"
    assert record["settings"]["service_exclude_cidr"] == "203.0.113.0/24"
    assert record["settings"]["local_exclude_ports"] == "15020,15021,15090"
    assert record["listing"] and record["container_id"] == "c-state"


def _bridged(node: CniNode, pod: str, container: str) -> dict[str, object]:
    """The chain's first plugin alone: the pod gets its eth0 and address, interceptd-cni is run by the test."""
    res = node.exec(node.plugins()[0], "ADD", f"/run/netns/{pod}", container)
    assert res.rc == 0 and res.out is not None, res.stderr
    return res.out


def _no_table_no_state(node: CniNode, pod: str) -> None:
    assert table_listing(pod) is None
    assert sh("ip", "rule", "show", "fwmark", "1337", ns=pod).stdout.strip() == ""
    assert not os.path.exists(os.path.join(node.state_dir, "netns", f"{pod}.json"))


def test_a_failed_add_after_the_transaction_leaves_no_table(node: CniNode, pod: str) -> None:
    # The kernel takes the table, then refuses the IPv6 TPROXY route: lo has IPv6 turned off in this pod.
    prev = _bridged(node, pod, "c-half")
    sh("ip", "addr", "add", "2001:db8::5/64", "dev", "eth0", "nodad", ns=pod)
    sh("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1", ns=pod)
    tproxy = {**node.interceptd, "dual_stack": True}
    res = node.exec(node.plugins(tproxy)[1], "ADD", f"/run/netns/{pod}", "c-half",
                    args="sidecar.istio.io/interceptionMode=TPROXY", prev=prev)
    assert res.rc == 1 and res.out is not None and res.out["code"] == cni_e_io(), (res.out, res.stderr)
    assert "Traceback" not in res.stderr and "\n" not in res.out["msg"]
    _no_table_no_state(node, pod)


def test_a_state_directory_it_cannot_write_fails_the_add_and_leaves_no_table(node: CniNode, pod: str) -> None:
    blocker = os.path.join(node.tmp, "not-a-directory")
    with open(blocker, "w", encoding="utf-8"):
        pass
    res = node.exec(node.plugins({**node.interceptd, "state_dir": blocker})[1], "ADD", f"/run/netns/{pod}", "c-st",
                    prev=_bridged(node, pod, "c-st"))
    assert res.rc == 1 and res.out is not None and blocker in res.out["msg"], (res.out, res.stderr)
    assert "Traceback" not in res.stderr
    _no_table_no_state(node, pod)


def test_dry_run_renders_and_applies_nothing(node: CniNode, pod: str) -> None:
    prev = _bridged(node, pod, "c-dry")
    res = node.exec(node.plugins({**node.interceptd, "dry_run": True})[1], "ADD", f"/run/netns/{pod}", "c-dry",
                    prev=prev)
    assert res.rc == 0 and res.out == prev, res.stderr
    assert '"table"' in res.stderr  # the ruleset it would have applied, for the runtime's log
    _no_table_no_state(node, pod)
    # CHECK has nothing to compare and DEL nothing to remove: not even a table someone else put there.
    dry = node.plugins({**node.interceptd, "dry_run": True})[1]
    assert node.exec(dry, "CHECK", f"/run/netns/{pod}", "c-dry", prev=prev).rc == 0
    sh("nft", "add", "table", "inet", "interceptd", ns=pod)
    assert node.exec(dry, "DEL", f"/run/netns/{pod}", "c-dry").rc == 0
    assert table_listing(pod) is not None


def cni_e_io() -> int:
    from interceptd.cli import cni

    return cni.E_IO


def _marked_request(host: str, port: int) -> str:
    """The node proxy's own connection (SO_MARK 0x539, docs/ambient.md)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
        s.connect((host, port))
        return s.recv(256).decode().strip()


def test_an_ambient_labelled_pod_gets_the_ambient_rules(node: CniNode, pod: str) -> None:
    """The label istio.io/dataplane-mode=ambient in CNI_ARGS selects the in-pod rules for a node proxy, with the
    pod's own DNS setting; CHECK agrees, DEL removes the table and the reply route."""
    args = "K8S_POD_NAMESPACE=demo;istio.io/dataplane-mode=ambient;ambient.istio.io/dns-capture=true"
    added = node.chain("ADD", pod, "c-amb", args=args)
    assert [r.rc for r in added] == [0, 0], added[-1].stderr
    with open(os.path.join(node.state_dir, "netns", f"{pod}.json"), encoding="utf-8") as fh:
        settings = json.load(fh)["settings"]
    assert settings["capture_mode"] == "ambient" and settings["redirect_dns"] is True
    assert "fwmark 0x111/0xfff lookup 100" in sh("ip", "rule", ns=pod).stdout
    servers = [_serve(pod, "ztunnel", 15001, 15006), _serve(node.node, "node", 8080)]
    try:
        assert call_in(pod, tcp_request, NODE_IP, 8080).startswith("ztunnel 15001 192.0.2.1:8080")
        assert call_in(pod, _marked_request, NODE_IP, 8080).startswith("node 8080 -")
        pod_ip = _pod_ip(pod)
        assert call_in(node.node, tcp_request, pod_ip, 8080).startswith(f"ztunnel 15006 {pod_ip}:8080")
    finally:
        for server in servers:
            server.stop()
    assert [r.rc for r in node.chain("CHECK", pod, "c-amb", args=args, cached=added[-1].out)] == [0, 0]
    assert [r.rc for r in node.chain("DEL", pod, "c-amb", cached=added[-1].out)] == [0, 0]
    assert table_listing(pod) is None and "lookup 100" not in sh("ip", "rule", ns=pod).stdout
