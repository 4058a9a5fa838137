"""`--run-validation` / `interceptd validate`: Istio's redirect self-test (spec 4.1).

Listeners on the proxy ports answer with the original destination port; a client running as the proxy
uid dials 127.0.0.6:<probe port> (::6 on IPv6 pods), which the proxy in-redirect rule must send to the
inbound listener. Istio's client runs as whatever user started it, so as root it always fails; interceptd
drops to the first proxy uid/gid for the probe, which is what the check is meant to exercise.
"""

from __future__ import annotations

import os
import selectors
import socket
import time

from .config import Config
from .errors import ValidationFailedError
from .host import HostFacts
from .sockopt import original_dst


def _listeners(family: int, host: str, ports: tuple[int, ...]) -> list[socket.socket]:
    out: list[socket.socket] = []
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        sock.listen(16)
        sock.setblocking(False)
        out.append(sock)
    return out


def _probe(family: int, local: str, target: tuple[str, int], uid: int, gid: int, timeout: float) -> str:
    """Connect as uid/gid in a child process (dropping privileges must not touch this process)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(rfd)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.bind((local, 0))
                s.connect(target)
                os.write(wfd, s.recv(64))
            code = 0
        except OSError as exc:
            os.write(wfd, f"error: {exc.strerror or exc}".encode())
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 64):
        chunks.append(chunk)
    os.close(rfd)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


def run(config: Config, facts: HostFacts) -> None:
    v6 = facts.host_ip is not None and facts.host_ip.version == 6
    family = socket.AF_INET6 if v6 else socket.AF_INET
    loop, passthrough = ("::1", "::6") if v6 else ("127.0.0.1", "127.0.0.6")
    listeners = _listeners(family, loop, (config.envoy_port, config.inbound_capture_port))
    if not listeners:
        raise ValidationFailedError("validation failed: no listener available on the proxy ports")
    probe_port = config.iptables_probe_port
    sel = selectors.DefaultSelector()
    for sock in listeners:
        sel.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + config.probe_timeout
    last = "no attempt"
    try:
        while time.monotonic() < deadline:
            remaining = max(0.1, min(1.0, deadline - time.monotonic()))
            pid_reply = _serve_and_probe(sel, family, loop, (passthrough, probe_port), config, remaining)
            if pid_reply.strip() == str(probe_port):
                return
            last = pid_reply or "no answer"
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        for sock in listeners:
            sock.close()
    raise ValidationFailedError(
        f"validation failed: inbound capture (proxy uid {config.proxy_uid[0]} -> {passthrough}:{probe_port} "
        f"in-redirected to :{config.inbound_capture_port}) did not happen within {config.probe_timeout:g}s "
        f"({last}); the workload is not ready, delete and reschedule the pod")


def _serve_and_probe(sel: selectors.BaseSelector, family: int, local: str, target: tuple[str, int],
                     config: Config, timeout: float) -> str:
    """Start the probe in a child, answer it from the listeners, return what the probe read."""
    import threading

    result: list[str] = []
    client = threading.Thread(target=lambda: result.append(
        _probe(family, local, target, config.proxy_uid[0], config.proxy_gid[0], timeout)))
    client.start()
    end = time.monotonic() + timeout
    while client.is_alive() and time.monotonic() < end:
        for key, _ in sel.select(0.05):
            listener = key.fileobj
            assert isinstance(listener, socket.socket)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            with conn:
                try:
                    port = original_dst(conn)[1]
                except OSError:
                    port = 0
                conn.sendall(str(port).encode())
    client.join()
    return result[0] if result else ""
