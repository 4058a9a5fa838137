"""`interceptd node` with 20 pod namespaces, where one pod at a time fails in each way a pod can fail: its
TPROXY route is refused by the kernel, its namespace is deleted while the agent works, its table is held by a
foreign owner, the kernel refuses its transaction. Meanwhile the other 19 keep being repaired within 1 s, the
failing pod shows as not ready (metric, log, /readyz detail), and it recovers when the fault goes away.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from support.netlab import wait_until
from support.nodelab import NodeAgent, NsDir

from interceptd.runtime.nodestate import request as nodestate_request

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
pytest.importorskip("nftables")

PODS = 20
NODE_TOML = 'service_cidr = "*"\ninbound_ports = "*"\nlocal_exclude_ports = [15020, 15021, 15090]\n'
TPROXY_TOML = 'inbound_interception_mode = "TPROXY"\ndual_stack = true\n'
TPROXY_POD = "pod00"
REPAIR_S = 1.0


@pytest.fixture
def node() -> Iterator[tuple[NsDir, NodeAgent]]:
    with twenty_pods() as started:
        yield started


@contextmanager
def twenty_pods(wrapper: tuple[str, ...] = ()) -> Iterator[tuple[NsDir, NodeAgent]]:
    with ExitStack() as stack:
        nsdir = stack.enter_context(NsDir())
        conf = nsdir.path + "-etc"
        os.makedirs(os.path.join(conf, "netns.d"))
        stack.callback(lambda: shutil.rmtree(conf, ignore_errors=True))
        with open(os.path.join(conf, "node.toml"), "w", encoding="utf-8") as fh:
            fh.write(NODE_TOML)
        with open(os.path.join(conf, "netns.d", f"{TPROXY_POD}.toml"), "w", encoding="utf-8") as fh:
            fh.write(TPROXY_TOML)
        for i in range(PODS):
            nsdir.add(f"pod{i:02d}", f"198.51.100.{i + 1}/32")
        nsdir.run_in(TPROXY_POD, "ip", "addr", "add", "2001:db8::100/128", "dev", "lo")
        agent = NodeAgent(os.path.join(conf, "state"), nsdir.path, ("--config", os.path.join(conf, "node.toml")),
                          {"INTERCEPTD_NETNS_CONFIG_DIR": os.path.join(conf, "netns.d"),
                           "INTERCEPTD_RECONCILE_INTERVAL": "10"}, wrapper=wrapper)
        stack.enter_context(agent)
        yield nsdir, agent


def nft(nsdir: NsDir, pod: str, *script: str) -> None:
    nsdir.run_in(pod, "nft", *script)


def has_table(nsdir: NsDir, pod: str) -> bool:
    return nsdir.run_in(pod, "nft", "list", "table", "inet", "interceptd", check=False).returncode == 0


def ready_value(agent: NodeAgent, pod: str) -> float | None:
    return agent.metrics().get(f'interceptd_ready{{netns="{pod}"}}')


def others_are_repaired(nsdir: NsDir, agent: NodeAgent, healthy: list[str]) -> None:
    """Delete the table in three healthy pods; each is back within REPAIR_S."""
    for pod in healthy[:3]:
        nft(nsdir, pod, "delete", "table", "inet", "interceptd")
        deleted = time.monotonic()
        assert wait_until(lambda pod=pod: has_table(nsdir, pod), REPAIR_S, 0.01), \
            f"{pod} was not repaired within {REPAIR_S} s while another pod failed: {agent.logs()[-2000:]}"
        assert time.monotonic() - deleted <= REPAIR_S


def fails_visibly(agent: NodeAgent, pod: str, words: str) -> None:
    def says_so() -> bool:
        status, text = agent.get("/readyz")
        return status == 503 and pod in text and words in text

    assert wait_until(says_so, 10, 0.05), agent.get("/readyz")
    assert ready_value(agent, pod) in (0.0, None)  # a forgotten namespace has no series at all
    assert any(e.get("netns") == pod and e.get("level") in ("error", "warning") for e in agent.events())


def recovers(agent: NodeAgent, nsdir: NsDir, pod: str) -> None:
    assert wait_until(lambda: ready_value(agent, pod) == 1.0 and agent.get("/readyz")[0] == 200, 60, 0.1), \
        agent.get("/readyz")
    assert has_table(nsdir, pod)


def healthy(failing: str) -> list[str]:
    return [f"pod{i:02d}" for i in range(PODS) if f"pod{i:02d}" != failing]


def test_a_refused_tproxy_route(node: tuple[NsDir, NodeAgent]) -> None:
    nsdir, agent = node
    # With lo down the kernel refuses IPv6 routes through it (ENETDOWN); taking lo down also
    # removes the pod's routes, which the agent sees and tries to repair.
    nsdir.run_in(TPROXY_POD, "ip", "link", "set", "lo", "down")
    fails_visibly(agent, TPROXY_POD, "route local default dev lo table 133`: Network is down")
    others_are_repaired(nsdir, agent, healthy(TPROXY_POD))
    nsdir.run_in(TPROXY_POD, "ip", "link", "set", "lo", "up")
    recovers(agent, nsdir, TPROXY_POD)
    routes = nsdir.run_in(TPROXY_POD, "ip", "-6", "route", "show", "table", "133").stdout
    assert "local default dev lo" in routes


def test_a_namespace_deleted_while_the_agent_works(node: tuple[NsDir, NodeAgent]) -> None:
    nsdir, agent = node
    pod = "pod05"
    nft(nsdir, pod, "delete", "table", "inet", "interceptd")  # a repair is under way when the namespace goes
    nsdir.remove(pod)
    assert wait_until(lambda: f'interceptd_ready{{netns="{pod}"}}' not in agent.metrics(), 10, 0.05)
    assert any(e.get("netns") == pod and e.get("event") == "forget" for e in agent.events())
    others_are_repaired(nsdir, agent, healthy(pod))
    assert agent.get("/readyz")[0] == 200
    nsdir.add(pod, "198.51.100.6/32")  # the pod comes back: managed again
    recovers(agent, nsdir, pod)


OWNER = """
import sys, time, nftables
nft = nftables.Nftables()
# One transaction: between two, the agent would already have repaired the deleted table.
rc, _out, err = nft.cmd("delete table inet interceptd\\nadd table inet interceptd { flags owner; }")
print("owned" if rc == 0 else err, flush=True)
sys.stdin.read()
"""


def test_a_table_held_by_a_foreign_owner(node: tuple[NsDir, NodeAgent]) -> None:
    nsdir, agent = node
    pod = "pod07"
    owner = subprocess.Popen(["nsenter", f"--net={os.path.join(nsdir.path, pod)}", sys.executable, "-c", OWNER],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "owned"
        fails_visibly(agent, pod, "owned by another process")
        others_are_repaired(nsdir, agent, healthy(pod))
    finally:
        owner.kill()  # the owner's table goes with its process
        owner.wait()
    recovers(agent, nsdir, pod)


def test_a_refused_transaction(node: tuple[NsDir, NodeAgent]) -> None:
    nsdir, agent = node
    pod = "pod11"
    # A foreign chain that a foreign verdict map jumps to: our transaction deletes chains it did not render, and
    # the kernel refuses to delete a chain still referenced (EBUSY), so the whole transaction is refused.
    script = ("add chain inet interceptd foreign\n"
              "add map inet interceptd jumps { type ipv4_addr : verdict; }\n"
              "add element inet interceptd jumps { 192.0.2.9 : jump foreign }\n")
    subprocess.run(["nsenter", f"--net={os.path.join(nsdir.path, pod)}", "nft", "-f", "-"], input=script, text=True,
                   check=True)
    fails_visibly(agent, pod, "refused")
    others_are_repaired(nsdir, agent, healthy(pod))
    nft(nsdir, pod, "delete", "map", "inet", "interceptd", "jumps")  # the fault goes away
    recovers(agent, nsdir, pod)



def test_socket_clients_never_stall_the_repairs(node: tuple[NsDir, NodeAgent]) -> None:
    nsdir, agent = node
    path = os.path.join(agent.state_dir, "node.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as deep:
        slow.connect(path)
        slow.send(b"{")  # and nothing more for now: a client dribbling its request
        deep.connect(path)
        with contextlib.suppress(OSError):  # the agent may close it before it has all been sent
            deep.sendall(b"[" * 60000 + b"\n")
        others_are_repaired(nsdir, agent, healthy(""))
        time.sleep(2.5)  # past the request deadline: the dribbling client was dropped
        with contextlib.suppress(OSError):
            slow.send(b'"op": "status"}')
        assert slow.recv(100) == b""
    assert agent.proc is not None and agent.proc.poll() is None
    reply = nodestate_request(agent.state_dir, {"op": "add", "name": "../../x"})
    assert reply == {"ok": False, "error": "'../../x' is not a network namespace name"}
    assert agent.get("/readyz")[0] == 200


FLOOD = 2000


def _hold_idle(port: int, n: int, ready_fd: int) -> None:
    """In a forked child: n connections to the metrics port that send the start of a request and no more."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        with contextlib.suppress(OSError):  # the server may already have dropped it for a newer one
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
        held.append(s)
    os.write(ready_fd, b"1")
    signal.pause()


def test_idle_metrics_clients_cannot_stop_a_nodes_repairs() -> None:
    """2,000 idle clients of the metrics port of a node agent started with systemd's soft limit of 1024
    descriptors and 20 pods (each with its event sockets): every pod's repairs go on."""
    with twenty_pods(wrapper=("prlimit", "--nofile=1024:8192")) as (nsdir, agent):
        assert agent.proc is not None
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(rfd)
                _hold_idle(agent.port, FLOOD, wfd)
            finally:
                os._exit(1)
        os.close(wfd)
        try:
            assert os.read(rfd, 1) == b"1", "the idle clients could not connect"
            others_are_repaired(nsdir, agent, healthy(""))
            assert agent.proc.poll() is None
            # The last repaired table is in the kernel a moment before its controller has taken the listing.
            assert wait_until(lambda: agent.get("/readyz", timeout=30)[0] == 200, 30, 0.1), agent.get("/readyz")
            fds = [int(fd) for fd in os.listdir(f"/proc/{agent.proc.pid}/fd")]
            assert sum(fd < 1024 for fd in fds) < 50, sorted(fds)  # the low range stays free for libnftables
        finally:
            os.close(rfd)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert "Too many open files" not in agent.logs() and "FD_SETSIZE" not in agent.logs()
