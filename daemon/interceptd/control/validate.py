"""`--run-validation` / `interceptd validate`: Istio's redirect self-test
(docs/istio-compatibility.md, "Validation").

Listeners on the proxy ports (P outbound, Z inbound) answer with the original destination port; a client
running as the proxy uid dials 127.0.0.6:<probe port> (::6 on IPv6 pods) every second. That connection
leaves over lo from the proxy, so the proxy in-redirect rule of nat output must send it to the inbound
listener Z. Istio's client runs as whoever started it (as root it always fails); interceptd drops to the
first proxy uid/gid for the probe, which is what the check is meant to exercise.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from dataclasses import dataclass

from interceptd.config import Config
from interceptd.errors import ValidationFailedError
from interceptd.ruleset.facts import HostFacts
from interceptd.system.sockopt import original_dst


@dataclass
class Attempt:
    """What one probe saw: which listener took it (port, 0 = none) and what the client read or hit."""

    listener: int = 0
    original_port: int = 0
    client: str = ""


def _listeners(family: int, host: str, ports: tuple[int, ...]) -> tuple[dict[socket.socket, int], dict[int, str]]:
    """The probe's listeners, and for each port that could not be bound, why."""
    out: dict[socket.socket, int] = {}
    failed: dict[int, str] = {}
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            failed[port] = "taken" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            continue
        sock.listen(16)
        sock.setblocking(False)
        out[sock] = port
    return out, failed


def _start_probe(family: int, local: str, target: tuple[str, int], uid: int, gid: int, timeout: float,
                 ) -> tuple[int, int]:
    """Fork the client (dropping privileges must not touch this process); returns (pid, read end)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
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
                os.write(wfd, s.recv(64) or b"closed without an answer")
        except OSError as exc:
            os.write(wfd, f"{exc.strerror or 'timed out'}".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    return pid, rfd


def _attempt(listeners: dict[socket.socket, int], family: int, local: str, target: tuple[str, int],
             config: Config, timeout: float) -> Attempt:
    """One probe: serve the listeners until the client has read its answer (or given up)."""
    seen = Attempt()
    pid, rfd = _start_probe(family, local, target, config.proxy_uid[0], config.proxy_gid[0], timeout)
    sel = selectors.DefaultSelector()
    for listener in listeners:
        sel.register(listener, selectors.EVENT_READ)
    sel.register(rfd, selectors.EVENT_READ)
    chunks: list[bytes] = []
    try:
        done = False
        while not done:
            for key, _ in sel.select(timeout + 1):
                sock = key.fileobj
                if not isinstance(sock, socket.socket):  # the client's pipe: its answer, then EOF
                    chunk = os.read(rfd, 64)
                    chunks.append(chunk)
                    done = not chunk
                    continue
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                with conn:
                    try:
                        seen.original_port = original_dst(conn)[1]
                    except OSError:
                        seen.original_port = 0
                    seen.listener = listeners[sock]
                    conn.sendall(str(seen.original_port).encode())
    finally:
        sel.close()
        os.close(rfd)
        os.waitpid(pid, 0)
    seen.client = b"".join(chunks).decode(errors="replace").strip()
    return seen


def _explain(seen: Attempt, config: Config, target: tuple[str, int]) -> str:
    if seen.listener == config.envoy_port:
        return (f"it reached the outbound listener :{config.envoy_port} instead (original port "
                f"{seen.original_port})")
    if seen.listener:
        return f"it reached :{seen.listener} with original port {seen.original_port}"
    return f"it was not redirected ({target[0]}:{target[1]}: {seen.client or 'no answer'})"


def run(config: Config, facts: HostFacts) -> None:
    """Probe until success or the deadline; ValidationFailedError (exit 126) says what went wrong."""
    v6 = facts.host_ip is not None and ":" in facts.host_ip
    family = socket.AF_INET6 if v6 else socket.AF_INET
    loop, passthrough = ("::1", "::6") if v6 else ("127.0.0.1", "127.0.0.6")
    listeners, failed = _listeners(family, loop, (config.envoy_port, config.inbound_capture_port))
    if failed:
        # A probe answered by another listener (the proxy itself) proves nothing: say so instead of guessing.
        for sock in listeners:
            sock.close()
        taken = ", ".join(f"{port} ({why})" for port, why in failed.items())
        raise ValidationFailedError(
            f"validation failed: cannot listen on {loop} port {taken}: --run-validation needs the proxy ports "
            "free, so it must run before the proxy starts (in the init container, not next to a running proxy)")
    target = (passthrough, config.iptables_probe_port)
    deadline = time.monotonic() + config.probe_timeout
    seen = Attempt()
    try:
        while True:
            started = time.monotonic()
            seen = _attempt(listeners, family, loop, target, config, max(0.2, min(1.0, deadline - started)))
            if seen.listener and seen.original_port == target[1]:  # Istio's criterion: either listener
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(1.0 - (time.monotonic() - started), deadline - time.monotonic())))
    finally:
        for sock in listeners:
            sock.close()
    raise ValidationFailedError(
        f"validation failed: outbound capture from the proxy back into the pod does not work: the probe from "
        f"proxy uid {config.proxy_uid[0]} to {passthrough}:{target[1]} must be in-redirected to the inbound "
        f"listener :{config.inbound_capture_port}, but {_explain(seen, config, target)} within "
        f"{config.probe_timeout:g}s; the workload is not ready (under CNI: delete and reschedule the pod)")
