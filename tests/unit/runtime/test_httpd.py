"""The bounded HTTP server: limits, deadlines, HEAD, bad requests, aborted clients, high descriptors."""

from __future__ import annotations

import io
import json
import resource
import socket
import struct
import threading

import pytest
from support.netlab import wait_until

from interceptd.runtime.httpd import HttpServer, Request, Response
from interceptd.system import fds

BODY = b"x" * 100


class Seen:
    """The handler: answers BODY, remembers the requests, and can be held to keep a scrape in flight."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, request: Request) -> Response:
        self.gate.wait()
        self.requests.append(request)
        if request.path == "/boom":
            raise ValueError("handler bug")
        return Response(200, BODY * 100_000 if request.path == "/big" else BODY)


def serve(handler: Seen, **kw: float) -> HttpServer:
    return HttpServer(("127.0.0.1", 0), handler, **kw).start()  # type: ignore[arg-type]


def connect(srv: HttpServer) -> socket.socket:
    return socket.create_connection(srv.server_address, timeout=5)


def exchange(srv: HttpServer, raw: bytes) -> bytes:
    with connect(srv) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_get_and_head_answer_alike_but_head_has_no_body() -> None:
    srv = serve(Seen())
    try:
        get = exchange(srv, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n")
        head = exchange(srv, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        srv.stop()
    assert get.startswith(b"HTTP/1.1 200 OK\r\n") and get.endswith(b"\r\n\r\n" + BODY)
    assert head == get[: -len(BODY)]
    assert b"Content-Length: 100\r\n" in head and b"Connection: close\r\n" in head


@pytest.mark.parametrize(("raw", "status"), [
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"GET /metrics\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/2.0\r\n\r\n", b"505"),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000, b"431"),
])
def test_bad_requests_get_an_error_status_and_never_reach_the_handler(raw: bytes, status: bytes) -> None:
    seen = Seen()
    srv = serve(seen)
    try:
        answer = exchange(srv, raw)
    finally:
        srv.stop()
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert seen.requests == []
    if status == b"405":
        assert b"Allow: GET, HEAD\r\n" in answer


def test_a_failing_handler_is_a_500_and_one_log_line(log: io.StringIO) -> None:
    srv = serve(Seen())
    try:
        assert exchange(srv, b"GET /boom HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500")
        assert exchange(srv, b"GET /ok HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")  # still serving
    finally:
        srv.stop()
    (line,) = log.getvalue().splitlines()
    assert json.loads(line)["event"] == "http-handler-failed" and "handler bug" in line


def test_a_client_beyond_the_limit_takes_the_place_of_the_oldest_idle_one() -> None:
    srv = serve(Seen(), max_connections=4)
    held = [connect(srv) for _ in range(4)]
    try:
        assert wait_until(lambda: srv.connections() == 4)
        newer = [connect(srv) for _ in range(3)]
        for s in held[:3]:  # the oldest three made room
            assert closed_by_server(s)
        assert wait_until(lambda: srv.connections() == 4)
        for s in [held[3], *newer]:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
        assert wait_until(lambda: srv.connections() == 0)
    finally:
        for s in held + newer:
            s.close()
        srv.stop()


def test_with_every_place_answering_a_new_client_is_closed_at_once() -> None:
    srv = serve(Seen(), max_connections=2)
    readers = []
    try:
        for _ in range(2):  # clients that ask for 10 MB and read nothing: their answers wait
            s = connect(srv)
            s.sendall(b"GET /big HTTP/1.1\r\n\r\n")
            readers.append(s)
        assert wait_until(lambda: srv.connections() == 2 and all(c.out for c in srv._conns.values()))
        with connect(srv) as late:
            assert closed_by_server(late)
        assert srv.connections() == 2
    finally:
        for s in readers:
            s.close()
        srv.stop()


def test_idle_and_slow_clients_are_dropped_at_their_deadline(log: io.StringIO) -> None:
    srv = serve(Seen(), deadline_s=0.3)
    try:
        with connect(srv) as idle, connect(srv) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
            assert closed_by_server(idle) and closed_by_server(slow)
            assert srv.connections() == 0
    finally:
        srv.stop()  # the summary of drops is due only every SUMMARY_S: nothing logged per idle client
    assert log.getvalue() == ""


@pytest.mark.parametrize("phase", ["request", "response"])
def test_an_aborted_client_is_one_json_line(log: io.StringIO, phase: str) -> None:
    seen = Seen()
    srv = serve(seen)
    try:
        s = connect(srv)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
        if phase == "request":
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            assert wait_until(lambda: any(c.received for c in srv._conns.values()))  # read before the reset
        else:
            seen.gate.clear()  # the answer is made only after the client has gone
            s.sendall(b"GET /big HTTP/1.1\r\n\r\n")
            assert wait_until(lambda: srv.connections() == 1)
        s.close()
        seen.gate.set()
        assert wait_until(lambda: srv.connections() == 0)
    finally:
        srv.stop()
    (line,) = log.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "http-client-aborted" and event["phase"] == phase
    assert event["level"] == "warning" and event["peer"].startswith("127.0.0.1:")
    if phase == "response":
        assert event["path"] == "/big" and event["unsent_bytes"] > 0


def test_listener_and_clients_sit_above_fd_setsize() -> None:
    srv = serve(Seen())
    try:
        with connect(srv):
            assert wait_until(lambda: srv.connections() == 1)
            assert srv._listener.fileno() >= fds.FD_SETSIZE
            assert all(fd >= fds.FD_SETSIZE for fd in srv._conns)
    finally:
        srv.stop()


def test_raise_nofile_limit_and_move_high() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert fds.raise_nofile_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 1024
        r, w = socket.socketpair()
        r = fds.move_high(r)
        assert r.fileno() >= fds.FD_SETSIZE and not r.get_inheritable()
        w.sendall(b"still the same socket")
        assert r.recv(100) == b"still the same socket"
        # No room above FD_SETSIZE: the descriptor stays where it is, open and usable.
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        low = w.fileno()
        assert fds.move_high(low) == low and fds.move_high(w) is w
        w.sendall(b"x")
        assert r.recv(1) == b"x"
        r.close()
        w.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_answer_slower_to_produce_than_the_deadline_is_sent_whole() -> None:
    """A node's scrape of 1,000 namespaces takes seconds to produce: the deadline is the client's, not ours."""
    seen = Seen()
    seen.gate.clear()
    srv = serve(seen, deadline_s=0.3)
    try:
        with connect(srv) as s:
            s.sendall(b"GET /big HTTP/1.1\r\n\r\n")
            threading.Timer(0.8, seen.gate.set).start()  # the handler works past the deadline
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == BODY * 100_000
    finally:
        srv.stop()
