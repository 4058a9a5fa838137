"""Descriptor discipline: keep the low descriptors free for libnftables.

libnftables waits on its netlink socket with select(2), which cannot watch a descriptor of 1024 or more
(FD_SETSIZE): glibc aborts the whole process ("bit out of range 0 - FD_SETSIZE on fd_set"). And when it cannot
open that socket at all, libnftables calls exit(). Its socket is opened per call (a fresh context), so the
process must always have a free descriptor below 1024 when it calls libnftables.

So every descriptor that lives long (kernel event sockets, the CNI socket, directory watches, the metrics
listener and its clients) is moved above FD_SETSIZE, after the soft RLIMIT_NOFILE is raised to the hard one;
the low range then only ever holds short-lived descriptors. `low_descriptor_free` is the guard taken before
each libnftables call: when it fails, that one operation fails cleanly (ResourceError), never the process.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket
from typing import TypeVar

from interceptd.errors import ResourceError

FD_SETSIZE = 1024
# Kept free below FD_SETSIZE for what libnftables and one apply open at once (a context, netlink sockets for
# routes, a namespace file, a pipe or two), and for Python's own transient descriptors.
LOW_HEADROOM = 16

Sock = TypeVar("Sock", bound=socket.socket)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (unprivileged processes may); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def move_high(fd: int) -> int:
    """Move `fd` to the lowest free descriptor >= FD_SETSIZE (close-on-exec) and return it; `fd` is closed.

    When the limit leaves no room above FD_SETSIZE the descriptor stays where it is: the process then works
    as before, and `low_descriptor_free` still guards every libnftables call.
    """
    if fd >= FD_SETSIZE:
        return fd
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FD_SETSIZE)
    except OSError:  # EINVAL or EMFILE: RLIMIT_NOFILE is at most FD_SETSIZE, or everything above is taken
        return fd
    os.close(fd)
    return high


def move_socket_high(sock: Sock) -> Sock:
    """The same socket object, its descriptor moved above FD_SETSIZE (the object keeps type and options)."""
    if sock.fileno() >= FD_SETSIZE:
        return sock
    try:
        high = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, FD_SETSIZE)
    except OSError:
        return sock
    moved = type(sock)(sock.family, sock.type, sock.proto, fileno=high)
    moved.settimeout(sock.gettimeout())
    sock.close()
    return moved


def low_descriptor_free(what: str) -> None:
    """Raise ResourceError unless a descriptor below FD_SETSIZE - LOW_HEADROOM is free for `what`."""
    try:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ResourceError(f"{what}: no descriptor left ({exc.strerror}); the operation was not attempted") \
            from None
    os.close(fd)
    if fd >= FD_SETSIZE - LOW_HEADROOM:
        raise ResourceError(f"{what}: no descriptor below {FD_SETSIZE - LOW_HEADROOM} is free (libnftables cannot "
                            f"use a higher one); the operation was not attempted")
