"""A node for the host probe tests: a test-made node namespace with a CNI bridge, the node agent running inside
it (so --ambient-host-rules writes into that namespace, never the host's), and ambient pods added through the
real CNI chain (bridge + host-local, then interceptd-cni with the ambient label), whose addresses the plugin
records for the agent's probe sets.

A "probe" is a TCP connection from the node namespace, as the kubelet (uid 0) or another uid; the pod runs a
listener that answers "<local port> <peer address>", so the test sees the address the connection arrived from.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from support.netlab import delete_ns, new_ns, sh, wait_until
from support.nodelab import CniNode, NodeAgent

HOST_TABLE = "interceptd-host"
AMBIENT_ARGS = "K8S_POD_NAMESPACE=demo;istio.io/dataplane-mode=ambient"

PEER_SERVER = """
import socket, sys, selectors
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(16); sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, peer = key.fileobj.accept()
        address = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
        conn.sendall(f"{key.fileobj.getsockname()[1]} {address}\\n".encode()); conn.close()
"""


@contextlib.contextmanager
def peer_server(ns: str, *ports: int) -> Iterator[None]:
    """Listeners in `ns` (IPv4 and IPv6) answering "<port> <peer address>"."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER_SERVER, *map(str, ports)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait()


def probe_set(node: str, version: int) -> list[str] | None:
    """The elements of the host table's probe set in `node`, or None when there is no such table."""
    res = sh("nft", "-j", "list", "set", "inet", HOST_TABLE, f"probe-pods-v{version}", ns=node, check=False)
    if res.returncode != 0:
        return None
    body = next(item["set"] for item in json.loads(res.stdout)["nftables"] if "set" in item)
    return [str(e) for e in body.get("elem", [])]


def tables(ns: str) -> list[str]:
    return [line for line in sh("nft", "list", "tables", ns=ns).stdout.splitlines() if line.startswith("table ")]


def pod_address(pod: str, version: int) -> str:
    out = sh("ip", f"-{version}", "-o", "addr", "show", "dev", "eth0", "scope", "global", ns=pod).stdout
    return out.split("inet6 " if version == 6 else "inet ")[1].split("/")[0]


@dataclass
class AmbientNode:
    """CniNode + the node agent inside its namespace; pods by name, each with its cached ADD result."""

    host_rules: bool = True
    v6: bool = False
    args: tuple[str, ...] = ()
    cni: CniNode = field(init=False)
    agent: NodeAgent = field(init=False)
    pods: dict[str, dict[str, object] | None] = field(default_factory=dict)

    def __enter__(self) -> AmbientNode:
        # A dual-stack cluster's CNI configuration says so (ISTIO_DUAL_STACK): the pods then capture IPv6 too.
        self.cni = CniNode(interceptd={"dual_stack": True} if self.v6 else {}, v6=self.v6).__enter__()
        try:
            flags = ("--ambient-host-rules",) if self.host_rules else ()
            self.agent = NodeAgent(self.cni.state_dir, netns=self.cni.node, args=(*flags, *self.args),
                                   env={"INTERCEPTD_NETNS_DIR": ""})
        except BaseException:
            self.cni.__exit__(None, None, None)
            raise
        return self

    def start(self) -> AmbientNode:
        self.agent.start()
        return self

    def add_pod(self) -> str:
        pod = new_ns("-pod")
        self.pods[pod] = None
        results = self.cni.chain("ADD", pod, f"c-{pod}", args=AMBIENT_ARGS)
        assert [r.rc for r in results] == [0, 0], results[-1].stderr
        self.pods[pod] = results[-1].out
        if self.v6:  # the pod's and the bridge's IPv6 addresses are tentative until DAD is done: wait for both
            for ns in (pod, self.cni.node):
                assert wait_until(lambda ns=ns: "global tentative" not in sh("ip", "-6", "addr", ns=ns).stdout, 5.0), \
                    f"an IPv6 address of {ns} stays tentative"
        return pod

    def delete_pod(self, pod: str) -> None:
        results = self.cni.chain("DEL", pod, f"c-{pod}", cached=self.pods[pod])  # type: ignore[arg-type]
        delete_ns(pod)
        del self.pods[pod]
        assert [r.rc for r in results] == [0, 0], results[-1].stderr

    def __exit__(self, *exc: object) -> None:
        try:
            self.agent.stop()
        finally:
            for pod in list(self.pods):
                delete_ns(pod)
            self.cni.__exit__(None, None, None)
