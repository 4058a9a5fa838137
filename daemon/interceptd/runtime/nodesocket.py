"""The node agent's unix socket: interceptd-cni registers pods (ADD, DEL) and `status --netns` asks about one.

Served by the node's event loop without ever waiting on a client: each connection is read a chunk at a time as
it becomes readable, a request is one short line (a flat JSON object of strings naming a namespace), and a client
that has not sent its line within REQUEST_DEADLINE_S, sends too much, or comes beyond MAX_CLIENTS is dropped with
one log line. A name that could leave the state directory ('/', '..') is refused before anything reads a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from interceptd.control.controller import EventLog
from interceptd.errors import ListenError
from interceptd.runtime import nodestate
from interceptd.runtime.loop import EventLoop
from interceptd.system import netns
from interceptd.system.fds import move_high

MAX_REQUEST = 4096  # a request is one short line: {"op": "add", "name": "..."}
MAX_CLIENTS = 32  # at once; interceptd-cni connects once per ADD/DEL and is gone in milliseconds
REQUEST_DEADLINE_S = 2.0  # a client that has not sent a whole line by then is dropped


@dataclass(eq=False)
class _Client:
    """A connection to the node socket, read a chunk at a time by the loop until its line is complete."""

    sock: socket.socket
    deadline: float
    data: bytes = b""


class NodeSocket:
    def __init__(self, state_dir: str, loop: EventLoop, handle: Callable[[dict[str, Any]], dict[str, Any]],
                 log: EventLog) -> None:
        """`handle` answers one validated request (the node's registrations and status)."""
        self.state_dir = state_dir
        self._loop = loop
        self._handle = handle
        self.log = log
        self._listener: socket.socket | None = None
        self._clients: dict[socket.socket, _Client] = {}

    def open(self) -> None:
        path = nodestate.socket_path(self.state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous agent's; the lock says none is running
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            umask = os.umask(0o177)  # the socket is born 0600: no moment where others may connect
            try:
                listener.bind(path)
            finally:
                os.umask(umask)
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise ListenError(f"--state-dir {self.state_dir!r}: cannot listen on {path!r}: {exc.strerror}") from None
        self._listener = move_high(listener)
        self._loop.watch(self._listener, self._accept)

    def _accept(self) -> None:
        """A new client of the socket: read without ever waiting on it (the loop serves every namespace)."""
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # descriptors ran out: the client waits in the backlog, the loop goes on
            self.log.warning("cannot accept on the node socket", error=exc.strerror)
            return
        if len(self._clients) >= MAX_CLIENTS:
            conn.close()
            self.log.warning("node socket busy: client refused", clients=len(self._clients))
            return
        conn.setblocking(False)
        client = _Client(conn, time.monotonic() + REQUEST_DEADLINE_S)
        self._clients[conn] = client
        self._loop.watch(conn, lambda: self._read(client))

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"read failed: {exc.strerror}")
            return
        client.data += chunk
        if b"\n" in client.data:
            line = client.data.split(b"\n", 1)[0]
            reply = self.answer(line)
            with contextlib.suppress(OSError):  # a small reply; a client that does not read loses it
                client.sock.send(json.dumps(reply).encode() + b"\n")
            self._drop(client, "" if reply.get("ok") else str(reply.get("error")))
        elif len(client.data) > MAX_REQUEST:
            self._drop(client, f"request longer than {MAX_REQUEST} bytes")
        elif not chunk:
            self._drop(client, "closed before a complete request")

    def answer(self, line: bytes) -> dict[str, Any]:
        """One request line: a flat JSON object of short strings (no nesting to recurse into)."""
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return {"ok": False, "error": "not a JSON object"}
        if not isinstance(message, dict) or not all(isinstance(v, str) for v in message.values()):
            return {"ok": False, "error": "a request is a flat JSON object of strings"}
        name = message.get("name", "")
        if not netns.is_name(name):
            return {"ok": False, "error": f"{name!r} is not a network namespace name"}
        return self._handle(message)

    def _drop(self, client: _Client, error: str) -> None:
        self._loop.unwatch(client.sock)
        self._clients.pop(client.sock, None)
        client.sock.close()
        if error:
            self.log.warning("bad request on the node socket", error=error)

    def expire(self, now: float) -> None:
        for client in [c for c in self._clients.values() if now >= c.deadline]:
            self._drop(client, f"no complete request within {REQUEST_DEADLINE_S:g} s")

    def deadlines(self) -> list[float]:
        """When each connected client runs out of time (the loop wakes to drop it)."""
        return [c.deadline for c in self._clients.values()]

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client, "")
        if self._listener is not None:
            self._loop.unwatch(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(nodestate.socket_path(self.state_dir))
