"""Test hosts in network namespaces: a pod and a peer joined by a veth pair, real TCP/UDP between them.

Every namespace is named icd-<pid>-<n> and deleted on exit, also on failure. Code runs inside a
namespace in a forked child that calls setns(2) (and optionally drops to a uid/gid), so the test process
itself never leaves the host namespace and nothing here installs rules outside the namespaces it made.

Servers answer every TCP connection with one line "<label> <local-port> <original-dst or ->", so a client
learns which listener took it and where it was going (SO_ORIGINAL_DST, as Envoy reads it).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The interceptd commands the tests start; `make bench` points INTERCEPTD_BIN_DIR at an installed copy.
VENV_BIN = Path(os.environ.get("INTERCEPTD_BIN_DIR") or ROOT / ".venv" / "bin")
INTERCEPTD = str(VENV_BIN / "interceptd")
CLONE_NEWNET = 0x40000000
IP_PKTINFO = 8  # linux/in.h; Python's socket module lacks the constant
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()
_created: list[str] = []


from interceptd.system.sockopt import original_dst  # noqa: E402


def sh(*cmd: str, check: bool = True, ns: str | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    return subprocess.run(full, check=check, text=True, capture_output=True, **kw)


def new_ns(tag: str = "") -> str:
    name = f"icd-{os.getpid()}-{next(_counter)}{tag}"
    sh("ip", "netns", "add", name)
    _created.append(name)
    sh("ip", "link", "set", "lo", "up", ns=name)
    return name


def delete_ns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if name in _created:
        _created.remove(name)


@atexit.register
def _cleanup_all() -> None:
    for name in list(_created):
        delete_ns(name)


def enter(name: str) -> None:
    """setns(2) this process (a forked child) into the named network namespace, or the one a path names (a
    container's /proc/PID/ns/net, which needs no file in /run/netns)."""
    fd = os.open(name if name.startswith("/") else f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def enter_as(ns: str, uid: int | None = None, gid: int | None = None) -> None:
    """In a forked child: enter `ns`, then drop to gid/uid (no supplementary groups) when given."""
    enter(ns)
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def call_in(ns: str, fn: Callable[..., Any], *args: Any, uid: int | None = None, gid: int | None = None,
            timeout: float = 60.0) -> Any:
    """Run fn(*args) in a child inside `ns` (as uid/gid if given) and return its result or raise; a child
    still busy after `timeout` seconds is killed and TimeoutError raised."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            enter_as(ns, uid, gid)
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException as exc:  # report everything to the parent
            payload = pickle.dumps(("err", repr(exc)))
        with os.fdopen(wfd, "wb") as out:
            out.write(payload)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        if not select.select([inp], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"in {ns}: {getattr(fn, '__name__', fn)} took more than {timeout:g} s")
        data = inp.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status != "ok":
        raise RuntimeError(f"in {ns}: {value}")
    return value


def tcp_request(host: str, port: int, timeout: float = 2.0, source: str | None = None) -> str:
    """Connect and return the server's one-line answer, or 'refused' / 'timeout'."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        try:
            s.connect((host, port))
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.decode().strip()
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"


def udp_request(host: str, port: int, timeout: float = 2.0) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"ping", (host, port))
        try:
            return s.recv(256).decode().strip()
        except (TimeoutError, ConnectionRefusedError):
            return "timeout"


def udp_query(host: str, port: int, mark: int = 0) -> str:
    """A connected UDP query: the answer is only accepted from the address asked (so a redirect must have been
    undone on the way back); returns the answering server's label or 'timeout'."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        if mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.connect((host, port))
        s.send(b"query")
        try:
            return s.recv(256).decode().split()[0]
        except (TimeoutError, ConnectionRefusedError):
            return "timeout"


def _serve(label: str, tcp_ports: Iterable[int], udp_ports: Iterable[int], ready_fd: int,
           transparent: bool, v6: bool, uid: int | None = None, mark: int | None = None) -> None:
    sel = selectors.DefaultSelector()
    if uid is not None:  # before the sockets exist: nft's skuid/skgid is the uid/gid that created the socket
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    families = [socket.AF_INET, socket.AF_INET6] if v6 else [socket.AF_INET]
    for family in families:
        any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"
        for port in tcp_ports:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if transparent:
                s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
            if mark is not None:  # accepted connections inherit it (ambient's node proxy marks its sockets)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            s.bind((any_addr, port))
            s.listen(128)
            sel.register(s, selectors.EVENT_READ, "tcp")
        for port in udp_ports:
            u = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                u.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if mark is not None:
                u.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            u.bind((any_addr, port))
            sel.register(u, selectors.EVENT_READ, "udp")
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "udp":
                _data, anc, _flags, peer = sock.recvmsg(512, 256)
                sock.sendmsg([f"{label} {sock.getsockname()[1]} {peer[0]}\n".encode()], _reply_from(anc), 0, peer)
                continue
            try:
                conn, peer = sock.accept()
            except OSError:
                continue
            with conn:
                local = conn.getsockname()
                try:
                    orig = original_dst(conn)
                    # Without NAT conntrack still answers, with the connection's own destination.
                    odst = "-" if orig == tuple(local[:2]) else f"{orig[0]}:{orig[1]}"
                except OSError:
                    odst = "-"
                if transparent:
                    odst = f"{local[0]}:{local[1]}"
                with contextlib.suppress(OSError):
                    conn.sendall(f"{label} {sock.getsockname()[1]} {odst} {peer[0]}\n".encode())


def _reply_from(ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Answer a datagram from the address it was sent to, as a server bound to that address would."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:  # in_pktinfo: ifindex, spec_dst, addr
            return [(level, kind, struct.pack("=i4s4s", 0, data[8:12], bytes(4)))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:  # in6_pktinfo: addr, ifindex
            return [(level, kind, data[:16] + struct.pack("=i", 0))]
    return []


@dataclass
class Server:
    """A forked listener inside a namespace (see the module docstring for what it answers)."""

    ns: str
    label: str
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    transparent: bool = False
    v6: bool = False
    pid: int = 0
    uid: int | None = None  # run as this uid and gid (ports above 1023 only)
    mark: int | None = None  # SO_MARK on every socket

    def start(self) -> Server:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                enter(self.ns)
                _serve(self.label, self.tcp_ports, self.udp_ports, wfd, self.transparent, self.v6, self.uid,
                       self.mark)
            finally:
                os._exit(1)
        os.close(wfd)
        ok = os.read(rfd, 1)
        os.close(rfd)
        if ok != b"1":
            os.waitpid(pid, 0)
            raise RuntimeError(f"server {self.label} in {self.ns} failed to start")
        self.pid = pid
        return self

    def stop(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0


@dataclass
class Lab:
    """pod (eth0 192.0.2.2, 2001:db8::2) <-veth-> peer (eth0 192.0.2.1, 2001:db8::1), plus servers."""

    v6: bool = False
    pod: str = ""
    peer: str = ""
    servers: list[Server] = field(default_factory=list)
    pod_ip: str = "192.0.2.2"
    peer_ip: str = "192.0.2.1"
    pod_ip6: str = "2001:db8::2"
    peer_ip6: str = "2001:db8::1"
    extra: list[str] = field(default_factory=list)  # namespaces made by attach()

    def __enter__(self) -> Lab:
        try:
            self.pod = new_ns("-pod")
            self.peer = new_ns("-peer")
            # Both ends are created inside the lab's namespaces: the host's namespace never sees them.
            sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.peer, ns=self.pod)
            for ns, ip4, ip6 in ((self.pod, self.pod_ip, self.pod_ip6), (self.peer, self.peer_ip, self.peer_ip6)):
                sh("ip", "addr", "add", f"{ip4}/24", "dev", "eth0", ns=ns)
                if self.v6:
                    sh("ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad", ns=ns)
                sh("ip", "link", "set", "eth0", "up", ns=ns)
            # Every other documentation range is routed to the peer, so "any destination" stays in the lab.
            sh("ip", "route", "add", "198.51.100.0/24", "via", self.peer_ip, ns=self.pod)
            sh("ip", "route", "add", "203.0.113.0/24", "via", self.peer_ip, ns=self.pod)
            sh("ip", "addr", "add", "198.51.100.1/24", "dev", "lo", ns=self.peer)
            sh("ip", "addr", "add", "203.0.113.1/24", "dev", "lo", ns=self.peer)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
        for ns in (self.pod, self.peer, *self.extra):
            if ns:
                delete_ns(ns)
        self.extra.clear()

    def attach(self, pod_if: str, pod_cidr: str, ns_cidr: str) -> str:
        """One more namespace (e.g. a KubeVirt VM) behind a veth `pod_if` of the pod; its default route is the pod."""
        ns = new_ns("-vm")
        self.extra.append(ns)
        sh("ip", "link", "add", pod_if, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self.pod)
        sh("ip", "addr", "add", pod_cidr, "dev", pod_if, ns=self.pod)
        sh("ip", "addr", "add", ns_cidr, "dev", "eth0", ns=ns)
        sh("ip", "link", "set", pod_if, "up", ns=self.pod)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("ip", "route", "add", "default", "via", pod_cidr.split("/")[0], ns=ns)
        return ns

    def serve(self, ns: str, label: str, tcp: Iterable[int] = (), udp: Iterable[int] = (),
              transparent: bool = False, uid: int | None = None, mark: int | None = None) -> Server:
        server = Server(ns, label, tuple(tcp), tuple(udp), transparent, self.v6, uid=uid, mark=mark).start()
        self.servers.append(server)
        return server

    def interceptd(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
                   ) -> subprocess.CompletedProcess[str]:
        """Run the real CLI inside the pod namespace."""
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
        result = sh(INTERCEPTD, *args, ns=self.pod, check=False, env=full_env)
        if check and result.returncode != 0:
            raise AssertionError(f"interceptd {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def nft_json(self, ns: str | None = None) -> str:
        """The whole ruleset of a lab namespace as JSON text (for before/after comparisons)."""
        return sh("nft", "-j", "list", "ruleset", ns=ns or self.pod).stdout

    def request(self, ns: str, host: str, port: int, uid: int | None = None, gid: int | None = None,
                source: str | None = None, timeout: float = 2.0) -> str:
        return str(call_in(ns, tcp_request, host, port, timeout, source, uid=uid, gid=gid))

    def udp(self, ns: str, host: str, port: int, uid: int | None = None, gid: int | None = None) -> str:
        return str(call_in(ns, udp_request, host, port, uid=uid, gid=gid))


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
