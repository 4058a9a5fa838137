"""A small HTTP/1.1 server that no client can use to stop the agent: one thread, bounded, with deadlines.

Anyone who can connect to the metrics port is a client, so the server must not let clients take what the
repairs need. http.server's ThreadingHTTPServer did: one thread and one descriptor per connection, no
timeout, so 1,040 idle connections exhausted a 1024 descriptor limit (the repair then died with EMFILE),
or pushed libnftables' socket above descriptor 1023 (glibc aborts select() there; see system.fds).
Here instead:

- one selector thread reads requests and serves them once complete, then closes the connection (the
  answers are small and made in milliseconds; Prometheus opens a connection per scrape anyway);
- at most `max_connections` at once: a further one takes the place of the oldest client that has not
  finished its request (or, with every place answering, is closed at once), so idle clients can delay a
  scrape but not lock it out, and no client waits in the backlog;
- each connection has `deadline_s` to send its request, then again to take the answer (renewed while it reads):
  idle and slow clients go, a slow answer to produce (a node's scrape of 1,000 namespaces) is not cut off;
- the listener and every client sit on descriptors >= 1024 (system.fds), away from libnftables;
- a client that goes away mid-request or mid-answer is one structured log line, never a traceback;
  connections refused over the limit or timed out are summed into one line at most every SUMMARY_S.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from interceptd.errors import ListenError
from interceptd.runtime import logs
from interceptd.system import fds

MAX_CONNECTIONS = 64
DEADLINE_S = 5.0
MAX_REQUEST = 8192  # request line and headers; a scrape sends a few hundred bytes
SUMMARY_S = 10.0
ACCEPT_PAUSE_S = 0.5  # after accept() failed for want of descriptors: no busy loop on a readable listener
METHODS = ("GET", "HEAD")


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names in lower case

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class Response:
    code: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Response]


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    request: Request | None = None
    out: memoryview | None = None  # what is left to send of the answer

    @property
    def phase(self) -> str:
        return "request" if self.out is None else "response"


def show(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse(head: bytes) -> Request | Response:
    """The request line and headers (everything before the blank line), or the error answer to send."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return Response(400, b"bad request line\n")
    if not version.startswith("HTTP/1."):
        return Response(505, b"HTTP/1.x only\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            return Response(400, b"bad header line\n")
        headers[name.strip().lower()] = value.strip()
    if method not in METHODS:
        return Response(405, b"only GET and HEAD\n", headers=(("Allow", ", ".join(METHODS)),))
    return Request(method, target, headers)


def encode(response: Response, head_only: bool) -> bytes:
    """The whole answer; every connection closes after one, so the client needs no keep-alive logic."""
    reason = HTTPStatus(response.code).phrase
    lines = [f"HTTP/1.1 {response.code} {reason}", f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}", "Connection: close",
             *(f"{name}: {value}" for name, value in response.headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else response.body)


class HttpServer:
    """Serves `handler` on `address` from one daemon thread (see the module docstring for the bounds)."""

    def __init__(self, address: tuple[str, int], handler: Handler, flag: str = "--metrics-address",
                 max_connections: int = MAX_CONNECTIONS, deadline_s: float = DEADLINE_S) -> None:
        """`flag`: the option that named `address`, for the error when it cannot be bound."""
        self._handler = handler
        self._max = max_connections
        self._deadline_s = deadline_s
        self.log = logs.get(component="http", listen=show(address))
        fds.raise_nofile_limit()
        family = socket.AF_INET6 if ipaddress.ip_address(address[0]).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ListenError(f"{flag} {show(address)}: cannot listen: {exc.strerror}") from None
        sock.setblocking(False)
        self._listener = fds.move_high(sock)
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r, self._wake_w = fds.move_high(wake_r), fds.move_high(wake_w)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._conns: dict[int, _Conn] = {}
        self._accept_paused_until: float | None = None
        self._refused = self._timed_out = 0
        self._summary_at = time.monotonic() + SUMMARY_S
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")
        if self._thread.is_alive():
            self._thread.join()
        for conn in list(self._conns.values()):
            self._close(conn)
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def connections(self) -> int:
        """Client connections held now (for tests and the bound's documentation)."""
        return len(self._conns)

    def _run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            deadlines = [self._summary_at, *(c.deadline for c in self._conns.values())]
            if self._accept_paused_until is not None:
                deadlines.append(self._accept_paused_until)
            for key, mask in self._selector.select(max(0.0, min(deadlines) - now)):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    continue  # stop() woke us; the loop condition ends the thread
                elif mask & selectors.EVENT_READ:
                    self._read(key.data)
                else:
                    self._send(key.data)
            self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        """Drop connections past their deadline, resume accepting, and write the periodic summary."""
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._timed_out += 1
            self._close(conn)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self._listener, selectors.EVENT_READ)
        if now >= self._summary_at:
            if self._refused or self._timed_out:
                self.log.warning("http-connections-dropped", over_limit=self._refused, timed_out=self._timed_out,
                                 limit=self._max, deadline_s=self._deadline_s)
            self._refused = self._timed_out = 0
            self._summary_at = now + SUMMARY_S

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: the listener stays readable; wait, do not spin
                self.log.warning("http-accept-failed", error=exc.strerror, retry_in_s=ACCEPT_PAUSE_S)
                self._selector.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            if len(self._conns) >= self._max and not self._evict():
                sock.close()
                self._refused += 1
                continue
            sock = fds.move_high(sock)
            sock.setblocking(False)
            conn = _Conn(sock, show(peer), time.monotonic() + self._deadline_s)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> bool:
        """Make room for a new client by closing the oldest one still sending its request: clients that
        hold connections without asking anything can then delay a scrape, never lock it out."""
        oldest = next((c for c in self._conns.values() if c.out is None), None)
        if oldest is None:  # every place is sending an answer: the newcomer is the one turned away
            return False
        self._refused += 1
        self._close(oldest)
        return True

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._aborted(conn, exc.strerror or str(exc))
            return
        if not data:
            if conn.received:  # a bare connect-and-close (a TCP health probe) is no abort
                self._aborted(conn, "closed by the client")
            else:
                self._close(conn)
            return
        conn.received += data
        end = conn.received.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.received) > MAX_REQUEST:
                self._answer(conn, Response(431, b"request header too large\n"), head_only=False)
            return
        parsed = parse(bytes(conn.received[:end]))
        if isinstance(parsed, Response):
            self._answer(conn, parsed, head_only=False)
            return
        conn.request = parsed
        self._answer(conn, self._handle(parsed), head_only=parsed.method == "HEAD")

    def _handle(self, request: Request) -> Response:
        try:
            return self._handler(request)
        except Exception as exc:  # the edge of every request: one bad answer must not end the server
            self.log.error("http-handler-failed", method=request.method, path=request.path, error=repr(exc))
            return Response(500, b"internal error\n")

    def _answer(self, conn: _Conn, response: Response, head_only: bool) -> None:
        # The deadline bounds the client, not our work: producing a node's scrape of 1,000 namespaces takes
        # seconds, and the client then gets the whole deadline again to take the answer (more with progress).
        conn.deadline = time.monotonic() + self._deadline_s
        conn.out = memoryview(encode(response, head_only))
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._send(conn)

    def _send(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._aborted(conn, exc.strerror or str(exc))
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._close(conn)
        elif sent:
            conn.deadline = time.monotonic() + self._deadline_s  # a reader that keeps reading is no idle one

    def _aborted(self, conn: _Conn, error: str) -> None:
        """The client went away before its answer was complete: one line, with where it stopped."""
        request = conn.request
        self.log.warning("http-client-aborted", peer=conn.peer, phase=conn.phase, error=error,
                         method=request.method if request else None, path=request.path if request else None,
                         unsent_bytes=len(conn.out) if conn.out is not None else None)
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock.fileno(), None) is not None:
            self._selector.unregister(conn.sock)
        conn.sock.close()
